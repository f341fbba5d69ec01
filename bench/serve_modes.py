"""One serving target of `python -m bench.serve`, in a process of its own: Ray reads Serve's HTTP
modes from the environment at import (ray/serve/_private/constants.py), in this process and in
every Serve process it starts, so each mode needs a fresh process and a fresh Ray. bench/serve.py
sets the environment (cluster.config.serve.SERVE_MODES) and runs

    python -m bench.serve_modes <lorafleet|stock> <mode> <root> <out.json> [<options json>]

`lorafleet`: the app `serve.app.build_app` builds (the LLM deployment behind lorafleet's
experiment ingress). `stock`: Ray Serve LLM's own `build_openai_app` with the same engine and LoRA
setup (adapters from an S3 server on loopback: its loader reads only cloud URIs).
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.serve import ADAPTERS, MAX_TOKENS, PORT, _prompts, model_entry
from bench.serve_client import BENCH_KEY, EXPERIMENT, new_session, pct, post, tail

LATENCY_N = 100  # short completions, one at a time
TTFT_N = 30  # streaming requests, one at a time


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


# --- the two apps -----------------------------------------------------------------------------


def _cfg(base: Path, root: Path, mode: str, model_over: dict | None = None):
    from cluster.config.load import load_config
    from cluster.config.serve import ServeAppConfig

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

    import boto3

    from tests.helpers.toolbox import start_s3_server  # the tests' S3 stand-in (moto)

    _, env = start_s3_server("fleet")
    os.environ |= env
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
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
    session = new_session()
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
