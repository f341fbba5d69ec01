"""The model: base -> 4-bit NF4 (or 8-bit, or none) via bitsandbytes -> PEFT LoRA adapter.

Each Ray worker calls `load_for_training(cfg, device)` and gets its own quantized copy placed on
its own device. GPU-only pieces (CUDA kernels, paged optimizers) are picked by the config, never
by what happens to import.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cluster import layout, storage
from cluster.errors import ModelError

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "uint8": torch.uint8,
}


def resolve_base(cfg):
    """`tiny://<name>` -> the model built once under `<storage.root>/models/<name>`. On a local
    root it is built there; on a remote root (s3://, gs://) it is built on this machine and
    uploaded there once, and model.base becomes that URI: a name every node can read, never a
    path on the driver. Other values (a directory, an s3:// or gs:// URI, a hub id) pass as given."""
    name = layout.tiny_name(cfg.model.base)
    if name is None:
        return cfg
    from cluster.validation import with_overrides
    from train.tiny import ensure_tiny_base

    root = cfg.storage.root
    if not storage.is_remote(root):
        path = ensure_tiny_base(name, layout.tiny_dir(name, root))
        return with_overrides(cfg, {"model.base": str(path)})
    uri = layout.tiny_uri(name, root)
    if not storage.exists(storage.join(uri, layout.TINY_MARKER)):
        upload_model(ensure_tiny_base(name, layout.tiny_dir(name, root)), uri)
    return with_overrides(cfg, {"model.base": uri})


def upload_model(local: Path, uri: str) -> None:
    """Copy a built tiny base to `uri`, its marker last: a reader that finds the marker finds a
    whole model (an upload cut short leaves no marker, and is redone by the next run)."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lorafleet-base-") as tmp:
        staged = Path(tmp, "model")
        shutil.copytree(local, staged, ignore=shutil.ignore_patterns(layout.TINY_MARKER))
        storage.upload_dir(staged, uri)
    marker = (local / layout.TINY_MARKER).read_text()
    storage.write_text(storage.join(uri, layout.TINY_MARKER), marker)


def base_path(cfg) -> str:
    """What `from_pretrained` reads for model.base: for an s3:// or gs:// URI, this node's cached
    copy (fetched once per node and per content); anything else as given."""
    base = cfg.model.base
    if not storage.is_remote(base):
        return base
    try:
        return str(storage.local_copy(base))
    except OSError as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(
            f"model.base: '{base}' could not be read ({reason}); expected a model directory "
            "(config.json, weights, tokenizer files) at that URI"
        ) from None


def hub_error(base: str, error: Exception) -> ModelError:
    """One line for a base that is neither a local directory nor loadable from the hub."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ModelError(
        f"model.base: '{base}' is not a local directory and could not be loaded from the hub "
        f"({reason}); give a local path to a model directory, or check the id and the network"
    )


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    base = base_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(
            base,
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        if Path(base).is_dir():
            raise
        raise hub_error(cfg.model.base, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(q, zero3: bool = False):
    """bitsandbytes settings for the base. Under DeepSpeed ZeRO-3 the packed 4-bit weights are
    stored in the compute dtype (quant_storage is overridden): ZeRO-3 partitions and gathers them
    like every other parameter, and one floating dtype for all of them is the recipe PEFT and
    bitsandbytes give for ZeRO-3 QLoRA."""
    from transformers import BitsAndBytesConfig

    if q.mode == "4bit":
        storage = q.compute_dtype if zero3 else q.quant_storage
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
            bnb_4bit_quant_storage=DTYPES[storage],
        )
    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base(cfg, device: torch.device | str = "cpu", quantized: bool = True):
    """The base causal LM on `device`, quantized as the config says (or not, for merging)."""
    from transformers import AutoModelForCausalLM

    zero3 = cfg.scaling.strategy == "deepspeed" and cfg.scaling.deepspeed.stage == 3
    qcfg = quantization_config(cfg.quantization, zero3=zero3) if quantized else None
    model = AutoModelForCausalLM.from_pretrained(
        base_path(cfg),
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        quantization_config=qcfg,
        # frozen non-quantized parts and LoRA weights stay float32 (the master copy);
        # autocast and the 4-bit compute dtype decide the matmul precision
        dtype=torch.float32,
        device_map={"": str(device)},
        attn_implementation=cfg.model.attn_implementation,
    )
    if qcfg is not None:
        keep_cpu_4bit_trainable(model)
    return model


def keep_cpu_4bit_trainable(model) -> None:
    """bitsandbytes 0.50 repacks a Linear4bit's weight for its fast CPU inference kernel the
    first time the layer runs in eval mode under no_grad (bitsandbytes/nn/modules.py,
    Linear4bit.forward), and never packs it back. Training after that (after an eval pass or a
    generate()) runs on the repacked layout and silently stops learning: measured here, an
    adapter that reached 95% exact match without the eval pass stayed at 0% with it. Training
    and evaluation must see the same weights, so the repack is switched off for models we train."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(a):
    from peft import LoraConfig

    return LoraConfig(
        r=a.r,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules=a.target_modules,
        bias=a.bias,
        use_rslora=a.use_rslora,
        use_dora=a.use_dora,
        task_type="CAUSAL_LM",
    )


def load_for_training(cfg, device: torch.device | str = "cpu"):
    """Quantized base + fresh LoRA adapter, ready for a training loop."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = load_base(cfg, device)
    gc = cfg.training.gradient_checkpointing
    if cfg.quantization.mode != "none":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gc,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return get_peft_model(model, lora_config(cfg.adapter))


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
