"""The adapter store at 100, 1,000 and 10,000 adapters, on the S3 server on loopback (moto, as the
tests start it) and on a local disk: storage requests per refresh of a serving replica's store
(serve/store.py) with nothing changed and with one promote, the refresh's time, and the time of
the listing behind /v1/models and `lorafleet adapters list` (`versions.listing`). The anchor is
the store without its index (an older root: every pointer read), at 100 and 1,000 adapters.

Requests on S3 are counted in the server's own request log; on a local disk, by a counting
wrapper around cluster/store/storage.py's read calls. Adapters are populated the cheap way
(`tests.helpers.toolbox.fake_adapters`: one lorafleet.json and one pointer each), plus one real
adapter with two published versions that each round promotes back and forth. Repeats are
interleaved (no-change and one-change refreshes alternate); each time is the median with its
min-max spread. The ingress's 404-vs-served p50 needs vLLM and is not measured here.

    .venv/bin/python -m bench.store_scale [--sizes 100,1000,10000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

OLD = "20261201-000000-000-0000"
ANCHOR_MAX = 1000  # the no-index anchor lists every pointer: run up to this many adapters
READS = ("read_tagged", "read_text", "listdir", "exists", "files")


class LocalCounter:
    """Counts calls of storage.py's read functions (a local disk has no request log)."""

    def __init__(self):
        from cluster.store import storage

        self.n = 0
        for name in READS:
            real = getattr(storage, name)

            def counted(*a, _real=real, **k):
                self.n += 1
                return _real(*a, **k)

            setattr(storage, name, counted)

    def count(self, fn):
        start = self.n
        fn()
        return self.n - start, []


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.1f} ({min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f})"


def _adapter(tmp: Path, n: int) -> Path:
    src = tmp / f"src{n}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (src / "adapter_model.safetensors").write_bytes(bytes(64))
    return src


def measure(root: str, size: int, counter, rounds: int, tmp: Path) -> dict:
    from cluster.store import versions
    from serve.store import AdapterStore
    from tests.helpers.toolbox import fake_adapters

    t0 = time.perf_counter()
    fake_adapters(root, [f"a{i:05d}" for i in range(size)], OLD)
    v = [versions.publish(_adapter(tmp, n), root, "live", {"n": n}) for n in (1, 2)]
    populate_s = time.perf_counter() - t0
    store = AdapterStore(root, ttl_s=3600)

    def refresh():
        return asyncio.run(store.current(refresh=True))

    t0 = time.perf_counter()
    assert len(refresh()) == size + 1
    first_s = time.perf_counter() - t0
    same_n, change_n, same_t, change_t, list_t = [], [], [], [], []
    for r in range(rounds):
        versions.promote(root, "live", v[r % 2])
        for kind in ("change", "same") if r % 2 else ("same", "change"):
            if kind == "same":
                refresh()  # take the promote in first, so this one sees nothing new
                t = time.perf_counter()
                n, _ = counter.count(refresh)
                same_t.append(time.perf_counter() - t)
                same_n.append(n)
            else:
                versions.promote(root, "live", v[(r + 1) % 2])
                t = time.perf_counter()
                n, _ = counter.count(refresh)
                change_t.append(time.perf_counter() - t)
                change_n.append(n)
        t = time.perf_counter()
        assert len(versions.listing(root)) == size + 1
        list_t.append(time.perf_counter() - t)
    row = {
        "adapters": size,
        "requests_same": statistics.median(same_n),
        "requests_change": statistics.median(change_n),
        "refresh_same_ms": _spread(same_t),
        "refresh_change_ms": _spread(change_t),
        "listing_ms": _spread(list_t),
        "first_load_s": round(first_s, 2),
        "populate_s": round(populate_s, 1),
    }
    if size <= ANCHOR_MAX:  # the anchor: the same root without its index, every pointer read
        from cluster.store import index, storage

        storage.delete_file(index.index_uri(root))
        old = AdapterStore(root, ttl_s=3600)
        asyncio.run(old.current(refresh=True))  # metadata read once, as a warm replica has
        times, counts = [], []
        for _ in range(3):
            t = time.perf_counter()
            n, _ = counter.count(lambda: asyncio.run(old.current(refresh=True)))  # noqa: B023
            times.append(time.perf_counter() - t)
            counts.append(n)
        row["anchor_requests"] = statistics.median(counts)
        row["anchor_refresh_ms"] = _spread(times)
    return row


def main() -> None:
    import logging

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    from tests.helpers.toolbox import S3RequestLog, start_s3_server

    server, env = start_s3_server("fleet")
    os.environ.update(env)
    logging.getLogger("werkzeug").handlers.clear()  # counted, not printed
    logging.getLogger("werkzeug").propagate = False
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            local = LocalCounter()
            for size in sizes:
                token = f"scale{size}-{uuid.uuid4().hex[:6]}"
                with S3RequestLog(token) as log:
                    row = measure(f"s3://fleet/{token}/adapters", size, log, args.rounds, tmp)
                rows.append({"store": "s3 (moto)", **row})
                print(rows[-1], flush=True)
                row = measure(str(tmp / f"local{size}" / "adapters"), size, local, args.rounds, tmp)
                rows.append({"store": "local", **row})
                print(rows[-1], flush=True)
    finally:
        server.stop()
    head = (
        "| store | adapters | requests, nothing changed | requests, one promote | refresh ms, "
        "nothing changed | refresh ms, one promote | listing ms (/v1/models, adapters list) | "
        "without the index: requests / refresh ms |"
    )
    lines = [head, "|" + " --- |" * 8]
    for r in rows:
        anchor = (
            f"{r['anchor_requests']:.0f} / {r['anchor_refresh_ms']}"
            if "anchor_requests" in r
            else "not run"
        )
        lines.append(
            f"| {r['store']} | {r['adapters']:,} | {r['requests_same']:.0f} | "
            f"{r['requests_change']:.0f} | {r['refresh_same_ms']} | {r['refresh_change_ms']} | "
            f"{r['listing_ms']} | {anchor} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(__file__).with_name("results")
    out.mkdir(exist_ok=True)
    (out / "store_scale.json").write_text(json.dumps(rows, indent=2))
    (out / "store_scale.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
