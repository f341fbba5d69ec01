"""The tables `python -m bench.serve` prints: every target as a ratio to vLLM in process."""

from __future__ import annotations

ROLES = [
    "client+driver",
    "client+frontend",
    "proxy",
    "haproxy",
    "ingress router",
    "ingress replica",
    "llm server replica",
    "vllm engine core",
    "state replicas",
    "controller",
    "raylet/gcs",
    "dashboard/agents",
    "ray other",
]


def _cell(value, anchor, fmt="{:.0f}") -> str:
    if value is None:
        return "-"
    return f"{fmt.format(value)} ({value / anchor:.2f}x)" if anchor else fmt.format(value)


def _main_rows(results: list[dict]) -> list[str]:
    a = results[0]
    a_tp, a_lat = a["throughput"], a["latency"]
    a_cpu = sum(a_tp["cpu_s_per_request"].values())
    head = (
        f"{'target':24}{'tok/s (x batch, x 16-conc)':30}{'p50 ms':16}{'p99 ms':16}"
        f"{'TTFT p50 ms':16}{'CPU ms/req':16}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            rows.append(f"{r['label']:24}error: {r['error'].strip().splitlines()[-1][:110]}")
            continue
        tp, lat = r["throughput"]["tokens_per_s"], r["latency"]
        cpu = 1000 * sum(r["throughput"]["cpu_s_per_request"].values())
        tps = f"{tp:.0f} ({tp / a_tp['batch_tokens_per_s']:.2f}x, {tp / a_tp['tokens_per_s']:.2f}x)"
        rows.append(
            f"{r['label']:24}{tps:30}{_cell(lat['p50_ms'], a_lat['p50_ms']):16}"
            f"{_cell(lat['p99_ms'], a_lat['p99_ms']):16}"
            f"{_cell(lat['ttft_p50_ms'], a_lat['ttft_p50_ms']):16}{_cell(cpu, 1000 * a_cpu):16}"
        )
    batch = a_tp["batch_tokens_per_s"]
    rows.append(f"(vLLM in process, all 192 prompts as one batch: {batch:.0f} tok/s)")
    return rows


def _cpu_rows(results: list[dict]) -> list[str]:
    ok = [r for r in results if "error" not in r]
    roles = [x for x in ROLES if any(x in r["throughput"]["cpu_s_per_request"] for r in ok)]
    roles += sorted({k for r in ok for k in r["throughput"]["cpu_s_per_request"]} - set(roles))
    head = f"{'CPU ms per request':24}" + "".join(f"{x[:13]:>14}" for x in roles)
    rows = [head, "-" * len(head)]
    for r in ok:
        split = r["throughput"]["cpu_s_per_request"]
        cells = "".join(f"{1000 * split[x]:14.1f}" if x in split else f"{'':14}" for x in roles)
        rows.append(f"{r['label']:24}{cells}")
    return rows


def _tail_rows(results: list[dict]) -> list[str]:
    head = f"{'tail: 64 clients, mixed':24}{'requests':>10}{'p50 ms':>10}{'p99 ms':>10}"
    head += f"{'max ms':>10}  statuses"
    rows = [head, "-" * len(head)]
    for r in results:
        t = r.get("tail")
        if t:
            rows.append(
                f"{r['label']:24}{t['requests']:10}{t['p50_ms']:10.0f}{t['p99_ms']:10.0f}"
                f"{t['max_ms']:10.0f}  {t['statuses']}"
            )
    return rows


def table(results: list[dict]) -> str:
    """Three tables: the figures as ratios to vLLM in process, the CPU split by process role
    during the throughput phase, and the tail load per lorafleet mode."""
    return "\n".join(["", *_main_rows(results), "", *_cpu_rows(results), "", *_tail_rows(results)])
