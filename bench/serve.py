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

The model is the demo's shape (4 layers, width 128), built locally; the 4 adapters are PEFT LoRA
adapters (r=16, all-linear) with random weights: speed does not depend on what they learned.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
    from cluster import versions
    from cluster.fingerprint import base_fingerprint

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


async def concurrent(base, root, prompts, clients=16):
    # the same engine in-process, fed by 16 concurrent requests like the HTTP clients
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=base, **ENGINE))
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    reqs = [LoRARequest(n, i + 1, f"{root}/flat/{n}") for i, n in enumerate(["a0", "a1", "a2", "a3"])]

    async def one(i, prompt):
        async for out in engine.generate(prompt, params, f"r{i}", lora_request=reqs[i % 4]):
            pass
        return len(out.outputs[0].token_ids)

    await asyncio.gather(*(one(-1 - i, prompts[i]) for i in range(8)))  # warm: load all 4
    queue = list(enumerate(prompts))
    tokens = []

    async def client():
        while queue:
            i, p = queue.pop(0)
            tokens.append(await one(i, p))

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    dt = time.perf_counter() - t
    engine.shutdown()
    return {"seconds": dt, "tokens": sum(tokens)}


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


def main() -> None:
    import requests
    from ray import serve

    from cluster.config import load_config
    from cluster.ray_connect import ensure_ray
    from cluster.serve_config import ServeAppConfig
    from serve.app import build_app, resolve

    root = Path(tempfile.mkdtemp(prefix="lorafleet-bench-serve-"))
    try:
        base = _build(root)
        prompts = _prompts()
        direct = _direct("batch", base, root, prompts)
        direct_tps = direct["tokens"] / direct["seconds"]
        conc = _direct("concurrent", base, root, prompts)
        conc_tps = conc["tokens"] / conc["seconds"]

        cfg = load_config(
            None,
            {
                "name": "bench",
                "models": [model_entry(base)],
                "http": {"port": PORT},
                "storage": {"root": str(root)},
                "ray": {"num_cpus": 4},
            },
            ServeAppConfig,
        )
        ensure_ray(cfg.ray, log=lambda *_: None)
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(
            build_app(cfg, resolve(cfg, environ={})), name="bench", route_prefix="/", blocking=False
        )
        url = f"http://127.0.0.1:{PORT}/v1/completions"
        session = requests.Session()
        # one pooled connection per client thread (the default pool of 10 reconnects under 16)
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=32))

        def post(model, prompt, max_tokens=MAX_TOKENS, url=url):
            t = time.perf_counter()
            r = session.post(
                url,
                json={
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                },
                timeout=300,
            )
            r.raise_for_status()
            return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

        # adapter load: cold (first request naming it) vs warm (the same again)
        cold, warm = [], []
        for i in range(3):
            name = f"cold{i}"
            publish(root / "flat" / "a0", root, name, base)
            cold.append(post(f"tiny:{name}", prompts[0], 1)[0])
            warm.append(statistics.median(post(f"tiny:{name}", prompts[0], 1)[0] for _ in range(5)))
        for name in ADAPTERS:
            post(f"tiny:{name}", prompts[0], 1)  # warm all 4 like the direct run did

        # throughput: 16 clients, 4 adapters
        with ThreadPoolExecutor(16) as pool:
            t = time.perf_counter()
            res = list(
                pool.map(lambda ip: post(f"tiny:{ADAPTERS[ip[0] % 4]}", ip[1]), enumerate(prompts))
            )
            dt = time.perf_counter() - t
        serve_tps = sum(tok for _, tok in res) / dt

        # ingress overhead: HTTP + ingress vs the LLM deployment's handle, interleaved
        from serve.ray_internal import CompletionRequest

        handle = serve.get_deployment_handle("LoraStoreServer:tiny", app_name="bench").options(
            stream=True, multiplexed_model_id="tiny:a0"
        )

        def via_handle():
            body = CompletionRequest(
                model="tiny:a0", prompt=prompts[1], max_tokens=4, temperature=0, ignore_eos=True
            )
            t = time.perf_counter()
            for _ in handle.completions.remote(body, None):
                pass
            return time.perf_counter() - t

        http_lat, handle_lat = [], []
        for _ in range(100):
            http_lat.append(post("tiny:a0", prompts[1], 4)[0])
            handle_lat.append(via_handle())

        # the same HTTP hop through Ray Serve LLM's stock OpenAI ingress (base model: its
        # ingress cannot load adapters from a local store), beside ours on the same request
        from ray.serve.llm import build_openai_app

        from serve.app import llm_config_for

        stock_cfg = llm_config_for(
            cfg.models[0], resolve(cfg, environ={}).model_sources[cfg.models[0].id]
        )
        serve.run(
            build_openai_app({"llm_configs": [stock_cfg]}),
            name="stock",
            route_prefix="/stock",
            blocking=False,
        )
        stock_url = f"http://127.0.0.1:{PORT}/stock/v1/completions"
        post("tiny", prompts[1], 4, url=stock_url)
        ours_base, stock_base = [], []
        for _ in range(100):
            ours_base.append(post("tiny", prompts[1], 4)[0])
            stock_base.append(post("tiny", prompts[1], 4, url=stock_url)[0])
        serve.delete("stock")

        def pct(xs, q):
            return statistics.quantiles(xs, n=100)[q - 1]

        report = {
            "throughput": {
                "ratio": serve_tps / direct_tps,
                "serve_tokens_per_s": serve_tps,
                "direct_tokens_per_s": direct_tps,
                # not the target's anchor: how much of the gap is 16 clients vs one big batch
                "direct_16_concurrent_tokens_per_s": conc_tps,
                "ratio_vs_direct_16_concurrent": serve_tps / conc_tps,
            },
            "ingress_overhead": {
                "p50_ratio": pct(http_lat, 50) / pct(handle_lat, 50),
                "p99_ratio": pct(http_lat, 99) / pct(handle_lat, 99),
                "http_p50_ms": 1000 * pct(http_lat, 50),
                "handle_p50_ms": 1000 * pct(handle_lat, 50),
                "http_p99_ms": 1000 * pct(http_lat, 99),
                "handle_p99_ms": 1000 * pct(handle_lat, 99),
                # not the target's anchor: lorafleet's ingress vs Ray's stock one, both over HTTP
                "p50_ratio_vs_ray_stock_ingress": pct(ours_base, 50) / pct(stock_base, 50),
                "ours_base_model_p50_ms": 1000 * pct(ours_base, 50),
                "ray_stock_ingress_p50_ms": 1000 * pct(stock_base, 50),
            },
            "adapter_load": {
                "ratio": statistics.median(cold) / statistics.median(warm),
                "cold_ms": [round(1000 * c) for c in cold],
                "warm_ms": [round(1000 * w) for w in warm],
            },
        }
        print(json.dumps(report, indent=2))
        print(
            f"serve throughput ratio {report['throughput']['ratio']:.3f} (target >= 0.9; "
            f"{report['throughput']['ratio_vs_direct_16_concurrent']:.3f} against in-process vLLM "
            f"fed by 16 concurrent requests); "
            f"ingress p50 ratio {report['ingress_overhead']['p50_ratio']:.3f} (target <= 1.10), "
            f"p99 {report['ingress_overhead']['p99_ratio']:.3f}, "
            f"p50 vs Ray's stock ingress "
            f"{report['ingress_overhead']['p50_ratio_vs_ray_stock_ingress']:.3f}; "
            f"cold/warm adapter {report['adapter_load']['ratio']:.2f}"
        )
        serve.delete("bench")
        serve.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
