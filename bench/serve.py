"""Serving benchmarks, each a ratio against an anchor measured in the same run.

    .venv/bin/python -m bench.serve

- throughput: 16 concurrent HTTP clients mixing 4 adapters through lorafleet's ingress, divided
  by the same prompts on vLLM used directly in-process (`LLM.generate` with LoRARequests, all
  prompts at once). Also printed: the same against in-process vLLM (`AsyncLLM`) fed by 16
  concurrent requests, which splits the gap into batch size and the serving stack.
- ingress overhead: p50/p99 latency of a short completion through HTTP + the experiment
  ingress, divided by calling the Serve LLM deployment directly through its handle. Also
  printed: lorafleet's ingress against Ray Serve LLM's stock OpenAI ingress, both over HTTP.
- adapter load: first-request latency on a cold adapter, divided by the same adapter warm.
- `--experiment-latency [rounds] [n]`: the p50 of a request for an experiment divided by the
  same adapter asked for by name through the same ingress, interleaved request by request over
  rounds (median and spread of the ratio): what experiment routing and its response id cost.

The model is the demo's shape (4 layers, width 128), built locally; the 4 adapters are PEFT LoRA
adapters (r=16, all-linear) with random weights: speed does not depend on what they learned.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_PROMPTS = 192
MAX_TOKENS = 16
ADAPTERS = [f"a{i}" for i in range(4)]
PORT = 18431


def _prompts() -> list[str]:
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kilo", "lima", "echo"]
    return [
        f"last: {' '.join(rng.choices(words, k=rng.randint(2, 6)))}\n" for _ in range(N_PROMPTS)
    ]


def model_entry(base: Path) -> dict:
    """The served model of every serve bench: the demo shape in float32, 4 LoRA slots."""
    return {
        "id": "tiny",
        "base": str(base),
        "dtype": "float32",
        "max_model_len": 512,
        "max_loras_per_replica": 4,
        "engine_kwargs": {"enforce_eager": True, "seed": 0},
    }


def _build(root: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from train.tiny import ensure_tiny_base

    base = ensure_tiny_base("demo", root / "models" / "demo", pretrain_steps=0, log=lambda *_: None)
    from transformers import AutoModelForCausalLM

    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(base)
        peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        out = root / "flat" / name  # what in-process vLLM loads
        peft.save_pretrained(out)
        publish(out, root, name, base)
    return base


def publish(folder: Path, root: Path, name: str, base: Path) -> str:
    """Publish `folder` as a version of adapter `name` in the store under `root`."""
    from cluster.store import versions
    from cluster.store.fingerprint import base_fingerprint

    meta = {"base_model": str(base), "base_fingerprint": base_fingerprint(str(base))}
    return versions.publish(folder, str(root / "adapters"), name, meta)


DIRECT = r"""
import asyncio, json, sys, time, os
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ENGINE = dict(enable_lora=True, max_lora_rank=16, max_loras=4, max_cpu_loras=4,
              max_model_len=512, dtype="float32", enforce_eager=True, seed=0)


