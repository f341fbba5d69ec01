"""Every private piece of Ray Train and DeepSpeed that lorafleet's train package uses, in one
place, each checked before it is used:

- Ray Train V2's execution context module, whose logger repeats every report we print
  (`quiet_report_logger`); read from Ray RAY_VERSION.
- Ray Train V2's `DataParallelTrainer._create_default_callbacks` and its `DatasetsCallback`,
  which starts a DatasetManager actor for every run, with Ray Datasets or without
  (`lean_torch_trainer`); read from Ray RAY_VERSION.
- DeepSpeed ZeRO-3's `_set_fp32_optimizer_param_groups` / `_clear_fp32_optimizer_param_groups`,
  which attach the fp32 partitions to the inner torch optimizer around its state_dict (train/zero.py
  calls them to checkpoint the optimizer); read from the DeepSpeed that pyproject.toml pins.

A Ray or DeepSpeed without them fails with RayVersionError naming the version found.
"""

from __future__ import annotations

import logging

from cluster.ray_version import check_ray_version, require

ZERO3_PRIVATE = ("_set_fp32_optimizer_param_groups", "_clear_fp32_optimizer_param_groups")


def quiet_report_logger() -> None:
    """One line per report from us is enough: Ray Train's own per-report INFO line repeats it."""
    import ray

    check_ray_version(who="lorafleet train")
    from ray.train.v2._internal.execution import context as train_context

    require(
        train_context,
        ("logger",),
        "ray.train.v2._internal.execution.context",
        "Ray",
        ray.__version__,
    )
    train_context.logger.setLevel(logging.WARNING)


_LEAN_TRAINER = None


def lean_torch_trainer():
    """Ray's TorchTrainer, less the DatasetManager actor when the run passes no Ray Dataset
    (lorafleet's workers read their own data, train/data.py). Ray Train starts that actor for
    every run, to hand out dataset shards; without datasets it hands out nothing, and it costs a
    process start per run (`python -m bench.train_actors`: with the preemption watcher that a
    local Ray leaves out too, 2.8 of a short run's 18.8 CPU-seconds)."""
    global _LEAN_TRAINER
    if _LEAN_TRAINER is not None:
        return _LEAN_TRAINER
    import ray

    check_ray_version(who="lorafleet train")
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal import callbacks

    require(
        callbacks, ("DatasetsCallback",), "ray.train.v2._internal.callbacks", "Ray", ray.__version__
    )
    require(TorchTrainer, ("_create_default_callbacks",), "TorchTrainer", "Ray", ray.__version__)

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            made = super()._create_default_callbacks()
            if self.datasets:
                return made
            return [c for c in made if not isinstance(c, callbacks.DatasetsCallback)]

    _LEAN_TRAINER = LeanTorchTrainer
    return LeanTorchTrainer


def check_zero3_optimizer(optimizer) -> None:
    """Raise RayVersionError unless DeepSpeed's ZeRO-3 optimizer has the private methods
    train/zero.py calls (asked of the optimizer the engine built, before the first call)."""
    import deepspeed

    require(
        type(optimizer), ZERO3_PRIVATE, type(optimizer).__name__, "DeepSpeed", deepspeed.__version__
    )
