"""The sections of a job that say how it runs: data, training, tracking, DeepSpeed, scaling,
storage, Ray and evaluation (the model and adapter sections, and the job that holds them all,
are in job.py). Every field is described; the reference is generated from them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cluster.config.base import Section


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
        10,
        gt=0,
        description="Log loss, lr, grad norm, tokens/s every N steps (console, "
        "metrics.jsonl, TensorBoard/MLflow/W&B; to Ray Tune under `tune`).",
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
        None,
        description="MLflow tracking server (http://host:5000) or store; null: MLflow's own "
        "default ($MLFLOW_TRACKING_URI, else a local store in the rank-0 worker's working "
        "directory). Credentials come from $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD "
        "or $MLFLOW_TRACKING_TOKEN.",
    )
    experiment: str = Field("lorafleet", description="MLflow experiment name (created if missing).")

    @field_validator("tracking_uri")
    @classmethod
    def _no_password(cls, v):
        from urllib.parse import urlsplit

        if v and urlsplit(v).password:
            shown = v.replace(urlsplit(v).password, "***", 1)
            raise ValueError(
                "expected no password in the URI: the config is stored with every run and "
                "version; set $MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD (or "
                f"$MLFLOW_TRACKING_TOKEN) instead. Got {shown} instead"
            )
        return v


class WandbSection(Section):
    project: str = Field(
        ...,
        description="W&B project; the API key comes from $WANDB_API_KEY (none needed with "
        "WANDB_MODE=offline).",
    )
    entity: str | None = Field(None, description="W&B entity (team or user); null: yours.")


class TrackingConfig(Section):
    mlflow: MlflowSection | None = Field(
        None,
        description="Also log to MLflow: one MLflow run per lorafleet run (rank 0; a resume "
        "continues it) with the config as params, the reports as metrics, metrics.jsonl and "
        "data_report.json as artifacts; one per Tune trial. Needs `pip install mlflow`.",
    )
    wandb: WandbSection | None = Field(
        None,
        description="Also log to Weights & Biases: one W&B run per lorafleet run (rank 0; a "
        "resume continues it), its local files (offline runs, for `wandb sync`) in "
        "`<run dir>/wandb/`; one per Tune trial. Needs `pip install wandb`.",
    )

    def missing_packages(self) -> list[str]:
        """A problem for each configured tracker whose package is not installed here. Checked
        where a config enters (cluster.config.load.load_config), not by the schema: a config read
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
