"""A training checkpoint: the adapter (PEFT safetensors; for full / partial the trained weights),
what a method keeps beside them, optimizer and scheduler state (`torch.load(weights_only=True)`
reads it back; under DeepSpeed each worker adds its own ZeRO shard), and every RNG a step may
draw from, so a resumed run continues at the next step on the same batches."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from cluster.store.layout import ADAPTER_WEIGHTS
from train.model import method_state, save_trained, set_method_state

CHECKPOINT_STATE = "trainer_state.pt"
CHECKPOINT_META = "state.json"
ADAPTER_DIR = "adapter"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def rng_state() -> dict:
    """Every RNG a step may use, as tensors and plain numbers (`torch.load(weights_only=True)`
    reads them back; nothing is pickled)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(dirpath: Path, model, optimizer, scheduler, meta: dict) -> None:
    """The adapter, optimizer (None under DeepSpeed: each rank saves its ZeRO shard), scheduler,
    RNGs and meta. Under ZeRO-3 call it inside `zero.gathered`, or the adapter is empty."""
    # first: under ZeRO-3, PEFT's save runs P-tuning's encoder, whose hooks partition it again
    method = method_state(model)
    save_trained(model, dirpath / ADAPTER_DIR)
    state = {"scheduler": scheduler.state_dict(), "rng": rng_state(), "method": method}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    torch.save(state, dirpath / CHECKPOINT_STATE)
    (dirpath / CHECKPOINT_META).write_text(json.dumps(meta, indent=2))


def load_checkpoint(dirpath: Path, model, optimizer, scheduler, engine=None) -> dict:
    """The inverse of save_checkpoint; with a DeepSpeed `engine`, the adapter goes into the
    partitioned model and this rank's ZeRO shard into the engine's optimizer."""
    from safetensors.torch import load_file

    from train import zero
    from train.model import is_peft, load_trained, misfit_keys

    stage = engine.zero_optimization_stage() if engine else 0
    if not is_peft(model):  # full / partial: the trained weights themselves
        with zero.gathered(model, stage, modifier_rank=0):
            load_trained(model, dirpath / ADAPTER_DIR)
    else:
        weights = load_file(str(dirpath / ADAPTER_DIR / ADAPTER_WEIGHTS))
        misfit = misfit_keys(model, zero.set_adapter(model, weights, stage))
        if misfit:
            raise RuntimeError(f"checkpoint {dirpath} does not fit this adapter: {misfit[:3]}")
    state = torch.load(dirpath / CHECKPOINT_STATE, weights_only=True, map_location="cpu")
    if engine is None:
        optimizer.load_state_dict(state["optimizer"])
    else:
        zero.load_shard(engine, dirpath)
    scheduler.load_state_dict(state["scheduler"])
    with zero.gathered(model, stage, modifier_rank=0):
        set_method_state(model, state.get("method", {}))
    if "rng" in state:
        set_rng_state(state["rng"])
    else:  # a checkpoint from before every RNG was saved
        torch.set_rng_state(state["torch_rng"])
    return json.loads((dirpath / CHECKPOINT_META).read_text())
