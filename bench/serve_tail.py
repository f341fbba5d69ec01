"""Where the tail-latency load's slow requests wait (issue 11, item 5): the load of
`bench.serve_client.tail` on an app with the demo's autoscaling, sampled every second: the LLM
deployment's replicas by state, the requests queued in the ingress's router for a replica
(`serve_deployment_queued_queries`), the ones each replica holds (`serve_replica_processing_queries`),
and vLLM's own running and waiting queues. Run by bench/serve.py:

    .venv/bin/python -m bench.serve --tail-demo
"""

from __future__ import annotations

import re
import threading
import time

from bench.serve_client import pct, tail

METRICS = {
    "router_queued": "ray_serve_deployment_queued_queries",
    "replica_processing": "ray_serve_replica_processing_queries",
    # vLLM's own queues (Ray exports vllm:* with ":" made "_")
    "vllm_running": "ray_vllm_num_requests_running",
    "vllm_waiting": "ray_vllm_num_requests_waiting",
}
LINE = re.compile(r"^([a-zA-Z_:]+)\{([^}]*)\}\s+([0-9.eE+-]+)")


def _scrape(port: int) -> dict[str, float]:
    """Sum of each metric above over the LLM deployment's series."""
    import requests

    out = dict.fromkeys(METRICS, 0.0)
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except Exception:
        return out
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        for key, name in METRICS.items():
            if m.group(1).replace(":", "_") == name and (
                "Server" in m.group(2) or key.startswith("vllm")
            ):
                out[key] += float(m.group(3))
    return out


def _replicas() -> dict[str, int]:
    from ray import serve

    states: dict[str, int] = {}
    for app in serve.status().applications.values():
        for name, d in app.deployments.items():
            if "Server" in name:
                for state, n in d.replica_states.items():
                    states[str(state).rsplit(".", 1)[-1]] = n
    return states


def sampler(samples: list[dict]):
    """A function that samples every second until its deadline (run by `tail` in its thread)."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    t0 = time.time()

    def run(deadline):
        while time.time() < deadline:
            try:
                replicas = _replicas()
            except Exception as e:
                replicas = {"error": repr(e)[:80]}
            samples.append({"t": round(time.time() - t0, 1), "replicas": replicas} | _scrape(port))
            time.sleep(1)
        return samples

    return run


def _windows(out: list[dict], t0: float, width_s: float = 10) -> list[dict]:
    """The requests by the window they started in: count, p50, p99, max, non-200."""
    rows = []
    end = max((r["t"] for r in out), default=t0)
    w = 0.0
    while t0 + w <= end:
        inside = [r for r in out if t0 + w <= r["t"] < t0 + w + width_s]
        ok = [r["s"] for r in inside if r["status"] == 200]
        rows.append(
            {
                "start_s": w,
                "n": len(inside),
                "p50_s": round(pct(ok, 50), 2) if ok else None,
                "p99_s": round(pct(ok, 99), 2) if ok else None,
                "max_s": round(max(ok), 2) if ok else None,
                "not_200": len(inside) - len(ok),
            }
        )
        w += width_s
    return rows


def investigate(session, prompts, opts: dict) -> dict:
    """The tail load for `opts["duration_s"]`, with the samples and the per-window latencies."""
    samples: list[dict] = []
    t0 = time.time()
    summary, out, _ = tail(session, prompts, opts.get("duration_s", 75), sampler=sampler(samples))
    slow = sorted(out, key=lambda r: -r["s"])[:10]
    return {
        "tail": summary,
        "windows": _windows(out, t0),
        "samples": samples,
        "slowest": [{k: (round(v - t0, 1) if k == "t" else v) for k, v in r.items()} for r in slow],
        "threads": threading.active_count(),
    }
