"""The Serve application: one vLLM deployment per base model (Ray Serve LLM's `LLMServer`, many
LoRA adapters per replica, autoscaled) behind lorafleet's OpenAI-compatible experiment ingress.

    lorafleet serve configs/serve-demo.yaml

`resolve(cfg, environ)` reads what the app needs from outside its config (the bases' directories,
the API keys from the environment and the key file); `build_app(cfg, resolved)` is a pure function
from those to a Serve `Application`; only `run()` (and the CLI) does both and deploys.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config.serve import ServeAppConfig, ServeModelConfig
from cluster.errors import LorafleetError
from cluster.store.layout import adapters_root
from serve.experiments import state_uri
from serve.store import base_identity, resolve_base

INGRESS_NAME = "LorafleetIngress"


class KeyFileMissing(LorafleetError):
    """`http.api_keys_file` names a file that cannot be read."""


@dataclass(frozen=True)
class Resolved:
    """What the app takes from outside its config, read once at start by `resolve`."""

    model_sources: dict[str, str]  # model id -> the directory or hub id vLLM loads
    adapter_root: str  # absolute URI of `<storage.root>/adapters`
    key_hashes: list[str]  # SHA-256 of each accepted API key; empty: no auth
    base_ids: dict[str, str] = (
        None  # model id -> fingerprint of its base (cluster.store.fingerprint)
    )
    admin_key_hashes: tuple[str, ...] = ()  # SHA-256 of each admin key; they pass as API keys too
    state_uri: str | None = None  # experiments' durable state; None: kept in memory only


def resolve(cfg: ServeAppConfig, environ: Mapping[str, str]) -> Resolved:
    """Read the bases' locations, the adapter store's absolute root and the API keys (from
    `environ` and the key file). Raises a LorafleetError for a base never built or a missing
    key file, before anything starts."""
    key_hashes = api_key_hashes(cfg, environ)
    check_exposed(cfg.http, key_hashes)
    return Resolved(
        model_sources={m.id: resolve_base(m.base, cfg.storage.root) for m in cfg.models},
        adapter_root=adapters_root(cfg.storage.root),
        key_hashes=key_hashes,
        base_ids={
            m.id: base_identity(m.adapters_base, cfg.storage.root, key="models[].adapters_base")
            if m.adapters_base
            else base_identity(m.base, cfg.storage.root, m.revision)
            for m in cfg.models
        },
        admin_key_hashes=tuple(api_key_hashes(cfg, environ, admin=True)),
        state_uri=state_uri(cfg.storage.root, cfg.name),
    )


def check_exposed(h, key_hashes: list[str], running_mode: str | None = None) -> None:
    """Refuse an API reachable from other machines without keys: a host other than loopback, or
    HAProxy, in `running_mode` (what the running Ray serves in: cluster.ray_connect.
    running_serve_mode) when given, else in the YAML's `http.mode`."""
    mode = running_mode or h.mode
    if key_hashes or not h.model_copy(update={"mode": mode}).exposed():
        return
    if mode != "haproxy":
        where = f"http.host: {h.host!r} is reachable from other machines"
    elif running_mode and h.mode != "haproxy":
        where = (
            f"the Ray this app deploys on runs Serve in HAProxy mode (its processes' "
            f"RAY_SERVE_ENABLE_HA_PROXY=1, as cluster.yaml starts nodes; http.mode says "
            f"{h.mode!r}, which cannot change a running Ray), which binds the ingress replicas' "
            "HTTP ports on all interfaces"
        )
    else:
        where = "http.mode: 'haproxy' binds the ingress replicas' HTTP ports on all interfaces"
    raise LorafleetError(
        f"{where}, and no API key is set, so anyone who can reach the port could use the "
        f"models: set ${h.api_keys_env} or http.api_keys_file (and ${h.admin_keys_env} for "
        "admin actions)"
        + ("" if mode == "haproxy" else ", or serve on http.host: 127.0.0.1")
        + (" with http.mode: throughput on a Ray started in that mode" if mode == "haproxy" else "")
    )


