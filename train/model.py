"""The model: base -> 4-bit NF4 (or 8-bit, or none) via bitsandbytes -> PEFT LoRA adapter.

Each Ray worker calls `load_for_training(cfg, device)` and gets its own quantized copy placed on
its own device. GPU-only pieces (CUDA kernels, paged optimizers) are picked by the config, never
by what happens to import.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cluster import layout
from cluster.errors import ModelError

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "uint8": torch.uint8,
}


def resolve_base(cfg):
    """`tiny://<name>` -> a locally built model under `<storage.root>/models/<name>`; other
    values (a local directory or a hub id) pass through untouched."""
    name = layout.tiny_name(cfg.model.base)
    if name is None:
        return cfg
    from cluster.validation import with_overrides
    from train.tiny import ensure_tiny_base

    path = ensure_tiny_base(name, layout.tiny_dir(name, cfg.storage.root))
    return with_overrides(cfg, {"model.base": str(path)})


def hub_error(base: str, error: Exception) -> ModelError:
    """One line for a base that is neither a local directory nor loadable from the hub."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ModelError(
        f"model.base: '{base}' is not a local directory and could not be loaded from the hub "
        f"({reason}); give a local path to a model directory, or check the id and the network"
    )


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            cfg.model.base,
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        if Path(cfg.model.base).is_dir():
            raise
        raise hub_error(cfg.model.base, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(q):
    from transformers import BitsAndBytesConfig

    if q.mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
            bnb_4bit_quant_storage=DTYPES[q.quant_storage],
        )
    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base(cfg, device: torch.device | str = "cpu", quantized: bool = True):
    """The base causal LM on `device`, quantized as the config says (or not, for merging)."""
    from transformers import AutoModelForCausalLM

    qcfg = quantization_config(cfg.quantization) if quantized else None
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.base,
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
