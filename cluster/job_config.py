"""The schema of a fine-tuning job (`lorafleet train`, `tune`, `demo`): one pydantic model per
section, every field described. The README's reference table is generated from it
(`python -m cluster.config_reference`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cluster.schema_base import Section, name_problem, validate_name
from cluster.tune_space import TuneSection, check_space


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


class AdapterConfig(Section):
    r: int = Field(16, gt=0, le=1024, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description='Module names to adapt, or "all-linear" (every linear but the head).',
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale by alpha/sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError(
                'expected a non-empty list of module names or "all-linear". Got [] instead'
            )
        return v


class DataConfig(Section):
    path: str = Field(
        ...,
        description="Training data: a .jsonl/.json/.csv/.parquet file (a local path, or "
        "s3://... / gs://..., fetched once per node), or a Hugging Face datasets hub id (with "
        "`split`).",
    )
    split: str = Field("train", description="Split to read when `path` is a hub id.")
    format: Literal["alpaca", "chat", "completion", "text"] = Field(
        "completion",
        description="Row format: alpaca (instruction, input, output), chat (messages: "
        "[{role, content}]), completion (prompt, completion) or text (text).",
    )
    train_on_prompt: bool = Field(
        False, description="Count the loss on prompt tokens too. Off: only response tokens count."
    )
    max_length: int = Field(512, ge=8, description="Tokens per training sequence.")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="What happens to an example longer than `max_length`; counted."
    )
    packing: bool = Field(
        True,
        description="Pack several examples into one sequence. Position ids restart per example and "
        "attention is masked per example, so packed examples do not see each other.",
    )
    eval_path: str | None = Field(
        None,
        description="A separate eval file (local path, s3:// or gs://). Else `eval_ratio` is used.",
    )
    eval_ratio: float = Field(
        0.05, ge=0, lt=1, description="Share of the training rows held out for eval."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="A malformed row stops the run (naming file and row), or is skipped and counted.",
    )
    seed: int = Field(0, description="Seed for the eval split and the shuffle order.")


class TrainingConfig(Section):
    max_steps: int = Field(100, gt=0, description="Optimizer steps to run.")
    batch_size: int = Field(8, gt=0, description="Sequences per worker per micro-batch.")
    grad_accum_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    optimizer: Literal["adamw", "paged_adamw_8bit"] = Field(
        "adamw", description="torch AdamW, or bitsandbytes paged AdamW 8-bit (CUDA only)."
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup."
    )
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip gradients to this norm; null: off."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast dtype. auto: bf16 on a GPU that supports it, else fp32."
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in backward (use_reentrant=False) to save memory."
    )
    seed: int = Field(42, description="Seed for weights of the adapter, dropout and data order.")
    log_every_steps: int = Field(
        10, gt=0, description="Report loss, lr, grad norm, tokens/s every N steps."
    )
    eval_every_steps: int = Field(
        50, gt=0, description="Eval loss/perplexity (and a checkpoint) every M steps."
    )
    eval_max_batches: int | None = Field(
        None, gt=0, description="Cap on eval batches per eval; null: all."
    )
    keep_checkpoints: int = Field(
        2,
        gt=0,
        description="Keep the best K checkpoints by eval loss (plus the latest, which a resume needs).",
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evals without improvement; null: never."
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="Smallest eval-loss drop that counts."
    )
    resume_from: str | None = Field(
        None, description="A checkpoint directory to continue from (at its next step)."
    )
    max_failures: int = Field(
        0,
        ge=-1,
        description="Worker-group restarts from the latest checkpoint after a failure; -1: always.",
    )
    export: Literal["best", "last"] = Field(
        "best", description="Which checkpoint's adapter is published: best eval loss, or the last."
    )


class DeepSpeedSection(Section):
    stage: Literal[2, 3] = Field(
        2,
        description="ZeRO stage: 2 partitions optimizer state and gradients across workers, 3 "
        "also the parameters (the frozen base included), gathered layer by layer when used.",
    )
    config: str | None = Field(
        None,
        description="A DeepSpeed JSON file (local path or storage URI), read on the driver and "
        "merged over the config generated from this YAML (batch sizes, accumulation, clipping, "
        "precision, ZeRO stage). Batch sizes, accumulation and stage may only repeat the YAML's "
        "values; optimizer, scheduler, fp16 and bf16 sections are refused (they come from "
        "`training`).",
    )


class ScalingConfig(Section):
    num_workers: int = Field(1, gt=0, description="Ray Train workers (one model replica each).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1}, description="Ray resources each worker reserves."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How workers are placed on nodes (Ray placement group strategy): PACK fills "
        "few nodes, SPREAD spreads where it can, STRICT_SPREAD puts each worker on its own node "
        "(needs as many nodes as workers), STRICT_PACK puts all on one node.",
    )
    strategy: Literal["ddp", "deepspeed"] = Field(
        "ddp",
        description="Data-parallel strategy: PyTorch DDP (gloo on CPU, NCCL on GPU), or DeepSpeed "
        "ZeRO (`scaling.deepspeed`) over the same process group.",
    )
    deepspeed: DeepSpeedSection = Field(
        default_factory=DeepSpeedSection,
        description="DeepSpeed settings, read when `strategy` is deepspeed.",
    )

    @field_validator("resources_per_worker")
    @classmethod
    def _positive(cls, v):
        bad = {k: x for k, x in v.items() if x < 0}
        if bad:
            raise ValueError(f"expected non-negative amounts. Got {bad} instead")
        return v


class StorageConfig(Section):
    root: str = Field(
        "lorafleet-runs",
        description="Where runs, checkpoints and adapters go: a local path, s3://bucket/prefix or "
        "gs://bucket/prefix. Adapters land in `<root>/adapters/<name>/versions/<version>/`. "
        "Unset in the file: $LORAFLEET_STORAGE_ROOT if set (cluster.yaml sets it on every node), "
        "else the default.",
    )
    keep_versions: int = Field(
        10,
        ge=1,
        description="Published versions kept per adapter; a publish deletes older ones (never "
        "the current one).",
    )


class RayConfig(Section):
    address: str | None = Field(
        None,
        description="Ray cluster to join ('auto', 'ray://host:10001'). Unset: $RAY_ADDRESS if set "
        "(as under `ray job submit`), else a local Ray started for this run.",
    )
    num_cpus: int | None = Field(
        None, gt=0, description="Logical CPUs for a locally started Ray; null: Ray's own count."
    )


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
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="The LoRA adapter.")
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
        if t.warmup_steps > t.max_steps:
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
        problems += _deepspeed_problems(self)
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
