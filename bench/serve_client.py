"""What the serve benches send: an HTTP client of the app (its key, its pool, one completion
timed), the percentile they report, and the tail load (closed-loop clients mixing the experiment,
named adapters and the base). `bench.serve_modes` runs its phases with it and `bench.serve_tail`
investigates the tail load with it; it imports neither."""

from __future__ import annotations

import random
import threading
import time

from bench.serve import ADAPTERS, MAX_TOKENS, PORT

URL = f"http://127.0.0.1:{PORT}"
TAIL_CLIENTS = 64
EXPERIMENT = "bot"


# lorafleet's apps run with an API key, as a deployment would (http.mode haproxy refuses to start
# open); stock Ray Serve LLM has no keys and ignores the header
BENCH_KEY = "sk-bench-0123456789"


def new_session():
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


# --- the tail load ----------------------------------------------------------------------------


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


# --- what the ingress adds to a request for an experiment (python -m bench.serve --experiment-latency)

EXPERIMENT_ROUNDS = 5  # interleaved rounds
EXPERIMENT_N = 100  # requests of each kind per round


def _deploy_experiment_app(root):
    """The demo-shaped model with the 4 adapters and experiment `bot` (x: a0 80%, y: a1 20%),
    built by `serve.app.build_app` with an API key, deployed on a local Ray in this process."""
    from ray import serve

    from bench.serve import model_entry
    from cluster.config.load import load_config
    from cluster.config.serve import ServeAppConfig
    from cluster.ray_connect import ensure_ray
    from serve.app import build_app, resolve

    variants = [
        {"name": "x", "model": "tiny", "adapter": "a0", "weight": 80},
        {"name": "y", "model": "tiny", "adapter": "a1", "weight": 20},
    ]
    raw = {
        "name": "bench",
        "models": [model_entry(root / "models" / "demo")],
        "experiments": [{"name": EXPERIMENT, "variants": variants}],
        "http": {"port": PORT, "mode": "throughput"},
        "storage": {"root": str(root)},
        "ray": {"num_cpus": 4},
    }
    cfg = load_config(None, raw, ServeAppConfig)
    ensure_ray(cfg.ray, log=lambda *_: None, serve_mode="throughput")
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    app = build_app(cfg, resolve(cfg, environ={cfg.http.api_keys_env: BENCH_KEY}))
    serve.run(app, name="bench", route_prefix="/", blocking=False)
    session = new_session()
    deadline = time.time() + 300
    while not all(_ok(session, m) for m in ("tiny:a0", EXPERIMENT)):
        if time.time() > deadline:
            raise RuntimeError("the bench app did not answer within 300 s")
        time.sleep(1)
    return session


def _ok(session, model) -> bool:
    try:
        return post(session, model, "hi", 1, timeout=20)[3] == 200
    except Exception:
        return False


def _experiment_round(session, users, prompt, n, rng) -> dict:
    """`n` one-token requests to the experiment and `n` to the anchor, in pairs (which goes
    first alternates); both p50s, their ratio, and the median of the pairs' differences (what a
    load that drifts during the round moves least)."""
    exp, anchor = [], []
    for i in range(n):
        pair = [users[rng.randrange(len(users))], None]
        for user in pair if i % 2 == 0 else pair[::-1]:
            dt, _, _, status = post(
                session, EXPERIMENT if user else "tiny:a0", prompt, 1, user=user
            )
            if status != 200:
                raise RuntimeError(f"{EXPERIMENT if user else 'tiny:a0'} answered {status}")
            (exp if user else anchor).append(1000 * dt)
    row = {"exp_p50_ms": pct(exp, 50), "anchor_p50_ms": pct(anchor, 50)}
    row["paired_diff_ms"] = pct([e - a for e, a in zip(exp, anchor, strict=True)], 50)
    return row | {"ratio": row["exp_p50_ms"] / row["anchor_p50_ms"]}