def batch(base, root, prompts):
    # all prompts handed to vLLM at once: the batch grows as large as the engine allows
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    names = ["a0", "a1", "a2", "a3"]
    llm = LLM(model=base, **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    reqs = [LoRARequest(n, i + 1, f"{root}/flat/{n}") for i, n in enumerate(names)]
    llm.generate(prompts[:8], params, lora_request=[reqs[i % 4] for i in range(8)])  # warm: load all 4
    t = time.perf_counter()
    out = llm.generate(prompts, params, lora_request=[reqs[i % 4] for i in range(len(prompts))])
    dt = time.perf_counter() - t
    return {"seconds": dt, "tokens": sum(len(o.outputs[0].token_ids) for o in out)}


def cpu():
    import psutil
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            cmd = " ".join(p.cmdline())  # VLLM::EngineCore and its VLLM::Worker (the model)
            role = "vllm engine core" if "VLLM::" in cmd else "client+frontend"
            out[p.pid] = (role, t.user + t.system)
        except psutil.Error:
            pass
    return out


async def concurrent(base, root, prompts, clients=16):
    # the same engine in-process (AsyncLLM), fed by 16 concurrent requests like the HTTP clients;
    # then one request at a time for latency and time to first token
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=base, **ENGINE))
    reqs = [LoRARequest(n, i + 1, f"{root}/flat/{n}") for i, n in enumerate(["a0", "a1", "a2", "a3"])]
    n = [0]

    async def one(prompt, lora, max_tokens=16):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        n[0] += 1
        t, first = time.perf_counter(), None
        async for out in engine.generate(prompt, params, f"r{n[0]}", lora_request=lora):
            if first is None:
                first = time.perf_counter() - t
        return time.perf_counter() - t, first, len(out.outputs[0].token_ids)

    await asyncio.gather(*(one(prompts[i], reqs[i % 4]) for i in range(8)))  # warm: load all 4
    queue = list(enumerate(prompts))
    tokens = []

    async def client():
        while queue:
            i, p = queue.pop(0)
            tokens.append((await one(p, reqs[i % 4]))[2])

    before = cpu()
    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    dt = time.perf_counter() - t
    after = cpu()
    roles = {}
    for pid, (role, sec) in after.items():
        roles[role] = roles.get(role, 0) + sec - before.get(pid, (role, 0.0))[1]
    short = [(await one(prompts[1], reqs[0], 4))[0] for _ in range(100)]
    ttft = [(await one(prompts[2], reqs[0]))[1] for _ in range(30)]
    engine.shutdown()
    pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]
    return {
        "seconds": dt, "tokens": sum(tokens),
        "cpu_s_per_request": {r: round(s / len(prompts), 5) for r, s in roles.items()},
        "latency": {"p50_ms": 1000 * pct(short, 50), "p99_ms": 1000 * pct(short, 99),
                    "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99)},
    }


if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    mode, base, root, prompts_path = sys.argv[1:5]
    prompts = json.load(open(prompts_path))
    if mode == "batch":
        res = batch(base, root, prompts)
    else:
        res = asyncio.run(concurrent(base, root, prompts))
    print("RESULT " + json.dumps(res))
"""


def _direct(mode: str, base: Path, root: Path, prompts: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        pp = Path(tmp, "p.json")
        pp.write_text(json.dumps(prompts))
        script = Path(tmp, "direct.py")
        script.write_text(DIRECT)
        proc = subprocess.run(
            [sys.executable, str(script), mode, str(base), str(root), str(pp)],
            capture_output=True,
            text=True,
            timeout=900,
        )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(line[7:])


# Ray Serve LLM's direct streaming (alpha): the LLMServer replica is the HTTP ingress behind
# HAProxy; with LoRA, HAProxy must forward the body to Ray's LLMRouter, which picks the replica
DIRECT_STREAM_ENV = {
    "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1",
    "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
}
# (kind, mode, label, extra env): each runs in a process and a Ray of its own (bench/serve_modes.py)
TARGETS = [
    ("stock", "proxy", "ray-llm proxy", {}),
    ("stock", "haproxy", "ray-llm haproxy", {}),
    ("stock", "haproxy", "ray-llm direct-stream", DIRECT_STREAM_ENV),
    ("lorafleet", "proxy", "lorafleet proxy", {}),
    ("lorafleet", "throughput", "lorafleet throughput", {}),
    ("lorafleet", "haproxy", "lorafleet haproxy", {}),
]
TAIL_S = 25
NETNS_ENV = "LORAFLEET_BENCH_NETNS"


def in_private_netns() -> bool:
    """Loopback is the only interface: HAProxy and direct ingress bind all interfaces."""
    import socket

    return [name for _, name in socket.if_nameindex()] == ["lo"]


def reexec_in_netns(argv: list[str]) -> None:
    """Run this bench again inside `unshare -rn` (a private user + network namespace), with
    loopback up, unless already in one. Never returns when it re-executes."""
    if in_private_netns():
        return
    if os.environ.get(NETNS_ENV):
        raise SystemExit("unshare -rn gave a namespace with more than loopback; refusing to run")
    os.environ[NETNS_ENV] = "1"
    script = 'ip link set lo up && exec "$0" "$@"'
    os.execvp("unshare", ["unshare", "-rn", "sh", "-c", script, sys.executable, *argv])


def run_target(kind, mode, label, env, root: Path, opts: dict, timeout_s=420) -> dict:
    """One target in a fresh process with its Serve mode's environment set before Ray imports."""
    from cluster.config.serve import SERVE_MODES

    out = root / f"result-{label.replace(' ', '_')}.json"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    full_env |= SERVE_MODES[mode] | env
    cmd = [sys.executable, "-m", "bench.serve_modes", kind, mode, str(root), str(out)]
    t = time.time()
    try:
        proc = subprocess.run(
            [*cmd, json.dumps(opts)],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        err = None if out.exists() else (proc.stderr or proc.stdout)[-2500:]
    except subprocess.TimeoutExpired as e:
        err = f"timed out after {timeout_s}s: {str(e.stderr or '')[-2000:]}"
    res = json.loads(out.read_text()) if out.exists() else {"error": err}
    res |= {"label": label, "env": SERVE_MODES[mode] | env, "wall_s": round(time.time() - t)}
    print(f"[bench.serve] {label}: {'error' if 'error' in res else 'ok'} in {res['wall_s']}s")
    return res


def anchor(base: Path, root: Path, prompts: list[str]) -> dict:
    """vLLM in process: the batch run (the throughput limit) and AsyncLLM fed like the clients."""
    direct = _direct("batch", base, root, prompts)
    conc = _direct("concurrent", base, root, prompts)
    return {
        "label": "vllm in-process",
        "throughput": {
            "tokens_per_s": conc["tokens"] / conc["seconds"],
            "batch_tokens_per_s": direct["tokens"] / direct["seconds"],
            "cpu_s_per_request": conc["cpu_s_per_request"],
        },
        "latency": conc["latency"],
    }


# the demo's serve config (configs/serve-demo.yaml) autoscaling, for the tail investigation
DEMO_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 8,
    "upscale_delay_s": 10,
    "downscale_delay_s": 60,
}


def tail_demo(argv: list[str]) -> None:
    """`--tail-demo [label] [options json]`: the tail load for 75 s on the demo's autoscaling
    (or the options' `model` / `llm_deployment` overrides), sampled; prints the per-window
    latencies and the samples, and writes the JSON beside the bench's."""
    label = argv[0] if argv else "demo-autoscaling"
    opts = {"tail_only": True, "duration_s": 75, "model": {"autoscaling": DEMO_AUTOSCALING}}
    opts |= json.loads(argv[1]) if len(argv) > 1 else {}
    root = Path(tempfile.mkdtemp(prefix="lorafleet-bench-tail-"))
    try:
        _build(root)
        env = {"RAY_metrics_report_interval_ms": "1000"}
        res = run_target("lorafleet", "throughput", label, env, root, opts, timeout_s=600)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({k: res.get(k) for k in ("tail", "windows", "slowest", "error")}, indent=1))
    for smp in res.get("samples", []):
        print(smp)
    _write(res, f"tail-{label}")


