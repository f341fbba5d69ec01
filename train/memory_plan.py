"""The memory plan: the peak memory one training worker will need, before anything starts.

    lorafleet plan configs/recipes/llama-3.1-8b.yaml --gpu A100-80GB
    lorafleet plan configs/recipes/llama-3.1-8b.yaml training.batch_size=8 --gpu-gib 48

It reads the base's shapes (a local folder's or a bucket's config.json, the hub's through
`transformers.AutoConfig`, else the built-in table of `KNOWN_MODELS`, labelled as such), never
its weights, and adds up what this repository's training keeps per worker (train/model.py,
train/loop.py, train/zero.py):

- the frozen base: 4-bit NF4/FP4 weights at 0.5 byte per parameter of every decoder linear,
  plus bitsandbytes' quantization constants (one absmax per 64 weights: fp32, or 8-bit with a
  second-level fp32 constant per 256 blocks under double quant); embeddings, lm_head and norms
  are loaded in float32 (`load_base` loads with dtype=float32 so LoRA's master weights stay
  fp32), and one linear at a time is dequantized to the compute dtype;
- the trained weights (LoRA A and B on each target module, from the shapes and the rank) in
  fp32, their gradients, and AdamW's two fp32 states (2 bytes a parameter for paged 8-bit);
  under DDP on several workers a gradient bucket copy;
- activations for one micro-batch of `batch_size` x `max_length` tokens: every decoder layer's
  saved tensors, or with gradient checkpointing each layer's input plus one layer recomputed,
  and the logits (the loss upcasts them to fp32, so ~3 copies of tokens x vocab);
- DeepSpeed: ZeRO-2 splits gradients and optimizer state across workers and allocates its
  reduce bucket (`reduce_bucket_size`, 5e8 elements, fp32 in DeepSpeed 0.19); ZeRO-3 also
  splits the base, but lorafleet loads the whole quantized base on every worker before
  DeepSpeed partitions it (no `zero.Init`), so the load itself is a floor on the peak.

The bound. The activation coefficients were measured on CPU (fp32) with the loop's own
`build_run` / `train_step` on tiny Llama-shaped bases, counting live tensor storage bytes; on
such shapes and settings (width 128-512, 2-8 layers, rank 8-64, with and without gradient
checkpointing and dropout, vocab 259-32k) the estimate is within 25% of the measured tensor
peak (tests/test_plan.py holds it to that). What it is not: on CPU the `mem` figure training
reports is the process's peak RSS, which adds the Python/torch/Ray runtime (0.5-1 GiB) to the
tensors; on a GPU it is `torch.cuda.max_memory_allocated`, which is what this estimates. The
bf16 split of the activations on GPU (norms and the residual stream in fp32, the rest in
bf16) follows from the code, not from a GPU measurement. The fit check keeps 1 GiB of each GPU
for the CUDA context and allocator slack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cluster.errors import ConfigError

GIB = 2**30
ERROR_BOUND = 0.25  # the stated bound: |estimate - measured| <= 25% of measured (module docstring)
GPU_RESERVE_GIB = 1.0  # CUDA context, kernels and allocator slack, outside max_memory_allocated

# usable memory as torch.cuda.get_device_properties reports it, in GiB
GPUS: dict[str, float] = {
    "T4-16GB": 15.0,
    "L4-24GB": 22.5,
    "A10G-24GB": 22.5,
    "RTX-4090-24GB": 24.0,
    "A100-40GB": 39.5,
    "L40S-48GB": 45.0,
    "A100-80GB": 80.0,
    "H100-80GB": 79.6,
    "H200-141GB": 140.0,
}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder-only model's config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    source: str = ""


def _shape(hidden, intermediate, layers, heads, kv_heads, vocab, tied=False):
    return ModelShape(hidden, intermediate, layers, heads, kv_heads, hidden // heads, vocab, tied)


# FALLBACK ONLY, used when the hub cannot be asked (offline, no token): each model's
# config.json numbers, copied from its hub page. A hub id not here needs the hub or a local copy.
KNOWN_MODELS: dict[str, ModelShape] = {
    "meta-llama/Llama-3.1-8B-Instruct": _shape(4096, 14336, 32, 32, 8, 128256),
    "meta-llama/Llama-3.1-8B": _shape(4096, 14336, 32, 32, 8, 128256),
    "meta-llama/Llama-3.1-70B-Instruct": _shape(8192, 28672, 80, 64, 8, 128256),
    "meta-llama/Llama-3.3-70B-Instruct": _shape(8192, 28672, 80, 64, 8, 128256),
    "meta-llama/Llama-3.2-1B-Instruct": _shape(2048, 8192, 16, 32, 8, 128256, tied=True),
    "meta-llama/Llama-3.2-3B-Instruct": _shape(3072, 8192, 28, 24, 8, 128256, tied=True),
    "Qwen/Qwen2.5-7B-Instruct": _shape(3584, 18944, 28, 28, 4, 152064),
    "Qwen/Qwen2.5-72B-Instruct": _shape(8192, 29568, 80, 64, 8, 152064),
    "mistralai/Mistral-7B-Instruct-v0.3": _shape(4096, 14336, 32, 32, 8, 32768),
}

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shape_from_config(d: dict, source: str) -> ModelShape:
    """A ModelShape from a config.json dict (Llama-style keys; GPT-style names as fallbacks)."""
    d = d.get("text_config", d)  # multimodal wrappers keep the decoder's config inside
    hidden = d.get("hidden_size") or d.get("n_embd")
    heads = d.get("num_attention_heads") or d.get("n_head")
    layers = d.get("num_hidden_layers") or d.get("n_layer")
    if not (hidden and heads and layers and d.get("vocab_size")):
        raise ConfigError(
            [
                f"model.base: its config ({source}) lacks hidden_size, num_attention_heads, "
                f"num_hidden_layers or vocab_size. Got keys {sorted(d)[:12]} instead"
            ]
        )
    return ModelShape(
        hidden=hidden,
        intermediate=d.get("intermediate_size") or d.get("n_inner") or 4 * hidden,
        layers=layers,
        heads=heads,
        kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or hidden // heads,
        vocab=d["vocab_size"],
        tied=bool(d.get("tie_word_embeddings", False)),
        source=source,
    )


def read_shape(cfg) -> ModelShape:
    """The base's shapes from its config only: tiny://, a local or bucket folder, the hub, or the
    built-in fallback table (said so in `source`)."""
    from cluster.store import storage
    from cluster.store.layout import tiny_name

    base = cfg.model.base
    tiny = tiny_name(base)
    if tiny is not None:
        from train.tiny import TINY_SHAPES

        if tiny not in TINY_SHAPES:
            raise ConfigError([f"model.base: unknown tiny model {base!r}"])
        layers, width, heads, inter, _ = TINY_SHAPES[tiny]
        return ModelShape(width, inter, layers, heads, heads, width // heads, 259, False, base)
    if storage.is_remote(base):
        text = storage.read_text(storage.join(base, "config.json"))
        return shape_from_config(json.loads(text), f"{base}/config.json")
    local = Path(base).expanduser()
    if (local / "config.json").is_file():
        return shape_from_config(json.loads((local / "config.json").read_text()), str(local))
    try:
        from transformers import AutoConfig

        hub = AutoConfig.from_pretrained(
            base, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
        return shape_from_config(hub.to_dict(), f"hub config of {base}")
    except Exception as e:  # offline, gated, or not a hub id: the table, else say why
        if base in KNOWN_MODELS:
            known = KNOWN_MODELS[base]
            return ModelShape(
                **{
                    **known.__dict__,
                    "source": f"built-in table for {base} "
                    "(the hub's config.json could not be read here)",
                }
            )
        raise ConfigError(
            [
                f"model.base: cannot read {base!r}'s config.json ({type(e).__name__}); expected "
                f"a local model folder, a reachable hub id, or one of {sorted(KNOWN_MODELS)}"
            ]
        ) from None


def linear_shapes(s: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each decoder linear, Llama-style."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    h, i = s.hidden, s.intermediate
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def targets(cfg) -> list[str]:
    t = cfg.adapter.target_modules
    if t == "all-linear":
        return list(LINEARS)
    return [name for name in LINEARS if any(m.split(".")[-1] == name for m in t)]


@dataclass
class Plan:
    """Bytes per worker: `fixed` does not depend on the micro-batch, `per_sequence` does."""

    device: str  # "GPU" or "CPU worker"
    shape: ModelShape
    parts: list[tuple[str, float, str]] = field(default_factory=list)  # (what, bytes, how)
    per_sequence: float = 0.0
    load_peak: float = 0.0
    batch_size: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def fixed(self) -> float:
        return sum(b for _, b, _ in self.parts)

    def total(self, batch_size: int | None = None) -> float:
        b = self.batch_size if batch_size is None else batch_size
        return max(self.fixed + self.per_sequence * b, self.load_peak)

    def largest_batch(self, capacity_bytes: float) -> int:
        room = capacity_bytes - self.fixed
        if room < self.per_sequence or self.load_peak > capacity_bytes:
            return 0
        return int(room // self.per_sequence)


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def _base_bytes(cfg, s: ModelShape) -> tuple[float, float, str]:
    """(quantized linears incl. constants, other fp32 weights, how) for the whole base."""
    q = cfg.quantization
    p_lin = s.layers * sum(i * o for i, o in linear_shapes(s).values())
    other = (s.vocab * s.hidden * (1 if s.tied else 2) + (2 * s.layers + 1) * s.hidden) * 4
    full = cfg.adapter.method in ("full", "partial")
    if q.mode == "4bit" and not full:
        consts = p_lin / 64 + p_lin / (64 * 256) * 4 if q.double_quant else p_lin / 64 * 4
        how = (
            f"{p_lin / 1e9:.2f}B params x 0.5 B ({q.quant_type}) + constants {consts / GIB:.2f} GiB"
        )
        return p_lin * 0.5 + consts, other, how
    if q.mode == "8bit" and not full:
        return p_lin + s.layers * sum(o for _, o in linear_shapes(s).values()) * 4, other, "int8"
    return p_lin * 4.0, other, f"{p_lin / 1e9:.2f}B params x 4 B (float32, unquantized)"


def _trainable(cfg, s: ModelShape) -> tuple[float, str]:
    """Trainable parameters and how they were counted."""
    a, shapes = cfg.adapter, linear_shapes(s)
    if a.method in ("lora", "adalora"):
        rank = a.adalora_init_r if a.method == "adalora" else a.r
        n = s.layers * sum(rank * (i + o) for i, o in (shapes[t] for t in targets(cfg)))
        if a.use_dora:
            n += s.layers * sum(shapes[t][1] for t in targets(cfg))
        return n, f"r={rank} on {', '.join(targets(cfg)) or 'no recognised module'}"
    if a.method == "full":
        p = s.layers * sum(i * o for i, o in shapes.values()) + s.vocab * s.hidden * 2
        return p, "every weight"
    if a.method == "partial":
        n_blocks = a.partial_last_n_blocks or 0
        return n_blocks * sum(i * o for i, o in shapes.values()), f"{n_blocks} blocks"
    if a.method == "ia3":
        return s.layers * (2 * s.kv_heads * s.head_dim + s.intermediate), "(IA)^3 vectors"
    return a.num_virtual_tokens * s.hidden * (2 * s.layers if a.method == "prefix_tuning" else 1), (
        "virtual tokens"
    )


def _layer_activation_bytes(cfg, s: ModelShape, act: int) -> float:
    """Bytes one decoder layer saves for backward, per token (no checkpointing). Coefficients
    measured on CPU (module docstring): attention and norms ~6h + 3 kv widths, the MLP ~3.5
    intermediate widths, LoRA the rank per target, and the input of each adapted linear the
    frozen base would not have kept (down_proj's), or with LoRA dropout every target's input
    again plus its mask (~7 B per fp32 input element)."""
    h, kv, i = s.hidden, s.kv_heads * s.head_dim, s.intermediate
    fp32 = 4  # the residual stream and the norms stay fp32: the embeddings are loaded in fp32
    per_token = 4 * h * fp32 + (2 * h + 3 * kv + 3.5 * i) * act
    if cfg.adapter.method in ("lora", "adalora"):
        shapes, chosen = linear_shapes(s), targets(cfg)
        per_token += len(chosen) * cfg.adapter.r * act
        if cfg.adapter.dropout > 0:
            for t in chosen:
                in_bytes = act if t in ("o_proj", "down_proj") else fp32
                per_token += shapes[t][0] * (in_bytes + 3)
        elif "down_proj" in chosen:
            per_token += i * act
    return per_token


def estimate(cfg, shape: ModelShape | None = None) -> Plan:
    """The plan for one worker of `cfg` (its micro-batch, sequence length, workers, strategy)."""
    s = shape or read_shape(cfg)
    t, sc = cfg.training, cfg.scaling
    gpu = sc.use_gpu
    act = 2 if t.precision in ("bf16", "fp16") or (t.precision == "auto" and gpu) else 4
    cd = _dtype_bytes(cfg.quantization.compute_dtype)
    world = sc.num_workers
    stage = sc.deepspeed.stage if sc.strategy == "deepspeed" else 0
    plan = Plan("GPU" if gpu else "CPU worker", s, batch_size=t.batch_size)

    quant, other, how = _base_bytes(cfg, s)
    base_split = world if stage == 3 else 1
    plan.parts.append(
        (f"base weights{' (ZeRO-3 share)' if stage == 3 else ''}", quant / base_split, how)
    )
    plan.parts.append(
        (
            "embeddings, lm_head, norms",
            other / base_split,
            f"float32, {'tied' if s.tied else 'untied'} vocab {s.vocab:,}",
        )
    )
    largest = max(i * o for i, o in linear_shapes(s).values())
    plan.parts.append(("dequantized linear (one at a time)", largest * cd * 2, "compute dtype"))
    if stage == 3:
        layer = quant / s.layers
        plan.parts.append(("ZeRO-3 gathered layers", 2 * layer, "one layer in use, one prefetched"))
        plan.load_peak = quant + other  # every worker loads the whole base before partitioning
        plan.notes.append(
            f"ZeRO-3: every worker first loads the whole base ({(quant + other) / GIB:.1f} GiB) "
            "and DeepSpeed partitions it after; that load is a floor on the peak"
        )

    n, counted = _trainable(cfg, s)
    opt_bytes = 2 if t.optimizer == "paged_adamw_8bit" else 8
    shard = world if stage else 1
    plan.parts.append(("trained weights (fp32)", n * 4 / (world if stage == 3 else 1), counted))
    grad = n * 4 / shard + (n * 4 if world > 1 and not stage else 0)
    plan.parts.append(
        ("gradients (fp32)", grad, "+ DDP bucket copy" if world > 1 and not stage else "")
    )
    master = n * 4 / shard if stage else 0.0
    plan.parts.append(
        (
            "optimizer state",
            n * opt_bytes / shard + master,
            f"{t.optimizer}{f', ZeRO-{stage}: 1/{world} + fp32 master share' if stage else ''}",
        )
    )
    if stage:
        plan.parts.append(("DeepSpeed reduce bucket", 5e8 * 4, "reduce_bucket_size 5e8 x fp32"))

    seq = cfg.data.max_length
    layer = _layer_activation_bytes(cfg, s, act)
    if t.gradient_checkpointing:
        # measured: each checkpointed layer keeps 1.85x its fp32 input; one layer is recomputed
        acts = seq * (s.layers * 1.85 * s.hidden * 4 + layer)
        how = "checkpointed: layer inputs + one layer recomputed"
    else:
        acts = seq * s.layers * layer
        how = "every layer's saved tensors"
    logits = seq * s.vocab * (act + 8)  # logits, their fp32 upcast in the loss, its gradient
    mask = seq * seq  # packed sequences: a boolean 4D mask per sequence
    plan.per_sequence = acts + logits + mask
    plan.notes.append(
        f"activations per sequence of {seq} tokens: {_size(acts + mask).strip()} ({how}), "
        f"logits {_size(logits).strip()}"
    )
    if not gpu:
        plan.notes.append(
            "CPU: training's `mem` is the process's peak RSS, which adds the Python/torch/Ray "
            "runtime (~0.5-1 GiB) to these tensors"
        )
    return plan


def gpu_capacity(name: str | None, gib: float | None) -> list[tuple[str, float]]:
    """(label, GiB) of the GPUs to check: the one named, the size given, or the whole table."""
    if gib is not None:
        return [(f"{gib:g} GiB GPU", gib)]
    if name is None:
        return list(GPUS.items())
    exact = {k.lower(): k for k in GPUS}
    family = [k for k in GPUS if k.lower().rsplit("-", 1)[0] == name.lower()]  # "L4", "H100"
    prefix = family or [k for k in GPUS if k.lower().startswith(name.lower())]
    key = exact.get(name.lower()) or (prefix[0] if len(prefix) == 1 else None)
    if key is None:
        raise ConfigError(
            [f"--gpu: expected one of {', '.join(GPUS)} (or --gpu-gib N). Got {name!r} instead"]
        )
    return [(key, GPUS[key])]


def _size(b: float) -> str:
    return f"{b / GIB:7.2f} GiB" if b >= GIB / 4 else f"{b / 2**20:7.1f} MiB"


def render(plan: Plan, gpus: list[tuple[str, float]]) -> str:
    """The plan as the CLI prints it: the parts, the total, and a fit per GPU."""
    s = plan.shape
    lines = [
        f"model: {s.layers} layers, hidden {s.hidden}, intermediate {s.intermediate}, heads "
        f"{s.heads}/{s.kv_heads} kv, vocab {s.vocab:,} ({s.source})",
    ]
    for what, b, how in plan.parts:
        lines.append(f"  {what:<38} {_size(b)}  {how}")
    lines.append(
        f"  {'activations + logits x ' + str(plan.batch_size) + ' sequences':<38} "
        f"{_size(plan.per_sequence * plan.batch_size)}  "
        f"{_size(plan.per_sequence).strip()} per sequence"
    )
    lines += [f"  note: {n}" for n in plan.notes]
    total = plan.total()
    lines.append(
        f"estimated peak per {plan.device}: {_size(total).strip()} "
        f"(+-{ERROR_BOUND:.0%}: {_size(total * (1 - ERROR_BOUND)).strip()} to "
        f"{_size(total * (1 + ERROR_BOUND)).strip()})"
    )
    lines.append(f"{'GPU':<16} {'memory':>8} {'fits':<6} {'headroom':>9}  largest micro-batch")
    for label, gib in gpus:
        cap = (gib - GPU_RESERVE_GIB) * GIB
        room = cap - total
        verdict = (
            "yes"
            if room >= 0 and total * (1 + ERROR_BOUND) <= cap
            else ("tight" if room >= 0 else "no")
        )
        lines.append(
            f"{label:<16} {gib:6.1f}GiB {verdict:<6} {room / GIB:+8.1f}G  "
            f"{plan.largest_batch(cap)} (configured {plan.batch_size})"
        )
    if plan.device != "GPU":
        lines.append("(scaling.use_gpu is false: the GPU rows assume these CPU settings)")
    return "\n".join(lines)


def plan_text(cfg, gpu: str | None = None, gpu_gib: float | None = None) -> str:
    return render(estimate(cfg), gpu_capacity(gpu, gpu_gib))
