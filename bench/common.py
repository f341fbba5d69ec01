"""What the training benches share: the repo root, the step count and threads every training
bench runs with, and the demo job they all measure (`bench.run`, `bench.tune_asha`,
`bench.gpu_qlora` import it; it imports no other bench)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEPS = 60
THREADS = 2


def demo_cfg(tmp: Path, **over):
    """configs/demo.yaml on the 'last' task's data in `tmp`, 1 worker of THREADS CPUs, STEPS
    steps, its store in `tmp`, the demo base built once under the repo's lorafleet-runs; `over`:
    dotted overrides on top."""
    from cluster.config.load import load_config
    from cluster.config.validation import with_overrides
    from train.demo import write_task_data

    data = write_task_data("last", tmp / "data")
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    base = {
        "name": "bench",
        "data.path": str(data["train"]),
        "storage.root": str(tmp / "store"),
        "scaling.num_workers": 1,
        "scaling.resources_per_worker": {"CPU": THREADS},
        "training.max_steps": STEPS,
        "training.eval_every_steps": STEPS,
        "training.log_every_steps": 10,
        "training.eval_max_batches": 1,
        "ray.num_cpus": 4,
    }
    # the demo base lives under the repo's storage root; build it there once, as the demo does
    base["model.base"] = "tiny://demo"
    cfg = with_overrides(cfg, base | over)
    from train.model import resolve_base

    return resolve_base(
        with_overrides(cfg, {"storage.root": str(ROOT / "lorafleet-runs")})
    ).model_copy(update={"storage": cfg.storage})
