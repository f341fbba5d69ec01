"""The model: base -> 4-bit NF4 (or 8-bit, or none) via bitsandbytes -> a PEFT adapter of
`adapter.method` (LoRA, AdaLoRA, (IA)^3, prompt/prefix/P-tuning), or the unquantized base itself
for full and partial fine-tuning.

Each Ray worker calls `load_for_training(cfg, device)` and gets its own quantized copy placed on
its own device. GPU-only pieces (CUDA kernels, paged optimizers) are picked by the config, never
by what happens to import.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cluster.errors import ModelError
from cluster.store import layout, storage

# the trained weights of a full or partial fine-tune, in a checkpoint (safetensors)
TRAINED_WEIGHTS = "trained.safetensors"

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
    from cluster.config.validation import with_overrides
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
    return str(storage.local_model(base, "model.base"))


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


def peft_config(cfg, model_type: str = "", hidden_size: int | None = None):
    """The PEFT config of `adapter.method` (every method but full and partial)."""
    import peft

    a, method = cfg.adapter, cfg.adapter.method
    if method == "lora":
        return lora_config(a)
    if method == "adalora":
        return peft.AdaLoraConfig(
            init_r=a.adalora_init_r,
            target_r=a.r,
            lora_alpha=a.alpha,
            lora_dropout=a.dropout,
            target_modules=a.target_modules,
            bias=a.bias,
            use_rslora=a.use_rslora,
            tinit=a.adalora_tinit,
            tfinal=a.adalora_tfinal,
            deltaT=a.adalora_delta_t,
            total_step=cfg.training.max_steps,
            task_type="CAUSAL_LM",
        )
    if method == "ia3":
        return _ia3_config(a, model_type)
    virtual = {"num_virtual_tokens": a.num_virtual_tokens, "task_type": "CAUSAL_LM"}
    if method == "prompt_tuning":
        if a.prompt_tuning_init == "text":
            return peft.PromptTuningConfig(
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text=a.prompt_tuning_text,
                tokenizer_name_or_path=base_path(cfg),
                **virtual,
            )
        return peft.PromptTuningConfig(prompt_tuning_init="RANDOM", **virtual)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(**virtual)
    if method == "p_tuning":
        return peft.PromptEncoderConfig(
            encoder_hidden_size=a.p_tuning_hidden_size or hidden_size, **virtual
        )
    raise ValueError(f"adapter.method {method!r} has no PEFT config")


def _ia3_config(a, model_type: str):
    """(IA)^3 on "all-linear": PEFT's own per-architecture choice (keys, values and the MLP's
    down projection, which is scaled on its input); on a list, those modules, with the ones PEFT
    counts as feed-forward for this architecture scaled on their input."""
    from peft import IA3Config
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF

    if a.target_modules == "all-linear":
        return IA3Config(task_type="CAUSAL_LM")
    feedforward = [m for m in a.target_modules if m in FF.get(model_type, [])]
    return IA3Config(
        target_modules=list(a.target_modules),
        feedforward_modules=feedforward,
        task_type="CAUSAL_LM",
    )


def load_for_training(cfg, device: torch.device | str = "cpu"):
    """The model a training loop steps: quantized base + a fresh PEFT adapter of
    `adapter.method`, or for full / partial the unquantized base with only its trained weights
    requiring grad."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    full = cfg.adapter.method in ("full", "partial")
    model = load_base(cfg, device, quantized=not full)
    gc = cfg.training.gradient_checkpointing
    if cfg.quantization.mode != "none" and not full:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gc,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not full:
            model.enable_input_require_grads()
    model.config.use_cache = False
    if full:
        if cfg.adapter.method == "partial":
            freeze_for_partial(model, cfg.adapter)
        return model
    mc = model.config
    return get_peft_model(model, peft_config(cfg, mc.model_type, mc.hidden_size))


def _blocks(model) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks: its longest ModuleList (model.layers in Llama,
    transformer.h in GPT-2)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ModelError("adapter.partial_last_n_blocks: this model has no list of blocks")
    return max(lists, key=len)