def experiment_latency(rounds: int, n: int) -> dict:
    """What the ingress adds to a request for an experiment. One lorafleet app (http.mode
    throughput, an API key); in each round, `n` short completions to experiment `bot` (users of
    its variant x, so adapter a0) alternate, one for one, with `n` to `tiny:a0` by name: the
    anchor, the same adapter, engine and HTTP path without the experiment's routing and response
    id. Each round's p50s and their ratio; over the rounds the median ratio with its spread
    (min-max), the median difference in ms, and the median of the pairs' differences."""
    import os
    import shutil
    import statistics
    import tempfile
    from pathlib import Path

    import ray

    from bench.serve import _build, _prompts
    from serve.experiments import Table

    table = Table(["x", "y"], [80, 20])  # the app's experiment as configured (never re-weighted)
    users = [u for u in (f"u{i}" for i in range(400)) if table.assign(EXPERIMENT, u, None) == "x"]
    prompt = _prompts()[1]
    root = Path(tempfile.mkdtemp(prefix="lorafleet-bench-exp-"))
    rows = []
    try:
        _build(root)
        session = _deploy_experiment_app(root)
        body = {"model": EXPERIMENT, "prompt": prompt, "max_tokens": 1, "user": users[0]}
        r = session.post(f"{URL}/v1/completions", json=body, timeout=60)
        rid = r.headers.get("X-Lorafleet-Response-Id", "")  # which code answered: its id's form
        rng = random.Random(0)
        _experiment_round(session, users, prompt, 20, rng)  # warm both paths
        for r in range(rounds):
            rows.append(_experiment_round(session, users, prompt, n, rng))
            print(
                f"[bench.serve] round {r}: experiment p50 {rows[-1]['exp_p50_ms']:.1f} ms, "
                f"anchor (tiny:a0) p50 {rows[-1]['anchor_p50_ms']:.1f} ms, ratio "
                f"{rows[-1]['ratio']:.3f}, paired difference {rows[-1]['paired_diff_ms']:.1f} ms",
                flush=True,
            )
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    ratios = [x["ratio"] for x in rows]
    med = statistics.median
    return {
        "rounds": rounds,
        "n_per_round": n,
        "ratio_median": med(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "diff_ms_median": med(x["exp_p50_ms"] - x["anchor_p50_ms"] for x in rows),
        "paired_diff_ms_median": med(x["paired_diff_ms"] for x in rows),
        "paired_diff_ms_min": min(x["paired_diff_ms"] for x in rows),
        "paired_diff_ms_max": max(x["paired_diff_ms"] for x in rows),
        "exp_p50_ms_median": med(x["exp_p50_ms"] for x in rows),
        "anchor_p50_ms_median": med(x["anchor_p50_ms"] for x in rows),
        "response_id_example": rid,
        "loadavg_after": os.getloadavg(),
        "per_round": rows,
    }


if __name__ == "__main__":
    import sys

    from bench.serve import _write

    args = sys.argv[1:]
    if not args or args[0] != "--experiment-latency":
        raise SystemExit("usage: python -m bench.serve --experiment-latency [rounds] [n]")
    a = [int(x) for x in args[1:]]
    s = experiment_latency(a[0] if a else EXPERIMENT_ROUNDS, a[1] if len(a) > 1 else EXPERIMENT_N)
    print(
        f"[bench.serve] experiment / anchor p50: median {s['ratio_median']:.3f} (min "
        f"{s['ratio_min']:.3f}, max {s['ratio_max']:.3f}) over {s['rounds']} rounds of "
        f"{s['n_per_round']}; median difference {s['diff_ms_median']:.1f} ms; paired difference "
        f"{s['paired_diff_ms_median']:.1f} ms (min {s['paired_diff_ms_min']:.1f}, max "
        f"{s['paired_diff_ms_max']:.1f}); experiment p50 "
        f"{s['exp_p50_ms_median']:.1f} ms, anchor {s['anchor_p50_ms_median']:.1f} ms; a "
        f"response id: {s['response_id_example']}"
    )
    _write(s, "experiment-latency")
