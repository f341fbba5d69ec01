"""One serving target of `python -m bench.serve`, in a process of its own: Ray reads Serve's HTTP
modes from the environment at import (ray/serve/_private/constants.py), in this process and in
every Serve process it starts, so each mode needs a fresh process and a fresh Ray. bench/serve.py
sets the environment (cluster.serve_config.SERVE_MODES) and runs

    python -m bench.serve_modes <lorafleet|stock> <mode> <root> <out.json> [<options json>]

`lorafleet`: the app `serve.app.build_app` builds (the LLM deployment behind lorafleet's
experiment ingress). `stock`: Ray Serve LLM's own `build_openai_app` with the same engine and LoRA
setup (adapters from an S3 server on loopback: its loader reads only cloud URIs).
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.serve import ADAPTERS, MAX_TOKENS, PORT, _prompts, model_entry

URL = f"http://127.0.0.1:{PORT}"
LATENCY_N = 100  # short completions, one at a time
TTFT_N = 30  # streaming requests, one at a time
TAIL_CLIENTS = 64
EXPERIMENT = "bot"


# --- HTTP client ------------------------------------------------------------------------------


# lorafleet's apps run with an API key, as a deployment would (http.mode haproxy refuses to start
# open); stock Ray Serve LLM has no keys and ignores the header
BENCH_KEY = "sk-bench-0123456789"


def _session():
    import requests

    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {BENCH_KEY}"
    # one pooled connection per client thread (the default pool of 10 reconnects under load)
    s.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=TAIL_CLIENTS + 8))
    return s


def post(session, model, prompt, max_tokens=MAX_TOKENS, stream=False, user=None, timeout=300):
    """(seconds, completion tokens or None, seconds to the first streamed chunk, status)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    body |= {"ignore_eos": True, "stream": stream} | ({"user": user} if user else {})
    t = time.perf_counter()
    r = session.post(f"{URL}/v1/completions", json=body, timeout=timeout, stream=stream)
    first = None
    if not stream:
        tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else None
        return time.perf_counter() - t, tokens, None, r.status_code
    for line in r.iter_lines():
        if line.startswith(b"data:") and first is None:
            first = time.perf_counter() - t
    return time.perf_counter() - t, None, first, r.status_code


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


# --- CPU seconds per process, by role ---------------------------------------------------------


def _role(p) -> str:
    if p.pid == _ROOT_PID:
        return "client+driver"
    try:
        cmd = " ".join(p.cmdline()) or p.name()
    except Exception:
        cmd = p.name()
    low = cmd.lower()
    if "haproxy" in low:  # HAProxyManager and the haproxy binary it runs
        return "haproxy"
    if "ProxyActor" in cmd:
        return "proxy"
    if "ServeController" in cmd:
        return "controller"
    if "EngineCore" in cmd or "VLLM::" in cmd:
        return "vllm engine core"
    if "ServeReplica" in cmd:
        if "LLMServer" in cmd or "LoraStoreServer" in cmd:
            return "llm server replica"
        if "Router" in cmd:
            return "ingress router"
        return "ingress replica" if "Ingress" in cmd else "state replicas"
    if "raylet" in cmd or "gcs_server" in cmd:
        return "raylet/gcs"
    if "dashboard" in low or "agent" in low or "monitor" in low:
        return "dashboard/agents"
    return "ray other"


