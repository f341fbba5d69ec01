"""Adapters out of training: check a PEFT adapter, load it for inference, merge it.

lorafleet merge lorafleet-runs/adapters/demo-last --out lorafleet-runs/merged/demo-last
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cluster.errors import LorafleetError
from cluster.layout import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_META, ADAPTER_WEIGHTS


class AdapterError(LorafleetError, RuntimeError):
    """An adapter that is missing, empty, non-finite or never trained."""


def check_adapter(path: str | Path, expect_trained: bool = True) -> int:
    """Fail loudly on a missing, empty, non-finite or never-trained adapter; returns tensor count."""
    from safetensors.torch import load_file

    path = Path(path)
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    if missing:
        raise AdapterError(f"adapter at {path} is missing {missing}")
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    if not tensors:
        raise AdapterError(
            f"adapter at {path} holds no tensors: the target modules matched nothing?"
        )
    empty = [k for k, v in tensors.items() if v.numel() == 0]
    if empty:  # what a ZeRO-3 save without gathering the partitioned weights writes
        raise AdapterError(
            f"adapter at {path} has empty tensors {empty[:3]}: saved from partitioned weights?"
        )
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(f"adapter at {path} has non-finite values in {bad[:3]}")
    if expect_trained:
        b = [v for k, v in tensors.items() if "lora_B" in k]
        if b and all(float(v.abs().max()) == 0.0 for v in b):
            raise AdapterError(f"adapter at {path} is untrained: every lora_B is zero")
    json.loads((path / ADAPTER_CONFIG).read_text())
    return len(tensors)


def load_adapter_model(
    adapter_dir: str | Path, base: str | None = None, quantization=None, trust_remote_code=False
):
    """Base (unquantized unless `quantization` is given) + adapter, in eval mode, on CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = str(adapter_dir)
    base = (
        base or json.loads(Path(adapter_dir, ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    )
    model = AutoModelForCausalLM.from_pretrained(
        base,
        quantization_config=quantization,
        dtype=torch.float32,
        device_map={"": "cpu"},
        trust_remote_code=trust_remote_code,
    )
    return PeftModel.from_pretrained(model, adapter_dir).eval()


def merge_adapter(
    adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32", log=print
) -> Path:
    """A full model with the adapter merged in, in safetensors. The base is loaded as training
    saw it (4-bit, from the adapter's lorafleet.json) and dequantized before the merge, so the
    merged weights are what the adapter was trained against."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.job_config import JobConfig
    from train.model import DTYPES, base_path, load_base

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    check_adapter(adapter_dir, expect_trained=False)
    meta_path = adapter_dir / ADAPTER_META
    if meta_path.is_file():
        cfg = JobConfig.model_validate(json.loads(meta_path.read_text())["config"])
        model = load_base(cfg, "cpu")
        if cfg.quantization.mode != "none":
            model = model.dequantize()
        base = base_path(cfg)  # an s3:// or gs:// base: this machine's cached copy
        trust = cfg.model.trust_remote_code
    else:
        base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        trust = False
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = model.to(torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged = merged.to(DTYPES[dtype])
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base, trust_remote_code=trust).save_pretrained(out_dir)
    log(f"[merge] {adapter_dir} + {base} -> {out_dir}")
    return out_dir
