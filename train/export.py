"""What training makes, out of training: check a PEFT adapter (or a full / partial run's trained
weights), load it for inference, merge it, and publish a full / partial fine-tune as a whole
model under `<storage.root>/models/finetuned/<name>/versions/<version>/` (config, safetensors,
tokenizer, lorafleet.json last), which `lorafleet serve` deploys as a model's base.

lorafleet merge lorafleet-runs/adapters/demo-last --out lorafleet-runs/merged/demo-last
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cluster.errors import LorafleetError
from cluster.store import storage
from cluster.store.layout import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_META, ADAPTER_WEIGHTS
from cluster.store.servability import MERGEABLE


class AdapterError(LorafleetError, RuntimeError):
    """An adapter that is missing, empty, non-finite or never trained."""


def check_adapter(path: str | Path, expect_trained: bool = True) -> int:
    """Fail loudly on a missing, empty, non-finite or never-trained adapter (or a full / partial
    run's trained weights); returns tensor count."""
    from safetensors.torch import load_file

    from train.model import TRAINED_WEIGHTS

    path = Path(path)
    if (path / TRAINED_WEIGHTS).is_file():  # full / partial: the trained weights themselves
        return len(_checked_tensors(path, load_file(str(path / TRAINED_WEIGHTS))))
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    if missing and (path / "config.json").is_file():
        raise AdapterError(
            f"{path} is a whole model (config.json, no {ADAPTER_CONFIG}), not an adapter: a full "
            "or partial fine-tune; serve or load it as a base model"
        )
    if missing:
        raise AdapterError(f"adapter at {path} is missing {missing}")
    tensors = _checked_tensors(path, load_file(str(path / ADAPTER_WEIGHTS)))
    if expect_trained:
        b = [v for k, v in tensors.items() if "lora_B" in k]
        if b and all(float(v.abs().max()) == 0.0 for v in b):
            raise AdapterError(f"adapter at {path} is untrained: every lora_B is zero")
    json.loads((path / ADAPTER_CONFIG).read_text())
    return len(tensors)


def _checked_tensors(path: Path, tensors: dict) -> dict:
    """The tensors, after refusing none at all, empty ones and non-finite values."""
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
    return tensors


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

    from cluster.config.job import JobConfig
    from train.model import DTYPES, base_path, load_base

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    check_adapter(adapter_dir, expect_trained=False)
    peft_type = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("peft_type", "")
    if str(peft_type).upper() not in MERGEABLE:
        raise AdapterError(
            f"adapter at {adapter_dir} is a {peft_type} adapter: its virtual tokens are inputs "
            "the model reads, not a change to its weights, so it cannot be merged into them "
            f"(lorafleet merge folds {', '.join(MERGEABLE)} adapters in); load it with PEFT "
            "(train.export.load_adapter_model) instead"
        )
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


def full_models_root(storage_root: str) -> str:
    """Where full and partial fine-tunes are published: `<storage.root>/models/finetuned`
    (beside tiny bases, whose names are fixed, so no name meets another)."""
    return storage.join(storage.absolute(storage_root), "models", "finetuned")


def build_full_model(trained_dir: str | Path, cfg, out_dir: str | Path) -> Path:
    """The base with a full / partial run's trained weights in it, saved as a whole Hugging
    Face model (config, safetensors, tokenizer) that from_pretrained and vLLM load."""
    from train.model import load_base, load_tokenizer, load_trained

    out_dir = Path(out_dir)
    model = load_base(cfg, "cpu", quantized=False)
    load_trained(model, Path(trained_dir))
    model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(cfg).save_pretrained(out_dir)
    return out_dir


def publish_full_model(trained_dir: str | Path, cfg, meta: dict) -> tuple[str, str]:
    """A full / partial fine-tune as a new version of `<full_models_root>/<name>`, written whole
    with its lorafleet.json last (a reader that finds that file finds a whole model). Returns
    (version id, version URI)."""
    import tempfile

    from cluster.store import versions

    version = versions.new_version_id()
    uri = storage.join(full_models_root(cfg.storage.root), cfg.name, "versions", version)
    with tempfile.TemporaryDirectory(prefix="lorafleet-full-") as tmp:
        build_full_model(trained_dir, cfg, Path(tmp) / "model")
        storage.upload_dir(Path(tmp) / "model", uri)
    meta = {**meta, "name": cfg.name, "version": version, "kind": "model"}
    storage.write_text(storage.join(uri, ADAPTER_META), json.dumps(meta, indent=2))
    return version, uri