def experiment_latency(argv: list[str]) -> None:
    """`--experiment-latency [rounds] [n]`: bench/serve_client.py's measurement, in a process of
    its own with http.mode throughput's environment set before Ray is imported."""
    from cluster.config.serve import SERVE_MODES

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    cmd = [sys.executable, "-m", "bench.serve_client", "--experiment-latency", *argv]
    subprocess.run(cmd, env=env | SERVE_MODES["throughput"], check=True)


def _write(report, name: str) -> None:
    out = Path(__file__).resolve().parents[1] / "lorafleet-runs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serve-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"[bench.serve] wrote {path}")


def main(argv: list[str]) -> None:
    reexec_in_netns(["-m", "bench.serve", *argv])
    if argv and argv[0] == "--tail-demo":
        return tail_demo(argv[1:])
    if argv and argv[0] == "--experiment-latency":
        return experiment_latency(argv[1:])
    load = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="lorafleet-bench-serve-"))
    try:
        base = _build(root)
        prompts = _prompts()
        results = [anchor(base, root, prompts)]
        for kind, mode, label, env in TARGETS:
            opts = {"tail_s": TAIL_S} if kind == "lorafleet" else {}
            results.append(run_target(kind, mode, label, env, root, opts))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {"loadavg_before": load, "loadavg_after": os.getloadavg(), "results": results}
    from bench.serve_table import table

    print(table(results))
    print(f"load average before {load}, after {report['loadavg_after']}")
    _write(report, "modes")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])