def gpu_placement(m: ServeModelConfig) -> dict:
    """One bundle per vLLM worker (tensor_parallel_size x pipeline_parallel_size GPUs), the
    replica's CPUs in the first, where its engine process runs. Tensor parallelism alone is
    packed on one node (STRICT_PACK: its all-reduce runs every layer); pipeline stages may be
    spread over nodes (PACK), as vLLM on Ray allows."""
    gpus = m.tensor_parallel_size * m.pipeline_parallel_size
    bundles = [{"GPU": 1, "CPU": m.cpus_per_replica}] + [{"GPU": 1} for _ in range(gpus - 1)]
    strategy = "PACK" if m.pipeline_parallel_size > 1 else "STRICT_PACK"
    return {"bundles": bundles, "strategy": strategy}


def llm_config_for(m: ServeModelConfig, model_source: str):
    """Ray Serve LLM's `LLMConfig` for one base model, loaded from `model_source` (what
    `resolve` found for it: a directory or a hub id)."""
    from ray.serve.llm import LLMConfig

    engine: dict[str, Any] = {
        "enable_lora": True,
        "max_lora_rank": m.max_lora_rank,
        # vLLM keeps up to max_cpu_loras adapters and evicts the least recently used;
        # Serve's multiplexing keeps the same number per replica and routes to where one is loaded
        "max_loras": m.max_loras_per_replica,
        "max_cpu_loras": m.max_loras_per_replica,
        "dtype": m.dtype,
        "trust_remote_code": m.trust_remote_code,
        # the ingress sends an adapter's recorded chat template with its requests (its prompt
        # format, cluster/text/prompt_format.py); clients cannot send one (serve/api_checks.py)
        "trust_request_chat_template": True,
    }
    if m.max_model_len:
        engine["max_model_len"] = m.max_model_len
    if m.quantization:
        engine["quantization"] = m.quantization
    if m.tensor_parallel_size > 1 or m.pipeline_parallel_size > 1:
        engine["tensor_parallel_size"] = m.tensor_parallel_size
        engine["pipeline_parallel_size"] = m.pipeline_parallel_size
    if m.revision:
        engine["revision"] = m.revision
    engine.update(m.engine_kwargs)
    a = m.autoscaling
    deployment = {
        "autoscaling_config": {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "initial_replicas": a.initial_replicas
            if a.initial_replicas is not None
            else max(a.min_replicas, 1),
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
            "metrics_interval_s": a.metrics_interval_s,
            "look_back_period_s": a.look_back_period_s,
        },
        "max_ongoing_requests": m.max_ongoing_requests,
        "max_queued_requests": m.max_queued_requests,
        "health_check_period_s": m.health_check_period_s,
        # the placement group below reserves the replica's CPUs; Ray adds this on top of it
        "ray_actor_options": {"num_cpus": 0},
    }
    env = {"TOKENIZERS_PARALLELISM": "false"}
    kwargs: dict[str, Any] = {}
    if m.use_gpu:
        kwargs["placement_group_config"] = gpu_placement(m)
    else:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{m.kv_cache_gib:g}"
        env["VLLM_TARGET_DEVICE"] = "cpu"
        kwargs["placement_group_config"] = {"bundles": [{"CPU": m.cpus_per_replica}]}
    return LLMConfig(
        model_loading_config={
            "model_id": m.id,
            "model_source": model_source,
        },
        engine_kwargs=engine,
        deployment_config=deployment,
        lora_config={"max_num_adapters_per_replica": m.max_loras_per_replica},
        runtime_env={"env_vars": env},
        **kwargs,
    )


