"""Every private piece of Ray that lorafleet's serve package uses, in one place.

Ray Serve LLM's public API (`ray.serve.llm`) builds a stock OpenAI app; lorafleet's ingress and its
LoRA loader need pieces below it: the request and response models, the ingress's FastAPI
factory and response helpers, the LoRA loader and its disk config, and two private methods
(`LLMServer._maybe_resolve_lora_from_multiplex`, overridden in `serve.server`, and
`OpenAiIngress._get_response`, called in `serve.ingress`). They were read from Ray
`RAY_VERSION`; private modules change without notice between releases, so importing this module
with any other Ray fails at once, with a message that says what to do, rather than later, deep in
a replica.
"""

from __future__ import annotations

import ray

from cluster.errors import LorafleetError

# the Ray release the imports below were read from (pyproject.toml pins the same one)
RAY_VERSION = "2.60.0"


class RayVersionError(LorafleetError):
    """The installed Ray is not the release serve's private imports were read from."""


def check_ray_version(found: str | None = None) -> None:
    """Raise RayVersionError unless Ray `found` (default: the installed one) is `RAY_VERSION`."""
    found = ray.__version__ if found is None else found
    if found != RAY_VERSION:
        raise RayVersionError(
            f"lorafleet serve needs Ray {RAY_VERSION} (it uses Ray Serve LLM's private modules, "
            f"read from that release), but Ray {found} is installed: run "
            f"`pip install 'ray[serve]=={RAY_VERSION}'`, or port serve/ray_internal.py to Ray "
            f"{found} and set RAY_VERSION there"
        )


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

# private methods lorafleet overrides or calls: gone or renamed means the code above moved
for _cls, _method in (
    (LLMServer, "_maybe_resolve_lora_from_multiplex"),
    (OpenAiIngress, "_get_response"),
):
    if not callable(getattr(_cls, _method, None)):
        raise RayVersionError(
            f"Ray {ray.__version__}: {_cls.__name__}.{_method} is gone; serve/ray_internal.py "
            f"was written against Ray {RAY_VERSION}"
        )

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
    "make_fastapi_ingress",
    "open_ai_json_wrapper",
    "peek_at_generator",
    "to_model_metadata",
]

# Ray's helpers under names that do not look private where they are used
open_ai_json_wrapper = _openai_json_wrapper
peek_at_generator = _peek_at_generator
