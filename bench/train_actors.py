"""What one training run costs beside its own worker: Ray Train's stock setup against lorafleet's.

    python -m bench.train_actors            # also: make bench (as `train_actors`)

Ray Train starts, for every run, a controller and helper actors, each a process of its own. Two
of them do nothing for lorafleet's local runs: the DatasetManager (hands out Ray Dataset shards;
lorafleet's workers read their own data) and the preemption watcher (polls for nodes an
autoscaler drains; a local Ray has none). lorafleet leaves both out there
(train/internals.py `lean_torch_trainer`, cluster/ray_connect.py).

Each side runs in a fresh process with a local Ray of its own (the watcher is set when Ray
starts), interleaved stock, lean, stock, lean... over 3 or more repeats. In each, a first run
warms the caches, then 2 short 1-worker runs of the demo job are measured: wall seconds and the
whole machine's CPU-seconds (every Ray process, the driver, the daemons). Printed: the medians,
the ratio stock / lean of CPU-seconds per run (above 1: lean spends less), and the actor classes
each side started.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/train_actors.py`

from bench.common import ROOT, demo_cfg  # noqa: E402

RUN_STEPS = 4
MEASURED = 2


def _machine_cpu_s() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0)


def child(variant: str) -> dict:
    """One side: a local Ray of its own, a warm-up run, then MEASURED runs."""
    if variant == "stock":
        os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"  # Ray's default
    import train.internals
    from cluster.ray_connect import ensure_ray, state_api_address
    from train.trainer import build_trainer

    if variant == "stock":
        from ray.train.torch import TorchTrainer

        train.internals._LEAN_TRAINER = TorchTrainer
    from ray.util.state import list_actors

    walls, cpus = [], []
    with tempfile.TemporaryDirectory() as tmp:
        over = {
            "training.max_steps": RUN_STEPS,
            "training.eval_every_steps": RUN_STEPS,
            "training.warmup_steps": 0,
        }
        cfg = demo_cfg(Path(tmp), **over)
        ensure_ray(cfg.ray, log=lambda *_: None)
        for i in range(MEASURED + 1):
            name = f"{variant}{i}"
            c0, t0 = _machine_cpu_s(), time.perf_counter()
            build_trainer(cfg.model_copy(update={"name": name}), run_id=name).fit()
            if i:  # the first run warms the caches
                walls.append(time.perf_counter() - t0)
                cpus.append(_machine_cpu_s() - c0)
        actors = sorted({a.class_name for a in list_actors(address=state_api_address())})
    return {"wall_s": walls, "cpu_s": cpus, "actors": actors}


def _side(variant: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.train_actors", "--child", variant],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{variant} side failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_train_actors(repeats: int = 3) -> float:
    sides: dict[str, list[dict]] = {"stock": [], "lean": []}
    for _ in range(repeats):  # interleaved: drift in machine load hits both alike
        for variant in sides:
            sides[variant].append(_side(variant))
    med = {
        v: {k: statistics.median(x for r in rs for x in r[k]) for k in ("wall_s", "cpu_s")}
        for v, rs in sides.items()
    }
    ratios = sorted(
        statistics.median(s["cpu_s"]) / statistics.median(ln["cpu_s"])
        for s, ln in zip(sides["stock"], sides["lean"], strict=True)
    )
    ratio = med["stock"]["cpu_s"] / med["lean"]["cpu_s"]
    extra = sorted(set(sides["stock"][0]["actors"]) - set(sides["lean"][0]["actors"]))
    print(
        f"train_actors: a {RUN_STEPS}-step 1-worker run, stock Ray Train "
        f"{med['stock']['cpu_s']:.1f} CPU-s ({med['stock']['wall_s']:.1f} s wall) vs lorafleet "
        f"{med['lean']['cpu_s']:.1f} CPU-s ({med['lean']['wall_s']:.1f} s wall) -> CPU ratio "
        f"{ratio:.2f} (target > 1); per-repeat ratios {', '.join(f'{r:.2f}' for r in ratios)}; "
        f"actors only stock starts: {', '.join(extra) or 'none'}"
    )
    return ratio


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2])))
    else:
        bench_train_actors(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