def api_key_hashes(cfg: ServeAppConfig, environ: Mapping[str, str], admin=False) -> list[str]:
    """SHA-256 of each accepted key (or admin key), from the environment variable and/or the key
    file. Only the hashes travel to the ingress replicas, so keys never sit in Ray's deployment
    config."""
    field = "admin_keys_file" if admin else "api_keys_file"
    try:
        keys = cfg.http.admin_keys(environ) if admin else cfg.http.api_keys(environ)
    except OSError as e:
        path = Path(getattr(cfg.http, field) or "").expanduser().absolute()
        raise KeyFileMissing(
            f"http.{field}: cannot read {path} ({e.strerror or e}); write the accepted "
            f"{'admin' if admin else 'API'} keys there, one per line, or remove http.{field} "
            "from the config"
        ) from None
    return sorted({hashlib.sha256(k.encode()).hexdigest() for k in keys})


def warm_adapters(cfg: ServeAppConfig, model_id: str) -> list[str]:
    """The adapters of `model_id` that the experiments name, the most heavily weighted first:
    what each new replica of it preloads before it takes traffic (serve/server.py)."""
    weight: dict[str, float] = {}
    for e in cfg.experiments:
        total = sum(v.weight for v in e.variants)
        for v in e.variants:
            if v.model == model_id and v.adapter:
                weight[v.adapter] = weight.get(v.adapter, 0) + v.weight / total
    if cfg.release and cfg.release.adapter not in weight:
        weight[cfg.release.adapter] = 0.0
    return sorted(weight, key=lambda a: -weight[a])


def build_app(cfg: ServeAppConfig, resolved: Resolved):
    """Serve `Application`: LLM deployments (one per base model) behind the experiment ingress.
    Pure: everything it needs from outside the config comes in `resolved`."""
    from ray import serve

    from serve.ingress import ENDPOINTS, FleetIngress, make_app
    from serve.ray_internal import build_llm_deployment, make_fastapi_ingress, to_model_metadata
    from serve.release import releases_uri
    from serve.server import LoraStoreServer

    root = resolved.adapter_root
    llm_configs = {m.id: llm_config_for(m, resolved.model_sources[m.id]) for m in cfg.models}
    deployments = {
        mid: build_llm_deployment(
            c,
            deployment_cls=LoraStoreServer,
            bind_kwargs={
                "adapter_root": root,
                "warm": warm_adapters(cfg, mid),
                "releases_uri": releases_uri(cfg.storage.root, cfg.name),
            },
        )
        for mid, c in llm_configs.items()
    }
    cards = {mid: to_model_metadata(mid, c) for mid, c in llm_configs.items()}
    state, release = _state_deployments(cfg, resolved)
    ingress_cls = make_fastapi_ingress(FleetIngress, endpoint_map=ENDPOINTS, app=make_app())
    return serve.deployment(
        ingress_cls,
        name=INGRESS_NAME,
        num_replicas=cfg.http.ingress_replicas,
        max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0.1},
    ).bind(
        llm_deployments=deployments,
        model_cards=cards,
        app_config=cfg.model_dump(mode="json"),
        adapter_root=root,
        base_ids=dict(resolved.base_ids or {}),
        key_hashes=list(resolved.key_hashes),
        admin_key_hashes=list(resolved.admin_key_hashes),
        state=state,
        release=release,
    )


def _state_deployments(cfg: ServeAppConfig, resolved: Resolved):
    """The app's two one-replica deployments every ingress replica syncs with: the experiments'
    tables and counts, and the canary releases (serve/release.py)."""
    from ray import serve

    from serve.experiments import ExperimentState
    from serve.release import ReleaseManager

    # every ingress replica waits on these: a short health check replaces a dead one soon
    options = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}, "health_check_period_s": 2}
    state = serve.deployment(ExperimentState, name="ExperimentState", **options).bind(
        [e.model_dump(mode="json") for e in cfg.experiments], state_uri=resolved.state_uri
    )
    release = serve.deployment(ReleaseManager, name="ReleaseManager", **options).bind(
        cfg.name, cfg.storage.root, resolved.adapter_root
    )
    return state, release


