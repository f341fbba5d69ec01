"""Every private piece of Ray that lorafleet's serve package uses, in one place.

Ray Serve LLM's public API (`ray.serve.llm`) builds a stock OpenAI app; lorafleet's ingress and its
LoRA loader need pieces below it: the request and response models, the ingress's FastAPI
factory and response helpers, the LoRA loader and its disk config, private methods and
attributes (`LLMServer._maybe_resolve_lora_from_multiplex`, overridden in `serve.server`, with
`LLMServer._llm_config`, `LLMServer._load_model` and `LoraModelLoader.disk_cache`;
`OpenAiIngress._get_response` and `_get_configured_serve_handle`, called in `serve.ingress`), and
Serve's controller's view of the adapters each replica holds (`loaded_model_ids`, for GET
/v1/adapters/{name}). They were read from Ray `RAY_VERSION` (cluster/ray_version.py) and are
checked below at import; private modules change without notice between releases, so importing
this module with any other Ray fails at once, with a message that says what to do, rather than
later, deep in a replica.
"""

from __future__ import annotations

import asyncio

import ray

from cluster import ray_version
from cluster.ray_version import RAY_VERSION, RayVersionError, require, require_in_source


def check_ray_version(found: str | None = None) -> None:
    """Raise RayVersionError unless Ray `found` (default: the installed one) is RAY_VERSION."""
    ray_version.check_ray_version(found, who="lorafleet serve")


check_ray_version()

# ruff: noqa: E402  (the check above must run before Ray's private modules are imported)
from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.common.utils.lora_utils import get_lora_id
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    to_model_metadata,
)
from ray.llm._internal.serve.core.ingress.ingress import (
    OpenAiIngress,
    init,
    make_fastapi_ingress,
)
from ray.llm._internal.serve.core.ingress.utils import (
    NON_STREAMING_RESPONSE_TYPES,
    _openai_json_wrapper,
    _peek_at_generator,
)
from ray.llm._internal.serve.core.server.builder import build_llm_deployment
from ray.llm._internal.serve.core.server.llm_server import LLMServer
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader
from ray.serve._private.common import DeploymentID, RunningReplicaInfo
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray.serve._private.long_poll import LongPollNamespace

# private methods and attributes lorafleet overrides, calls or reads (serve/server.py,
# serve/ingress.py): gone or renamed means the code above moved
_V = ray.__version__
require(LLMServer, ("_maybe_resolve_lora_from_multiplex",), "LLMServer", "Ray", _V)
require(
    OpenAiIngress, ("_get_response", "_get_configured_serve_handle"), "OpenAiIngress", "Ray", _V
)
require_in_source(LLMServer, ("self._llm_config =", "self._load_model ="), "LLMServer", _V)
require_in_source(LoraModelLoader, ("self.disk_cache",), "LoraModelLoader", _V)
if "multiplexed_model_ids" not in getattr(RunningReplicaInfo, "__dataclass_fields__", {}):
    raise RayVersionError(
        f"Ray {ray.__version__}: RunningReplicaInfo.multiplexed_model_ids is gone; "
        f"serve/ray_internal.py was written against Ray {RAY_VERSION}"
    )

_controller = None  # Serve's controller actor, looked up once (a restart keeps its handle)


async def loaded_model_ids(
    deployments: dict[str, tuple[str, str]], timeout_s: float
) -> dict[str, dict[str, list[str]]]:
    """{key: {replica id: multiplexed model ids}} for each `key: (app, deployment)`: the models
    each running replica has loaded or is loading, as Serve's controller last broadcast them to
    the routers (its DEPLOYMENT_TARGETS long-poll snapshot, `RunningReplicaInfo.
    multiplexed_model_ids`; a replica pushes its set within 0.1 s of a load or an eviction). A
    deployment the controller does not know yet is left out. TimeoutError after `timeout_s`."""
    global _controller
    if _controller is None:
        _controller = await asyncio.to_thread(
            ray.get_actor, SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE
        )
    keys = {
        (LongPollNamespace.DEPLOYMENT_TARGETS, DeploymentID(name=d, app_name=a)): k
        for k, (a, d) in deployments.items()
    }
    # snapshot ids are never negative: the controller answers at once with what it holds
    # (with no key it knows, it would wait for a change: hence the timeout)
    call = _controller.listen_for_change.remote(dict.fromkeys(keys, -1))
    updated = await asyncio.wait_for(call, timeout_s)
    if not isinstance(updated, dict):  # LongPollState.TIME_OUT: none of the keys is known
        return {}
    return {
        keys[key]: {
            r.replica_id.unique_id: list(r.multiplexed_model_ids)
            for r in obj.object_snapshot.running_replicas
        }
        for key, obj in updated.items()
        if key in keys
    }


__all__ = [
    "NON_STREAMING_RESPONSE_TYPES",
    "RAY_VERSION",
    "ChatCompletionRequest",
    "CompletionRequest",
    "DiskMultiplexConfig",
    "ErrorResponse",
    "LLMServer",
    "LoraModelLoader",
    "OpenAiIngress",
    "RayVersionError",
    "build_llm_deployment",
    "check_ray_version",
    "get_lora_id",
    "global_id_manager",
    "init",
    "loaded_model_ids",
    "make_fastapi_ingress",
    "open_ai_json_wrapper",
    "peek_at_generator",
    "to_model_metadata",
]

# Ray's helpers under names that do not look private where they are used
open_ai_json_wrapper = _openai_json_wrapper
peek_at_generator = _peek_at_generator
