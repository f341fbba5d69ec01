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

from cluster.errors import LorafleetError
from cluster.layout import ADAPTER_CONFIG, adapters_root
from cluster.serve_config import ServeAppConfig, ServeModelConfig
from serve.store import resolve_base

INGRESS_NAME = "LorafleetIngress"


class KeyFileMissing(LorafleetError):
    """`http.api_keys_file` names a file that cannot be read."""


@dataclass(frozen=True)
class Resolved:
    """What the app takes from outside its config, read once at start by `resolve`."""

    model_sources: dict[str, str]  # model id -> the directory or hub id vLLM loads
    adapter_root: str  # absolute URI of `<storage.root>/adapters`
    key_hashes: list[str]  # SHA-256 of each accepted API key; empty: no auth


def resolve(cfg: ServeAppConfig, environ: Mapping[str, str]) -> Resolved:
    """Read the bases' locations, the adapter store's absolute root and the API keys (from
    `environ` and the key file). Raises a LorafleetError for a base never built or a missing
    key file, before anything starts."""
    return Resolved(
        model_sources={m.id: resolve_base(m.base, cfg.storage.root) for m in cfg.models},
        adapter_root=adapters_root(cfg.storage.root),
        key_hashes=api_key_hashes(cfg, environ),
    )


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
    }
    if m.max_model_len:
        engine["max_model_len"] = m.max_model_len
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
        "health_check_period_s": m.health_check_period_s,
        # the placement group below reserves the replica's CPUs; Ray adds this on top of it
        "ray_actor_options": {"num_cpus": 0},
    }
    env = {"TOKENIZERS_PARALLELISM": "false"}
    kwargs: dict[str, Any] = {}
    if m.use_gpu:
        kwargs["placement_group_config"] = {"bundles": [{"GPU": 1, "CPU": m.cpus_per_replica}]}
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


def api_key_hashes(cfg: ServeAppConfig, environ: Mapping[str, str]) -> list[str]:
    """SHA-256 of each accepted key, from the environment variable and/or the key file. Only the
    hashes travel to the ingress replicas, so keys never sit in Ray's deployment config."""
    try:
        keys = cfg.http.api_keys(environ)
    except OSError as e:
        path = Path(cfg.http.api_keys_file or "").expanduser().absolute()
        raise KeyFileMissing(
            f"http.api_keys_file: cannot read {path} ({e.strerror or e}); write the accepted "
            "API keys there, one per line, or remove http.api_keys_file from the config"
        ) from None
    return sorted({hashlib.sha256(k.encode()).hexdigest() for k in keys})


def build_app(cfg: ServeAppConfig, resolved: Resolved):
    """Serve `Application`: LLM deployments (one per base model) behind the experiment ingress.
    Pure: everything it needs from outside the config comes in `resolved`."""
    from ray import serve

    from serve.experiments import ExperimentState
    from serve.ingress import ENDPOINTS, FleetIngress, make_app
    from serve.ray_internal import build_llm_deployment, make_fastapi_ingress, to_model_metadata
    from serve.server import LoraStoreServer

    root = resolved.adapter_root
    llm_configs = {m.id: llm_config_for(m, resolved.model_sources[m.id]) for m in cfg.models}
    deployments = {
        mid: build_llm_deployment(
            c, deployment_cls=LoraStoreServer, bind_kwargs={"adapter_root": root}
        )
        for mid, c in llm_configs.items()
    }
    cards = {mid: to_model_metadata(mid, c) for mid, c in llm_configs.items()}
    state = serve.deployment(
        ExperimentState, name="ExperimentState", num_replicas=1, ray_actor_options={"num_cpus": 0}
    ).bind([e.model_dump(mode="json") for e in cfg.experiments])
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
        key_hashes=list(resolved.key_hashes),
        state=state,
    )


def check_store(cfg: ServeAppConfig, log=print) -> None:
    """Say which adapters the experiments need and whether the store has them (before start)."""
    from cluster import storage

    root = adapters_root(cfg.storage.root)
    for e in cfg.experiments:
        for v in e.variants:
            if v.adapter and not storage.exists(storage.join(root, v.adapter, ADAPTER_CONFIG)):
                log(
                    f"[serve] warning: experiment {e.name!r} variant {v.name!r} names adapter "
                    f"{v.adapter!r}, which is not in {root} yet; its requests get 404 until it is "
                    "published"
                )


def run(cfg: ServeAppConfig, blocking: bool = True, log=print, environ=None):
    """Deploy on Ray Serve (local Ray, or the cluster in `ray.address` / $RAY_ADDRESS). The API
    keys come from `environ` (default: os.environ) and the key file."""
    from ray import serve

    from cluster.ray_connect import ensure_ray
    from serve import ray_internal  # noqa: F401  (checks Ray's version before anything starts)

    resolved = resolve(cfg, os.environ if environ is None else environ)  # fails before Ray starts
    check_store(cfg, log)
    ensure_ray(cfg.ray, log=log)
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    app = build_app(cfg, resolved)
    url = f"http://{cfg.http.host}:{cfg.http.port}"
    log(f"[serve] deploying {cfg.name!r}: {len(cfg.models)} model(s); vLLM start takes a minute")
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
