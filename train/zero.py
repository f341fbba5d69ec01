"""DeepSpeed ZeRO as the training strategy (`scaling.strategy: deepspeed`).

The DeepSpeed config is generated from the job YAML (`ds_config`): micro-batch per worker,
accumulation, clipping, precision (as DeepSpeed's torch autocast, so the fp32 LoRA weights and
the quantized base are never cast) and the ZeRO stage; `scaling.deepspeed.config` names a JSON
file merged over it. The engine wraps our model and torch optimizer over the gloo/NCCL process
group Ray Train already set up.

Two ZeRO facts shape the rest. Under ZeRO-3 a rank holds only a slice of each parameter, so a
plain `save_pretrained` writes empty tensors (the known "40-byte adapter"; ZeRO-3 keeps tensors
under `stage3_param_persistence_threshold`, 1e5 elements, whole, so it bites once LoRA matrices
outgrow that): the adapter is read inside `GatheredParameters`, on every rank, and rank 0
writes it. Under ZeRO-2 and 3 each rank
holds only its slice of the optimizer state and fp32 master weights, so every rank writes its
own shard (`zero_rank<r>.pt`, tensors only) into the same Ray checkpoint directory.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

# sections that come from `training`, never from the JSON file
REFUSED = ("optimizer", "scheduler", "fp16", "bf16")
SHARD = "zero_rank{rank}.pt"


def ds_config(cfg, world: int, amp: torch.dtype | None, override: dict | None = None) -> dict:
    """The DeepSpeed config for this job on `world` workers; `amp` is the autocast dtype."""
    t = cfg.training
    conf = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.batch_size * t.grad_accum_steps * world,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "zero_optimization": {"stage": cfg.scaling.deepspeed.stage},
        "torch_autocast": {
            "enabled": amp is not None,
            "dtype": str(amp or torch.bfloat16).removeprefix("torch."),
        },
        "steps_per_print": 10**9,  # the loop reports progress itself
        "wall_clock_breakdown": False,
    }
    return _merge(conf, override or {})


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def override_problems(override, cfg, source: str) -> list[str]:
    """What in a JSON override contradicts the YAML, one line each."""
    key = f"scaling.deepspeed.config ({source})"
    if not isinstance(override, dict):
        return [f"{key}: expected a JSON object. Got {type(override).__name__} instead"]
    t = cfg.training
    owned = {
        "train_micro_batch_size_per_gpu": (t.batch_size, "training.batch_size"),
        "gradient_accumulation_steps": (t.grad_accum_steps, "training.grad_accum_steps"),
        "train_batch_size": (
            t.batch_size * t.grad_accum_steps * cfg.scaling.num_workers,
            "training.batch_size x training.grad_accum_steps x scaling.num_workers",
        ),
    }
    problems = [
        f"{key}: '{k}' comes from {where} ({want}); the file may repeat it, not change it. "
        f"Got {override[k]!r} instead"
        for k, (want, where) in owned.items()
        if k in override and override[k] != want
    ]
    zero = override.get("zero_optimization")
    stage = zero.get("stage", cfg.scaling.deepspeed.stage) if isinstance(zero, dict) else None
    if stage != cfg.scaling.deepspeed.stage:
        problems.append(
            f"{key}: zero_optimization.stage comes from scaling.deepspeed.stage "
            f"({cfg.scaling.deepspeed.stage}). Got {stage!r} instead"
        )
    problems += [
        f"{key}: a '{k}' section is not allowed: the optimizer, schedule and precision come "
        "from training.optimizer, training.lr_scheduler and training.precision"
        for k in REFUSED
        if k in override
    ]
    return problems


def load_override(cfg) -> dict | None:
    """`scaling.deepspeed.config` read on the driver and checked against the YAML (raises
    ConfigError naming the key). None when there is no file or the strategy is ddp."""
    from cluster.errors import ConfigError
    from cluster.store import storage

    path = cfg.scaling.deepspeed.config
    if cfg.scaling.strategy != "deepspeed" or not path:
        return None
    try:
        override = json.loads(storage.read_text(path))
    except (OSError, FileNotFoundError, json.JSONDecodeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            [f"scaling.deepspeed.config: expected a readable JSON file. Got {path!r} ({first})"]
        ) from None
    problems = override_problems(override, cfg, path)
    if problems:
        raise ConfigError(problems)
    return override


def initialize(model, optimizer, config: dict):
    """The DeepSpeed engine over the process group Ray Train set up (it does, for one worker
    too); DeepSpeed initializes none of its own."""
    import deepspeed

    # On CPU, DeepSpeed's communication backend would JIT-compile a shared-memory all-reduce
    # op (a C++ build into ~/.cache/torch_extensions that blocks forever on a lock a killed
    # build leaves behind). gloo does the same collectives: mark the op unavailable so it is
    # never built (DeepSpeed keeps this probe in one dict, meant to be edited).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, dist_init_required=False
    )
    return engine


def gathered(model, stage: int, modifier_rank: int | None = None):
    """A context in which ZeRO-3's partitioned trainable parameters are whole on every rank
    (collective: every rank enters it). A no-op for stage 2, where they always are."""
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def set_adapter(model, weights: dict, stage: int):
    """Load adapter weights into the (possibly partitioned) model (collective)."""
    from peft import set_peft_model_state_dict

    with gathered(model, stage, modifier_rank=0):
        return set_peft_model_state_dict(model, weights)


def _fp32_partitions(engine) -> list[torch.Tensor]:
    """This rank's slice of the fp32 master weights the ZeRO optimizer steps."""
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        return list(opt.fp32_partitioned_groups_flat)
    return list(opt.single_partition_of_fp32_groups)


@contextlib.contextmanager
def _base_optimizer(engine):
    """The torch optimizer inside ZeRO with its parameters attached. ZeRO-3 attaches its fp32
    partitions only around a step, and around its own state_dict/load_state_dict; so here."""
    opt = engine.optimizer
    if engine.zero_optimization_stage() != 3:
        yield opt.optimizer
        return
    from train.internals import check_zero3_optimizer

    check_zero3_optimizer(opt)
    opt._set_fp32_optimizer_param_groups()
    try:
        yield opt.optimizer
    finally:
        opt._clear_fp32_optimizer_param_groups()


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def save_shard(engine, dirpath: Path) -> None:
    """This rank's optimizer state and fp32 master slice, tensors and numbers only."""
    rank, world = _rank_world()
    with _base_optimizer(engine) as base:
        optimizer = base.state_dict()
    fp32 = [t.detach().clone() for t in _fp32_partitions(engine)]
    torch.save(
        {"world": world, "optimizer": optimizer, "fp32": fp32}, dirpath / SHARD.format(rank=rank)
    )


def load_shard(engine, dirpath: Path) -> None:
    rank, world = _rank_world()
    path = dirpath / SHARD.format(rank=rank)
    if not path.is_file():
        raise RuntimeError(
            f"checkpoint {dirpath} has no DeepSpeed shard for rank {rank}: it was not written by "
            f"a DeepSpeed run with {world} workers"
        )
    state = torch.load(path, weights_only=True, map_location="cpu")
    if state["world"] != world:
        raise RuntimeError(
            f"checkpoint {dirpath} was written by {state['world']} DeepSpeed workers; ZeRO "
            f"shards resume only on the same number. Got scaling.num_workers={world}"
        )
    with _base_optimizer(engine) as base:
        base.load_state_dict(state["optimizer"])
    for current, saved in zip(_fp32_partitions(engine), state["fp32"], strict=True):
        current.data.copy_(saved)
