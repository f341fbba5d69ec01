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


class DataSource(Section):
    path: str = Field(
        ...,
        description="A .jsonl/.json/.csv/.parquet file (local, s3:// or gs://) or a hub dataset id.",
    )
    format: Literal["alpaca", "chat", "completion", "text"] | None = Field(
        None, description="Row format of this source; null: `data.format`."
    )
    weight: float = Field(
        1.0,
        gt=0,
        description="This source's share of the training examples (weights are normalized); a "
        "source with fewer examples than its share is repeated, one with more is sampled.",
    )
    split: str = Field("train", description="Split to read when `path` is a hub id.")


class DataConfig(Section):
    path: str | None = Field(
        None,
        description="Training data: a .jsonl/.json/.csv/.parquet file (a local path, or "
        "s3://... / gs://..., fetched once per node), or a Hugging Face datasets hub id (with "
        "`split`). Give this or `sources`.",
    )
    sources: list[DataSource] = Field(
        default_factory=list,
        description="Several training sources mixed by weight (e.g. task data plus general text "
        "against forgetting), each `{path, format, weight, split}`; instead of `path`. Each "
        "source holds out `eval_ratio` of its rows; eval is one pooled set.",
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
    seed: int = Field(0, description="Seed for the eval split, the mix and the shuffle order.")

    @model_validator(mode="after")
    def _one_of_path_or_sources(self):
        if (self.path is None) == (not self.sources):
            got = "both" if self.path is not None else "neither"
            raise ValueError(
                f"expected exactly one of data.path and data.sources. Got {got} instead"
            )
        return self

    def source_list(self) -> list[DataSource]:
        """`sources`, or `path` as the one source."""
        if self.sources:
            return [s.model_copy(update={"format": s.format or self.format}) for s in self.sources]
        return [DataSource(path=self.path, format=self.format, split=self.split)]


class TrainingConfig(Section):
    max_steps: int | None = Field(
        None,
        gt=0,
        description="Optimizer steps to run. Give this or `epochs`; neither: 100 steps.",
    )
    epochs: float | None = Field(
        None,
        gt=0,
        description="Passes over the packed training sequences, instead of `max_steps`: the "
        "driver turns them into steps (sequences / (batch_size x workers x grad_accum_steps)), "
        "prints the count, and the LR schedule, warmup and Tune use those steps.",
    )
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
        "auto",
        description="Autocast dtype. auto: bf16 on a GPU that supports it, else fp32. fp16 runs "
        "with torch's GradScaler (CPU and CUDA; refused under DeepSpeed).",
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
    generation_eval_rows: int = Field(
        0,
        ge=0,
        description="Generation eval at every eval step: greedy answers to the first N eval "
        "examples' prompts, reported as `eval_exact_match` and `eval_f1` beside the eval loss "
        "(so `tune.metric` may name them); 0: off.",
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
    overfit_patience: int | None = Field(
        3,
        gt=0,
        description="Say the run is overfitting (log, `overfitting` metric, final report) when the "
        "eval loss rose while the training loss fell for this many evals in a row; beside "
        "early stopping, which it does not trigger; null: off.",
    )
    tensorboard: bool = Field(
        True,
        description="Write metrics as TensorBoard events to `<run dir>/tensorboard/` (on an "
        "s3:// or gs:// root: written locally, uploaded at every checkpoint).",
    )

    @model_validator(mode="before")
    @classmethod
    def _steps_or_epochs(cls, data):
        if not isinstance(data, dict):
            return data
        steps, epochs = data.get("max_steps"), data.get("epochs")
        if steps is not None and epochs is not None:
            raise ValueError(
                "expected one of training.max_steps and training.epochs. Got "
                f"max_steps={steps} and epochs={epochs} instead"
            )
        return data if epochs is not None else {**data, "max_steps": steps or 100}


class MlflowSection(Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking server or store; null: MLflow's own default."
    )
    experiment: str = Field("lorafleet", description="MLflow experiment name (created if missing).")


class WandbSection(Section):
    project: str = Field(..., description="W&B project; the API key comes from $WANDB_API_KEY.")
    entity: str | None = Field(None, description="W&B entity (team or user); null: yours.")


class TrackingConfig(Section):
    mlflow: MlflowSection | None = Field(
        None,
        description="Also log to MLflow, through Ray's integration (rank 0 of a run; one MLflow "
        "run per Tune trial). Needs `pip install mlflow`.",
    )
    wandb: WandbSection | None = Field(
        None,
        description="Also log to Weights & Biases, through Ray's integration. Needs `pip install "
        "wandb` and $WANDB_API_KEY.",
    )

    def missing_packages(self) -> list[str]:
        """A problem for each configured tracker whose package is not installed here. Checked
        where a config enters (cluster.config.load_config), not by the schema: a config read
        back from storage (merge, a Tune trial, eval) must load where the package is absent."""
        import importlib.util

        return [
            f"tracking.{name}: needs the '{name}' package, which is not installed here; run "
            f"`pip install {name}` or remove tracking.{name}. "
            f"Got {getattr(self, name).model_dump()} instead"
            for name in ("mlflow", "wandb")
            if getattr(self, name) is not None and importlib.util.find_spec(name) is None
        ]


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


class EvalConfig(Section):
    path: str | None = Field(
        None,
        description="Held-out rows (local path, s3:// or gs://; the format is read from the "
        "first row's fields). Unset: `data.eval_path`, else the rows `data.eval_ratio` split "
        "off, as training split them.",
    )
    general_path: str | None = Field(
        None,
        description="The forgetting check: general rows the base already handles (`text` rows: "
        "loss and perplexity; `prompt`/`completion`, alpaca or chat rows: every metric), scored "
        "the same way; the report gives each adapter's change against the base. Unset: no "
        "forgetting check.",
    )
    adapters: list[str] | None = Field(
        None,
        description="Adapters to compare with the base: store names (their current version), "
        "`name@version`, or adapter folders (local, s3://, gs://). Unset: this job's `name`.",
    )
    max_new_tokens: int | None = Field(
        None,
        gt=0,
        description="Tokens generated per answer. Unset: the longest expected answer plus 8.",
    )
    limit: int | None = Field(
        200, gt=0, description="Rows scored from each set (the first N); null: all."
    )
    engine: Literal["auto", "hf"] = Field(
        "auto",
        description="Generation: auto runs the base and LoRA adapters through vLLM (as served) "
        "and other methods through PEFT with HF generate; hf uses HF generate for all.",
    )
    batch_size: int = Field(16, gt=0, description="Rows per forward pass (loss) and HF generate.")


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
