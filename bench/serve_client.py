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