_ROOT_PID = None


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (role, user + system CPU seconds) over this process and everything below it."""
    import psutil

    global _ROOT_PID
    me = psutil.Process()
    _ROOT_PID = me.pid
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = (_role(p), t.user + t.system)
        except psutil.Error:
            pass
    return out


def cpu_by_role(before, after, n_requests) -> dict[str, float]:
    """CPU seconds per request spent by each role between two snapshots."""
    roles: dict[str, float] = {}
    for pid, (role, sec) in after.items():
        spent = sec - before.get(pid, (role, 0.0))[1]
        roles[role] = roles.get(role, 0.0) + spent
    return {r: round(s / n_requests, 5) for r, s in sorted(roles.items()) if s > 0.005}


# --- the phases -------------------------------------------------------------------------------


def wait_ready(session, models, timeout_s=240):
    deadline = time.time() + timeout_s
    while True:
        try:
            if all(post(session, m, "hi", 1, timeout=20)[3] == 200 for m in models):
                return
        except Exception:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"not ready within {timeout_s}s: {models}")
        time.sleep(1)


def throughput(session, prompts):
    before = cpu_snapshot()
    with ThreadPoolExecutor(16) as pool:
        t = time.perf_counter()
        res = list(
            pool.map(
                lambda ip: post(session, f"tiny:{ADAPTERS[ip[0] % 4]}", ip[1]), enumerate(prompts)
            )
        )
        dt = time.perf_counter() - t
    after = cpu_snapshot()
    bad = [s for *_, s in res if s != 200]
    if bad:
        raise RuntimeError(f"throughput phase: {len(bad)} answers not 200: {bad[:5]}")
    return {
        "tokens_per_s": sum(r[1] for r in res) / dt,
        "cpu_s_per_request": cpu_by_role(before, after, len(prompts)),
    }


def latency(session, prompts):
    short = [post(session, "tiny:a0", prompts[1], 4)[0] for _ in range(LATENCY_N)]
    ttft = [post(session, "tiny:a0", prompts[2], MAX_TOKENS, stream=True)[2] for _ in range(TTFT_N)]
    return {
        "p50_ms": 1000 * pct(short, 50),
        "p99_ms": 1000 * pct(short, 99),
        "ttft_p50_ms": 1000 * pct(ttft, 50),
        "ttft_p99_ms": 1000 * pct(ttft, 99),
    }


def _tail_request(session, rng, prompts, n):
    """One request of the tail load: experiment 40%, a named adapter 40%, the base 20%; a quarter
    of them streaming."""
    x = rng.random()
    if x < 0.4:
        kind, model, user = "experiment", EXPERIMENT, f"u{rng.randrange(1000)}"
    elif x < 0.8:
        kind, model, user = "adapter", f"tiny:{rng.choice(ADAPTERS)}", None
    else:
        kind, model, user = "base", "tiny", None
    stream = rng.random() < 0.25
    t0 = time.time()
    try:
        dt, _, _, status = post(session, model, prompts[n % len(prompts)], stream=stream, user=user)
    except Exception as e:
        dt, status = time.time() - t0, type(e).__name__
    if status == 503:  # a rejection asks the client to retry later (Retry-After: 1)
        time.sleep(1)
    return {"t": t0, "s": dt, "status": status, "kind": kind, "stream": stream}


def tail(session, prompts, duration_s, clients=TAIL_CLIENTS, sampler=None):
    """`clients` closed-loop clients for `duration_s`; latency of every request that ended."""
    deadline = time.time() + duration_s
    out: list[dict] = []

    def client(i):
        rng = random.Random(i)
        n = i
        while time.time() < deadline:
            out.append(_tail_request(session, rng, prompts, n))
            n += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.time()
    for th in threads:
        th.start()
    samples = sampler(deadline) if sampler else None
    for th in threads:
        th.join()
    ok = [r["s"] for r in out if r["status"] == 200]
    statuses: dict[str, int] = {}
    for r in out:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    summary = {
        "requests": len(out),
        "seconds": round(time.time() - t0, 1),
        "statuses": statuses,
        "p50_ms": 1000 * pct(ok, 50) if ok else None,
        "p99_ms": 1000 * pct(ok, 99) if ok else None,
        "max_ms": 1000 * max(ok) if ok else None,
    }
    rejected = [r["s"] for r in out if r["status"] == 503]
    if rejected:
        summary["rejected_p99_ms"] = 1000 * pct(rejected, 99)
    return summary, out, samples


# --- the two apps -----------------------------------------------------------------------------


def _cfg(base: Path, root: Path, mode: str, model_over: dict | None = None):
    from cluster.config import load_config
    from cluster.serve_config import ServeAppConfig

    variants = [
        {"name": "x", "model": "tiny", "adapter": "a0", "weight": 80},
        {"name": "y", "model": "tiny", "adapter": "a1", "weight": 20},
    ]
    raw = {
        "name": "bench",
        "models": [model_entry(base) | (model_over or {})],
        "experiments": [{"name": EXPERIMENT, "variants": variants}],
        "http": {"port": PORT, "mode": mode},
        "storage": {"root": str(root)},
        "ray": {"num_cpus": 4},
    }
    return load_config(None, raw, ServeAppConfig)


def _s3_loras(root: Path) -> str:
    """Ray Serve LLM loads adapters from cloud URIs only: an S3 server on loopback holds them,
    its endpoint in the environment before Ray starts so the replicas inherit it."""
    import os
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ |= {
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    s3.create_bucket(Bucket="fleet")
    for name in ADAPTERS:
        for f in (root / "flat" / name).iterdir():
            s3.upload_file(str(f), "fleet", f"loras/{name}/{f.name}")
    return "s3://fleet/loras"


def deploy(kind: str, mode: str, root: Path, opts: dict):
    """Start Ray and Serve, and deploy the target's app."""
    from ray import serve

    from cluster.ray_connect import ensure_ray
    from serve.app import build_app, llm_config_for, resolve

    base = root / "models" / "demo"
    cfg = _cfg(base, root, mode, opts.get("model"))
    lora_uri = _s3_loras(root) if kind == "stock" else None
    # the mode's variables are in our environment already; ensure_ray sets them again (and the
    # other modes' off) for the processes Ray starts
    ensure_ray(cfg.ray, log=lambda *_: None, serve_mode=mode)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    if kind == "lorafleet":
        if opts.get("llm_deployment"):  # the tail investigation's bounds, on the LLM deployment
            _override_llm_deployment(opts["llm_deployment"])
        app = build_app(cfg, resolve(cfg, environ={cfg.http.api_keys_env: BENCH_KEY}))
    else:
        from ray.serve.llm import LLMConfig, build_openai_app

        c = llm_config_for(cfg.models[0], str(base)).model_dump()
        c["lora_config"] = {
            "dynamic_lora_loading_path": lora_uri,
            "max_num_adapters_per_replica": 4,
        }
        app = build_openai_app({"llm_configs": [LLMConfig(**c)]})
    serve.run(app, name="bench", route_prefix="/", blocking=False)
    return cfg