def check_store(cfg: ServeAppConfig, log=print) -> None:
    """Say which adapters the experiments need and whether the store has them (before start)."""
    from cluster.store import versions

    root = adapters_root(cfg.storage.root)
    for e in cfg.experiments:
        for v in e.variants:
            if v.adapter and versions.current(root, v.adapter) is None:
                log(
                    f"[serve] warning: experiment {e.name!r} variant {v.name!r} names adapter "
                    f"{v.adapter!r}, which is not in {root} yet; its requests get 404 until it is "
                    "published"
                )


class Unservable(LorafleetError):
    """Adapters the app names (experiments, release) that vLLM cannot serve."""


def check_servable(cfg: ServeAppConfig, log=print) -> None:
    """Refuse, before Ray starts, the adapters the experiments and the release name whose
    current version vLLM cannot serve (DoRA, adapter bias, modules_to_save, non-LoRA methods:
    cluster/store/servability.py), each with the reason and `lorafleet merge` as the way out. Other
    such adapters in the store get a warning here, and a 400 from the ingress if requested."""
    from cluster.store import versions
    from serve.store import is_adapter_name, version_refusal

    root = adapters_root(cfg.storage.root)
    named = {v.adapter for e in cfg.experiments for v in e.variants if v.adapter}
    if cfg.release:
        named.add(cfg.release.adapter)
    refused, others = [], []
    listed = versions.listing(root)  # the store's index: one read, not one per adapter
    for name in sorted(set(listed) | named):
        version = listed.get(name) or (
            versions.current(root, name) if is_adapter_name(name) else None
        )
        why = version_refusal(root, name, version) if version else None
        if why:
            (refused if name in named else others).append(why)
    for why in others:
        log(f"[serve] warning: {why}; requests for it get 400")
    if refused:
        raise Unservable("lorafleet serve: " + "\n".join(refused))


def run(cfg: ServeAppConfig, blocking: bool = True, log=print, environ=None):
    """Deploy on Ray Serve (local Ray, or the cluster in `ray.address` / $RAY_ADDRESS). The API
    keys come from `environ` (default: os.environ) and the key file."""
    from ray import serve

    from cluster.ray_connect import ensure_ray, running_serve_mode
    from serve import ray_internal  # noqa: F401  (checks Ray's version before anything starts)

    resolved = resolve(cfg, os.environ if environ is None else environ)  # fails before Ray starts
    check_store(cfg, log)
    check_servable(cfg, log)  # an adapter vLLM cannot load is refused before anything starts
    ensure_ray(cfg.ray, log=log, serve_mode=cfg.http.mode)
    try:
        mode = running_serve_mode()  # the running Ray's, which a YAML cannot change
    except LorafleetError as e:
        if not resolved.key_hashes:  # open only where the mode is known to be safe
            raise LorafleetError(f"{e}; with no API key set, lorafleet serve needs it") from None
        log(f"[serve] warning: {e}; the API keys protect it whatever the mode")
        mode = cfg.http.mode
    check_exposed(cfg.http, resolved.key_hashes, running_mode=mode)
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    app = build_app(cfg, resolved)
    url = f"http://{cfg.http.host}:{cfg.http.port}"
    log(
        f"[serve] deploying {cfg.name!r}: {len(cfg.models)} model(s), http.mode "
        f"{mode}; vLLM start takes a minute"
    )
    handle = serve.run(app, name=cfg.name, route_prefix="/", blocking=False)
    names = [m.id for m in cfg.models] + [e.name for e in cfg.experiments]
    log(f"[serve] ready at {url}/v1  models: {', '.join(names)}")
    if blocking:
        import signal
        import threading
        import time

        def _stop(signum, frame):
            raise KeyboardInterrupt

        # `kill`, `docker stop` and systemd send SIGTERM: stop the app the way Ctrl-C does
        # (signal handlers can only be set from the main thread)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _stop)
        log("[serve] Ctrl-C (or SIGTERM) stops the app")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            log(f"[serve] stopping {cfg.name!r}")
            try:
                serve.delete(cfg.name)
            except KeyboardInterrupt:  # a second Ctrl-C: leave at once
                pass
            log("[serve] stopped")
    return handle
