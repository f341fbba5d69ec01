"""The schema of a fine-tuning job (`lorafleet train`, `tune`, `demo`): one pydantic model per
section, every field described. The README's reference table is generated from it
(`python -m cluster.config.reference`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cluster.config.base import Section, name_problem, validate_name
from cluster.config.sections import (
    DataConfig,
    EvalConfig,
    RayConfig,
    ScalingConfig,
    StorageConfig,
    TrackingConfig,
    TrainingConfig,
)
from cluster.config.tune_space import TuneSection, check_space


class ModelConfig(Section):
    base: str = Field(
        "tiny://demo",
        description="Base causal LM: a local directory, an s3:// or gs:// directory (fetched "
        "once per node), or a Hugging Face hub id. `tiny://<name>` builds a tiny Llama-shaped "
        "model and tokenizer locally (no download) into `<storage.root>/models/<name>` (on a "
        "remote root: built by the driver, uploaded once, read by every node).",
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) of `base`."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint. Off unless you set it."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel. flash_attention_2 needs a CUDA GPU and flash-attn."
    )


class QuantizationConfig(Section):
    mode: Literal["4bit", "8bit", "none"] = Field(
        "4bit", description="Load the frozen base in 4-bit (QLoRA), 8-bit, or unquantized."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (QLoRA).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Dtype the 4-bit matmuls compute in."
    )
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8",
        description="Dtype that packs the 4-bit weights.",
    )


METHODS = (
    "lora",
    "adalora",
    "ia3",
    "prompt_tuning",
    "prefix_tuning",
    "p_tuning",
    "full",
    "partial",
)
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning", "p_tuning")
FULL_WEIGHTS = ("full", "partial")  # methods that train the base's own weights


class AdapterConfig(Section):
    method: Literal[METHODS] = Field(
        "lora",
        description="What trains: lora (LoRA; with use_dora / use_rslora), adalora (LoRA whose "
        "rank budget is reallocated while training), ia3 ((IA)^3: learned scaling vectors), "
        "prompt_tuning (virtual token embeddings), prefix_tuning (virtual keys/values in every "
        "layer), p_tuning (virtual tokens from a small prompt encoder), all from PEFT; full (every "
        "weight of the base) or partial (the last `partial_last_n_blocks` blocks, or the "
        "`partial_modules`; the rest frozen), which publish a whole model.",
    )
    r: int = Field(16, gt=0, le=1024, description="LoRA rank (adalora: the target average rank).")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description='lora, adalora, ia3: module names to adapt, or "all-linear" (every linear '
        "but the head; for ia3, PEFT's choice for the architecture: keys, values, MLP down).",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none",
        description="lora, adalora: which biases to train. Not none: vLLM cannot serve the adapter "
        "(`lorafleet merge` it).",
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale by alpha/sqrt(r).")
    use_dora: bool = Field(
        False,
        description="lora: weight-decomposed LoRA (DoRA). vLLM cannot serve it (`lorafleet merge` "
        "it).",
    )
    adalora_init_r: int = Field(
        12, gt=0, le=1024, description="adalora: each layer's rank before the budget is cut to r."
    )
    adalora_tinit: int = Field(
        0, ge=0, description="adalora: steps of plain training before ranks are reallocated."
    )
    adalora_tfinal: int = Field(
        0, ge=0, description="adalora: last steps trained with the final ranks fixed."
    )
    adalora_delta_t: int = Field(
        1, gt=0, description="adalora: steps between two rank reallocations."
    )
    num_virtual_tokens: int = Field(
        20,
        gt=0,
        le=1024,
        description="prompt_tuning, prefix_tuning, p_tuning: virtual tokens put before every "
        "sequence (they take room in the model's context).",
    )
    prompt_tuning_init: Literal["random", "text"] = Field(
        "random",
        description="prompt_tuning: start the virtual tokens random, or from the embeddings of "
        "`prompt_tuning_text`.",
    )
    prompt_tuning_text: str | None = Field(
        None,
        description="prompt_tuning with prompt_tuning_init=text: the text whose token embeddings "
        "start the virtual tokens (repeated or cut to num_virtual_tokens).",
    )
    p_tuning_hidden_size: int | None = Field(
        None,
        gt=0,
        description="p_tuning: hidden size of the prompt encoder (an MLP); null: the model's.",
    )
    partial_last_n_blocks: int | None = Field(
        None,
        gt=0,
        description="partial: train the last N transformer blocks, freeze everything else.",
    )
    partial_modules: list[str] | None = Field(
        None,
        description="partial: train these modules (names as in model.named_modules(), or their "
        "last parts, e.g. lm_head, norm, layers.1.mlp), freeze everything else.",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError(
                'expected a non-empty list of module names or "all-linear". Got [] instead'
            )
        return v


class JobConfig(Section):
    """A whole fine-tuning job."""

    name: str = Field(
        "adapter",
        description="Run and adapter name: `<storage.root>/adapters/<name>/`. Not one of "
        "lorafleet's own names (adapters, models, runs, experiments, releases, versions, current, "
        "latest, lorafleet*).",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    quantization: QuantizationConfig = Field(
        default_factory=QuantizationConfig, description="How the frozen base is stored."
    )
    adapter: AdapterConfig = Field(
        default_factory=AdapterConfig,
        description="What trains: a PEFT adapter (LoRA by default), or the base itself.",
    )
    data: DataConfig = Field(..., description="Training (and eval) data.")
    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="The training loop."
    )
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Ray Train workers.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Outputs.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray connection.")
    tune: TuneSection = Field(
        default_factory=TuneSection, description="Hyperparameter search (`lorafleet tune`)."
    )
    eval: EvalConfig = Field(
        default_factory=EvalConfig, description="Held-out evaluation (`lorafleet eval`)."
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="MLflow or W&B besides the run folder's metrics.jsonl and TensorBoard.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        validate_name(v)
        problem = name_problem(v)  # the adapter's name too: lorafleet's own names are refused
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _cross(self):
        problems = []
        t = self.training
        if t.max_steps is not None and t.warmup_steps > t.max_steps:
            problems.append(
                f"training.warmup_steps: expected at most training.max_steps ({t.max_steps}). "
                f"Got {t.warmup_steps} instead"
            )
        if t.optimizer == "paged_adamw_8bit" and not self.scaling.use_gpu:
            problems.append(
                "training.optimizer: paged_adamw_8bit pages optimizer state through CUDA unified "
                "memory and needs scaling.use_gpu=true. Got 'paged_adamw_8bit' with use_gpu=false "
                "instead; use 'adamw' on CPU"
            )
        if self.model.attn_implementation == "flash_attention_2" and not self.scaling.use_gpu:
            problems.append(
                "model.attn_implementation: flash_attention_2 needs scaling.use_gpu=true. "
                "Got 'flash_attention_2' instead"
            )
        if t.precision == "fp16" and self.scaling.strategy == "deepspeed":
            problems.append(
                "training.precision: fp16 needs a loss scaler; lorafleet gives DDP runs torch's "
                "GradScaler but does not configure DeepSpeed's. Got 'fp16' with "
                "scaling.strategy='deepspeed' instead; use bf16, or strategy ddp"
            )
        problems += _deepspeed_problems(self)
        problems += _method_problems(self)
        problems += _generation_eval_problems(self)
        problems += check_space(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _deepspeed_problems(cfg: JobConfig) -> list[str]:
    """Combinations DeepSpeed cannot train, each found by trying it (DeepSpeed 0.19.8)."""
    s = cfg.scaling
    if s.strategy != "deepspeed":
        return []
    problems = []
    if s.deepspeed.stage == 3 and cfg.adapter.use_dora and cfg.quantization.mode != "none":
        problems.append(
            "adapter.use_dora: DoRA reads the whole frozen base weight, which ZeRO-3 partitions; "
            "bitsandbytes' quantized weights are not ZeRO-3 parameters (AttributeError: 'Params4bit' "
            f"object has no attribute 'ds_status', 'Int8Params' likewise). Got use_dora=true with "
            f"quantization.mode='{cfg.quantization.mode}' and scaling.deepspeed.stage=3 instead; "
            "use stage 2, quantization.mode=none, or plain LoRA"
        )
    if cfg.training.optimizer == "paged_adamw_8bit":
        problems.append(
            "training.optimizer: DeepSpeed ZeRO partitions the optimizer state itself and counts "
            "bitsandbytes' paged AdamW 8-bit as an untested ZeRO optimizer. Got "
            "'paged_adamw_8bit' with scaling.strategy='deepspeed' instead; use 'adamw'"
        )
    return problems


def _method_problems(cfg: JobConfig) -> list[str]:
    """Combinations of adapter.method with the rest of the config that cannot train, each with
    the reason (found by trying them with PEFT 0.21 and DeepSpeed 0.19 on the tiny base)."""
    a, m = cfg.adapter, cfg.adapter.method
    problems = [
        f"adapter.{key}: only method {' or '.join(owners)} has it. Got {key}={value!r} with "
        f"adapter.method='{m}' instead"
        for key, value, off, owners in (
            ("use_dora", a.use_dora, False, ("lora",)),
            ("use_rslora", a.use_rslora, False, ("lora", "adalora")),
            ("bias", a.bias, "none", ("lora", "adalora")),
        )
        if value != off and m not in owners
    ]
    problems += _method_field_problems(a)
    if m in FULL_WEIGHTS and cfg.quantization.mode != "none":
        problems.append(
            f"quantization.mode: method '{m}' trains the base's own weights, and quantized "
            "(bitsandbytes) weights cannot take gradient updates. Got "
            f"'{cfg.quantization.mode}' with adapter.method='{m}' instead; set "
            "quantization.mode=none, or train an adapter (lora) on the quantized base"
        )
    if m in PROMPT_LEARNING and cfg.data.packing:
        problems.append(
            f"data.packing: method '{m}' puts virtual tokens before each sequence, and packed "
            "examples would share one sequence: PEFT drops the position ids that keep packed "
            "examples apart (prompt_tuning, p_tuning) or shifts them so the second example sees "
            "the first (prefix_tuning, measured). Got packing=true instead; set "
            "data.packing=false"
        )
    if m == "prefix_tuning" and cfg.training.gradient_checkpointing:
        problems.append(
            "training.gradient_checkpointing: PEFT refuses it with prefix_tuning (its virtual "
            "keys/values enter each layer as a cache, which recomputation cannot replay). Got "
            "true instead; set training.gradient_checkpointing=false"
        )
    if (
        m == "adalora"
        and cfg.training.max_steps is not None
        and a.adalora_tinit >= cfg.training.max_steps - a.adalora_tfinal
    ):
        problems.append(
            "adapter.adalora_tinit: expected fewer than training.max_steps - adapter.adalora_"
            f"tfinal ({cfg.training.max_steps - a.adalora_tfinal}) steps, so that ranks get "
            f"reallocated. Got {a.adalora_tinit} instead"
        )
    if m == "adalora" and cfg.scaling.strategy == "deepspeed":
        problems.append(
            "adapter.method: 'adalora' cannot train with scaling.strategy=deepspeed: the "
            "DeepSpeed engine zeroes the gradients inside its step, before AdaLoRA's rank "
            "allocation (update_and_allocate) can read them. Got method='adalora' with "
            "strategy='deepspeed' instead; use strategy=ddp, or method lora"
        )
    return problems


def _method_field_problems(a: AdapterConfig) -> list[str]:
    """The method's own fields: given where they belong, and given together."""
    m, problems = a.method, []
    if m == "partial" and (a.partial_last_n_blocks is None) == (a.partial_modules is None):
        problems.append(
            "adapter.partial_last_n_blocks: method 'partial' needs exactly one of "
            "partial_last_n_blocks or partial_modules. Got "
            f"partial_last_n_blocks={a.partial_last_n_blocks!r}, "
            f"partial_modules={a.partial_modules!r} instead"
        )
    if m != "partial":
        for key in ("partial_last_n_blocks", "partial_modules"):
            if getattr(a, key) is not None:
                problems.append(
                    f"adapter.{key}: only method 'partial' reads it. Got it set with "
                    f"adapter.method='{m}' instead"
                )
    if a.partial_modules is not None and not a.partial_modules:
        problems.append("adapter.partial_modules: expected a non-empty list. Got [] instead")
    if m == "prompt_tuning" and a.prompt_tuning_init == "text" and not a.prompt_tuning_text:
        problems.append(
            "adapter.prompt_tuning_text: prompt_tuning_init=text starts the virtual tokens from "
            "a text; expected one. Got none instead"
        )
    if a.prompt_tuning_text and (m != "prompt_tuning" or a.prompt_tuning_init != "text"):
        problems.append(
            "adapter.prompt_tuning_text: read only with method 'prompt_tuning' and "
            f"prompt_tuning_init=text. Got method='{m}', "
            f"prompt_tuning_init='{a.prompt_tuning_init}' instead"
        )
    return problems


def _generation_eval_problems(cfg: JobConfig) -> list[str]:
    """Generation eval during training needs prompts it can tell from their answers."""
    n = cfg.training.generation_eval_rows
    if not n:
        return []
    problems = []
    if cfg.data.format == "text" or cfg.data.train_on_prompt:
        problems.append(
            "training.generation_eval_rows: generation eval answers each eval example's prompt "
            "and needs examples whose loss is on the answer only. Got "
            f"generation_eval_rows={n} with data.format='{cfg.data.format}', "
            f"data.train_on_prompt={cfg.data.train_on_prompt} instead"
        )
    if cfg.scaling.strategy == "deepspeed" and cfg.scaling.deepspeed.stage == 3:
        problems.append(
            "training.generation_eval_rows: under ZeRO-3 every forward is collective, and "
            "workers generating answers of different lengths would wait on each other forever. "
            f"Got generation_eval_rows={n} with scaling.deepspeed.stage=3 instead; use stage 2"
        )
    return problems
