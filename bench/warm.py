"""Warm adapters: the first request a new vLLM replica answers for an adapter, when the replica
loaded it on that request (cold) against when it preloaded it before taking traffic because an
experiment names it (serve/server.py `preload`). Both measured in this run, on fresh apps of the
same model, adapter and prompt; each also against the same request once warm.

    .venv/bin/python -m bench.warm
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.serve import _build, _prompts, model_entry

PORT = 18433
ROUNDS = 3


def _app(base: Path, root: Path, experiments: list[dict]):
    from cluster.config.load import load_config
    from cluster.config.serve import ServeAppConfig

    raw = {
        "name": "warm",
        "models": [model_entry(base)],
        "experiments": experiments,
        "http": {"port": PORT},
        "storage": {"root": str(root)},
        "ray": {"num_cpus": 4},
    }
    return load_config(None, raw, ServeAppConfig)


def first_requests(cfg, prompt: str) -> tuple[float, float]:
    """(first request's seconds, median of the next 5) for tiny:a0 on a freshly deployed app."""
    import requests
    from ray import serve

    from serve.app import build_app, resolve

    serve.run(
        build_app(cfg, resolve(cfg, environ={})), name="warm", route_prefix="/", blocking=False
    )
    url = f"http://127.0.0.1:{PORT}/v1/completions"
    body = {"model": "tiny:a0", "prompt": prompt, "max_tokens": 1, "temperature": 0}

    def post() -> float:
        t = time.perf_counter()
        requests.post(url, json=body, timeout=300).raise_for_status()
        return time.perf_counter() - t

    first = post()
    after = statistics.median(post() for _ in range(5))
    serve.delete("warm")
    return first, after


def main() -> None:
    from ray import serve

    from cluster.ray_connect import ensure_ray

    root = Path(tempfile.mkdtemp(prefix="lorafleet-bench-warm-"))
    try:
        base = _build(root)
        prompt = _prompts()[0]
        exp = [
            {
                "name": "bot",
                "variants": [{"name": "a", "model": "tiny", "adapter": "a0", "weight": 1}],
            }
        ]
        cold_cfg, warm_cfg = _app(base, root, []), _app(base, root, exp)
        ensure_ray(cold_cfg.ray, log=lambda *_: None)
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        cold, warm = [], []
        for _ in range(ROUNDS):  # interleaved: the machine's noise hits both alike
            cold.append(first_requests(cold_cfg, prompt))
            warm.append(first_requests(warm_cfg, prompt))
        serve.shutdown()
        c = statistics.median(x for x, _ in cold)
        w = statistics.median(x for x, _ in warm)
        report = {
            "first_request_cold_over_preloaded": c / w,
            "cold_first_ms": [round(1000 * x) for x, _ in cold],
            "preloaded_first_ms": [round(1000 * x) for x, _ in warm],
            "warm_after_ms": [round(1000 * y) for _, y in cold + warm],
        }
        print(json.dumps(report, indent=2))
        print(
            f"first request on a new replica: cold / preloaded {c / w:.2f} "
            f"(cold {1000 * c:.0f} ms, preloaded {1000 * w:.0f} ms)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