def _override_llm_deployment(over: dict) -> None:
    import serve.app as app

    plain = app.llm_config_for

    def llm_config_for(m, source):
        c = plain(m, source)
        c.deployment_config.update(over)
        return c

    app.llm_config_for = llm_config_for


def _mode_flags() -> dict:
    from ray.llm._internal.serve import constants as llm
    from ray.serve._private import constants as c

    return {
        "ha_proxy": c.RAY_SERVE_ENABLE_HA_PROXY,
        "direct_ingress": c.RAY_SERVE_ENABLE_DIRECT_INGRESS,
        "grpc": c.RAY_SERVE_USE_GRPC_BY_DEFAULT,
        "llm_direct_streaming": llm.RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING,
    }


def main(kind: str, mode: str, root: str, out: str, opts: dict) -> None:
    root_p = Path(root)
    prompts = _prompts()
    result: dict = {"kind": kind, "mode": mode, "flags": _mode_flags()}
    t = time.time()
    deploy(kind, mode, root_p, opts)
    session = _session()
    wait_ready(session, ["tiny", *(f"tiny:{a}" for a in ADAPTERS)])
    result["deploy_s"] = round(time.time() - t, 1)
    if opts.get("tail_only"):
        from bench.serve_tail import investigate

        result |= investigate(session, prompts, opts)
    else:
        result["throughput"] = throughput(session, prompts)
        result["latency"] = latency(session, prompts)
        if kind == "lorafleet" and opts.get("tail_s"):
            result["tail"] = tail(session, prompts, opts["tail_s"])[0]
    Path(out).write_text(json.dumps(result, indent=1))
    import ray

    ray.shutdown()  # the Ray this process started, and Serve in it (serve.shutdown waits 30 s)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], a[3], json.loads(a[4]) if len(a) > 4 else {})