def freeze_for_partial(model, a) -> list[str]:
    """Freeze every weight, then let the last `partial_last_n_blocks` blocks or the
    `partial_modules` train. Returns the names of the trained modules."""
    for p in model.parameters():
        p.requires_grad_(False)
    if a.partial_last_n_blocks is not None:
        blocks = _blocks(model)
        if a.partial_last_n_blocks > len(blocks):
            raise ModelError(
                f"adapter.partial_last_n_blocks: the model has {len(blocks)} blocks. Got "
                f"{a.partial_last_n_blocks} instead"
            )
        chosen = list(blocks)[len(blocks) - a.partial_last_n_blocks :]
        names = [n for n, m in model.named_modules() if any(m is c for c in chosen)]
    else:
        modules = dict(model.named_modules())
        names, missing = [], []
        for want in a.partial_modules:
            hits = [n for n in modules if n and (n == want or n.endswith("." + want))]
            names += hits
            missing += [] if hits else [want]
        if missing:
            some = ", ".join(n for n in list(modules)[1:12])
            raise ModelError(
                f"adapter.partial_modules: no module named {missing} in this model; its "
                f"modules are named like: {some}, ..."
            )
        chosen = [modules[n] for n in names]
    for m in chosen:
        for p in m.parameters():
            p.requires_grad_(True)
    return names


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def trained_state(model) -> dict[str, torch.Tensor]:
    """What training changed: the PEFT adapter's tensors, or (full / partial) every weight that
    requires grad, under its name in the model."""
    if is_peft(model):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_trained(model, out_dir: Path) -> None:
    """A PEFT adapter as PEFT saves it (adapter_config.json + adapter_model.safetensors), or the
    trained weights of a full / partial run as TRAINED_WEIGHTS (safetensors)."""
    if is_peft(model):
        conf = model.peft_config[model.active_adapter]
        # AdaLoRA: PEFT cuts each saved matrix to the ranks its rank_pattern keeps, and a fresh
        # model cannot load that back without resizing first. Saved whole instead: the ranks it
        # cut are zero in lora_E (masked), so the adapter computes the same, and a resume fits.
        pattern = getattr(conf, "rank_pattern", None)
        if _allocator(model) is not None:
            conf.rank_pattern = None
        try:
            model.save_pretrained(out_dir, safe_serialization=True)
        finally:
            if _allocator(model) is not None:
                conf.rank_pattern = pattern
        return
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().contiguous().cpu() for n, p in trained_state(model).items()}
    save_file(state, str(out_dir / TRAINED_WEIGHTS))


def misfit_keys(model, load_result) -> list[str]:
    """Keys of a loaded PEFT state that landed nowhere. Prompt-learning methods keep their
    weights on the prompt encoder, which PEFT loads separately (peft set_peft_model_state_dict)
    after reporting them as unexpected for the model: those landed."""
    unexpected = list(getattr(load_result, "unexpected_keys", None) or [])
    if is_peft(model) and model.peft_config[model.active_adapter].is_prompt_learning:
        unexpected = [k for k in unexpected if k != "prompt_embeddings"]
    return unexpected


def load_trained(model, in_dir: Path) -> None:
    """The inverse of save_trained (for full / partial; PEFT adapters go through train.zero,
    which gathers ZeRO partitions). Every saved tensor must land on a weight of the model."""
    from safetensors.torch import load_file

    weights = load_file(str(in_dir / TRAINED_WEIGHTS))
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ModelError(
            f"checkpoint {in_dir} does not fit this model: {result.unexpected_keys[:3]}"
        )


def _allocator(model):
    inner = getattr(model, "base_model", None)
    return getattr(inner, "rankallocator", None) if is_peft(model) else None


def method_state(model) -> dict:
    """What a method keeps beside its weights that a resume needs: AdaLoRA's importance scores
    (their moving averages decide which ranks are cut) and its rank pattern. Tensors, lists and
    numbers only (`torch.load(weights_only=True)` reads them)."""
    if is_peft(model) and model.peft_config[model.active_adapter].is_prompt_learning:
        # PEFT saves P-tuning's prompt as the encoder's output; training goes on from the
        # encoder (an MLP) itself
        encoder = model.prompt_encoder[model.active_adapter]
        return {"prompt_encoder": {k: v.detach().clone() for k, v in encoder.state_dict().items()}}
    alloc = _allocator(model)
    if alloc is None:
        return {}
    conf = model.peft_config[model.active_adapter]
    return {
        "adalora": {
            k: {n: t.detach().clone() for n, t in getattr(alloc, k).items()}
            for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")
        }
        | {"rank_pattern": conf.rank_pattern}
    }


def set_method_state(model, state: dict) -> None:
    if "prompt_encoder" in state:
        model.prompt_encoder[model.active_adapter].load_state_dict(state["prompt_encoder"])
        return
    alloc, saved = _allocator(model), state.get("adalora")
    if alloc is None or saved is None:
        return
    # the scores were loaded on the CPU (map_location); PEFT combines them with the gradients,
    # on the worker's device
    device = next(p.device for p in model.parameters() if p.requires_grad)
    for k in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(alloc, k, {n: t.to(device) for n, t in saved[k].items()})
    model.peft_config[model.active_adapter].rank_pattern = saved["rank_pattern"]


def after_step(model, step: int) -> None:
    """What a method needs after the optimizer step, while the gradients are still there:
    AdaLoRA scores its ranks and reallocates the budget (peft's update_and_allocate)."""
    if _allocator(model) is not None:
        model.base_model.update_and_allocate(step)


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
