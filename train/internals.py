"""Every private piece of Ray Train and DeepSpeed that lorafleet's train package uses, in one
place, each checked before it is used:

- Ray Train V2's execution context module, whose logger repeats every report we print
  (`quiet_report_logger`); read from Ray RAY_VERSION.
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


def check_zero3_optimizer(optimizer) -> None:
    """Raise RayVersionError unless DeepSpeed's ZeRO-3 optimizer has the private methods
    train/zero.py calls (asked of the optimizer the engine built, before the first call)."""
    import deepspeed

    require(
        type(optimizer), ZERO3_PRIVATE, type(optimizer).__name__, "DeepSpeed", deepspeed.__version__
    )
