"""lorafleet's OpenAI-compatible ingress: Ray Serve LLM's `OpenAiIngress` plus experiments,
API keys, per-variant metrics and 4xx answers for bad requests, all in the one HTTP hop.

    GET  /v1/models                      base models, their adapters (`<model>:<adapter>`), experiments
    POST /v1/completions, /v1/chat/completions   (stream: true gives server-sent events)
    GET  /v1/experiments                 weights, shares and per-variant counts
    PUT  /v1/experiments/{name}          {"weights": {"a": 50, "b": 50}}: re-weight, no redeploy

A request whose `model` is an experiment is given a variant by its user id (the OpenAI `user`
field, else the `X-User-Id` header); the response names it in `X-Lorafleet-Variant`.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import hmac
import json
import random
import time
import typing
from typing import Any

from fastapi import Request
from ray.exceptions import RayActorError
from starlette.responses import JSONResponse, Response, StreamingResponse

from cluster.schema_base import is_valid_name
from cluster.serve_config import ServeAppConfig
from serve.experiments import (
    EXPERIMENT_HEADER,
    VARIANT_HEADER,
    Table,
    merge_counts,
    tables_for,
)
from serve.ray_internal import (
    NON_STREAMING_RESPONSE_TYPES,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    OpenAiIngress,
    init,
    open_ai_json_wrapper,
    peek_at_generator,
)
from serve.store import AdapterStore, base_key

USER_HEADER = "x-user-id"
SYNC_INTERVAL_S = 1.0
LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class ApiError(Exception):
    """An error answered with its status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(
        status_code=e.status,
        content={
            "error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}
        },
        headers={"Retry-After": "1"} if e.status == 503 else None,
    )


def make_app():
    """Ray Serve LLM's FastAPI app (its error middleware turns body validation errors into 400)
    plus our ApiError handler."""
    app = init()

    async def _api_error(request, exc: ApiError):
        return _error_response(exc)

    app.add_exception_handler(ApiError, _api_error)
    return app


class _Metrics:
    """Per experiment and variant: requests, errors, latency, tokens (Prometheus through Ray's
    metrics agent), and the same counts kept here for the JSON summary."""

    def __init__(self):
        from ray.serve import metrics

        tags = ("experiment", "variant")
        self.requests = metrics.Counter(
            "lorafleet_requests", "Requests per experiment variant.", tag_keys=tags
        )
        self.errors = metrics.Counter(
            "lorafleet_errors", "Failed requests per experiment variant.", tag_keys=tags
        )
        self.latency = metrics.Histogram(
            "lorafleet_latency_s",
            "Request latency per experiment variant (seconds, to the last byte).",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=tags,
        )
        self.prompt_tokens = metrics.Counter(
            "lorafleet_prompt_tokens", "Prompt tokens per experiment variant.", tag_keys=tags
        )
        self.completion_tokens = metrics.Counter(
            "lorafleet_completion_tokens",
            "Completion tokens per experiment variant.",
            tag_keys=tags,
        )
        self.pending: dict[str, dict[str, dict[str, float]]] = {}

    def record(self, exp: str, var: str, *, ok: bool, latency_s: float, prompt=0, completion=0):
        tags = {"experiment": exp, "variant": var}
        self.requests.inc(1, tags)
        if not ok:
            self.errors.inc(1, tags)
        self.latency.observe(latency_s, tags)
        if prompt:
            self.prompt_tokens.inc(prompt, tags)
        if completion:
            self.completion_tokens.inc(completion, tags)
        c = self.pending.setdefault(exp, {}).setdefault(var, {})
        for k, v in (
            ("requests", 1),
            ("errors", 0 if ok else 1),
            ("latency_s_sum", latency_s),
            ("prompt_tokens", prompt),
            ("completion_tokens", completion),
        ):
            c[k] = c.get(k, 0) + v

    def take(self) -> dict:
        out, self.pending = self.pending, {}
        return out

    def put_back(self, taken: dict) -> None:
        """Counts a failed sync took: added to what came in since, for the next sync (at least
        once: a sync whose reply was lost after the state applied it counts twice)."""
        merge_counts(self.pending, taken)


def _usage(obj) -> tuple[int, int]:
    usage = getattr(obj, "usage", None) if not isinstance(obj, dict) else obj.get("usage")
    if usage is None:
        return 0, 0
    if not isinstance(usage, dict):
        usage = usage.model_dump()
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _sse_items(chunk) -> list:
    """The JSON objects in one streamed chunk (objects, lists, or 'data: ...' strings)."""
    items = chunk if isinstance(chunk, list) else [chunk]
    out = []
    for it in items:
        if isinstance(it, str):
            for line in it.split("\n"):
                line = line.strip()
                if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                    try:
                        out.append(json.loads(line[5:]))
                    except ValueError:
                        pass
        elif hasattr(it, "model_dump"):
            out.append(it.model_dump())
        elif isinstance(it, dict):
            out.append(it)
    return out


class FleetIngress(OpenAiIngress):
    def __init__(
        self,
        llm_deployments: dict,
        model_cards: dict,
        *,
        app_config: dict,
        adapter_root: str,
        key_hashes: list[str],
        state,
    ):
        super().__init__(llm_deployments, model_cards)
        self.cfg = ServeAppConfig.model_validate(app_config)
        self.bases = {m.id: m.base for m in self.cfg.models}
        self.experiments = {e.name: e for e in self.cfg.experiments}
        self.store = AdapterStore(adapter_root, self.cfg.storage.root)
        self.base_keys = {m.id: base_key(m.base, self.cfg.storage.root) for m in self.cfg.models}
        self.key_hashes = [bytes.fromhex(h) for h in key_hashes]
        self.state = state
        self.tables = tables_for(app_config["experiments"])
        self.version = 0
        self.rng = random.Random()
        self.metrics = _Metrics()
        self._last_sync = 0.0
        self._sync_task: asyncio.Task | None = None

    # --- plumbing -------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if not self.key_hashes:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token:
            digest = hashlib.sha256(token.strip().encode()).digest()
            if any(hmac.compare_digest(digest, h) for h in self.key_hashes):
                return
        raise ApiError(
            401,
            "missing or invalid API key: send `Authorization: Bearer <key>`",
            "authentication_error",
        )

    async def _sync(self) -> None:
        """Push this replica's counts to the shared state; pull re-weighted tables."""
        counts = self.metrics.take()
        try:
            await self.state.add_counts.remote(counts)
        except Exception as e:  # the state replica restarting must not fail requests
            self.metrics.put_back(counts)  # sent with the next sync instead
            print(f"[ingress] experiment state sync failed: {e!r}")
            return
        try:
            version, snap = await self.state.snapshot.remote(self.version)
            if snap is not None:
                self.tables = {n: Table(v, w, o) for n, (v, w, o) in snap.items()}
                self.version = version
        except Exception as e:  # the state replica restarting must not fail requests
            print(f"[ingress] experiment state sync failed: {e!r}")

    def _maybe_sync(self) -> None:
        now = time.monotonic()
        if now - self._last_sync > SYNC_INTERVAL_S and (
            self._sync_task is None or self._sync_task.done()
        ):
            self._last_sync = now
            self._sync_task = asyncio.get_running_loop().create_task(self._sync())

    async def check_health(self):
        self._maybe_sync()

    # --- names ----------------------------------------------------------------------------

    def _fits(self, trained_on: str | None, model_id: str) -> bool:
        """An adapter fits a model trained on the same base; one without lorafleet.json fits any."""
        return trained_on is None or trained_on == self.base_keys[model_id]

    async def _not_found(self, model: str, what: str) -> ApiError:
        names = [c["id"] for c in await self._cards()]
        close = difflib.get_close_matches(model, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        return ApiError(
            404,
            f"{what}. Served: models {sorted(self.bases)}, experiments "
            f"{sorted(self.experiments)}, adapters as '<model>:<adapter>' (GET /v1/models).{hint}",
            "model_not_found",
            "model",
        )

    async def _check_target(self, model: str) -> None:
        """404 for unknown models and adapters (Ray's ingress answers 500), 400 for bad names."""
        base_id, sep, adapter = model.partition(":")
        if base_id not in self.bases:
            raise await self._not_found(model, f"model {model!r} does not exist")
        if not sep:
            return
        if not is_valid_name(adapter):
            raise ApiError(
                400,
                f"invalid adapter name {adapter!r}: letters, digits, '.', '_', '-' only, no '..'",
                param="model",
            )
        adapters = await self.store.adapters()
        if adapter not in adapters:
            adapters = await self.store.adapters(refresh=True)  # published since the last listing
        if adapter not in adapters:
            raise await self._not_found(model, f"adapter {adapter!r} is not in the adapter store")
        trained_on = adapters[adapter]
        if not self._fits(trained_on, base_id):
            raise ApiError(
                400,
                f"adapter {adapter!r} was trained on {trained_on!r}, but model {base_id!r} serves "
                f"{self.bases[base_id]!r}",
                param="model",
            )

    @staticmethod
    def _check_params(body) -> None:
        problems = []
        for key in ("max_tokens", "max_completion_tokens"):
            v = getattr(body, key, None)
            if v is not None and v <= 0:
                problems.append(f"{key} must be a positive integer. Got {v}")
        t = getattr(body, "temperature", None)
        if t is not None and t < 0:
            problems.append(f"temperature must be >= 0. Got {t}")
        p = getattr(body, "top_p", None)
        if p is not None and not 0 < p <= 1:
            problems.append(f"top_p must be in (0, 1]. Got {p}")
        n = getattr(body, "n", None)
        if n is not None and n < 1:
            problems.append(f"n must be >= 1. Got {n}")
        if problems:
            raise ApiError(400, "; ".join(problems))

    # --- requests -------------------------------------------------------------------------

    async def _route(self, body, request: Request) -> tuple[str | None, str | None]:
        """Rewrite an experiment name to its variant's `model[:adapter]`; (experiment, variant)."""
        if not body.model:
            raise ApiError(400, "`model` is required", param="model")
        exp = self.experiments.get(body.model)
        if exp is None:
            await self._check_target(body.model)
            return None, None
        user = body.user or request.headers.get(USER_HEADER)
        name = self.tables[exp.name].assign(exp.name, user, self.rng)
        v = next(x for x in exp.variants if x.name == name)
        body.model = f"{v.model}:{v.adapter}" if v.adapter else v.model
        await self._check_target(body.model)
        return exp.name, name

    async def _serve(self, body, call_method: str, request: Request) -> Response:
        self._auth(request)
        self._maybe_sync()
        self._check_params(body)
        exp, var = await self._route(body, request)
        track = exp is not None
        t0 = time.perf_counter()
        headers = {VARIANT_HEADER: var, EXPERIMENT_HEADER: exp} if track else {}

        def done(ok: bool, prompt=0, completion=0):
            if track:
                self.metrics.record(
                    exp,
                    var,
                    ok=ok,
                    latency_s=time.perf_counter() - t0,
                    prompt=prompt,
                    completion=completion,
                )

        # the usage block is how tokens are counted; a stream carries it only when asked
        wants_usage = bool(getattr(body, "stream_options", None)) and bool(
            getattr(body.stream_options, "include_usage", False)
        )
        if getattr(body, "stream", False) and track and not wants_usage:
            options_cls = typing.get_args(type(body).model_fields["stream_options"].annotation)[0]
            body.stream_options = options_cls(include_usage=True)
        try:
            gen = self._get_response(body=body, call_method=call_method, raw_request=request)
            first, gen = await peek_at_generator(gen)
        except RayActorError as e:  # the replica died mid-request; Serve replaces it
            done(False)
            raise ApiError(
                503,
                f"the replica serving {body.model!r} stopped; retry the request",
                "server_error",
            ) from e
        except Exception:
            done(False)
            raise
        head = first[0] if isinstance(first, list) else first
        if isinstance(head, ErrorResponse):
            done(False)
            code = head.error.code
            raise ApiError(code if 400 <= code < 600 else 500, head.error.message, head.error.type)
        if isinstance(head, NON_STREAMING_RESPONSE_TYPES):
            done(True, *_usage(head))
            return JSONResponse(content=head.model_dump(), headers=headers)

        async def counted():
            prompt = completion = 0
            ok = False
            try:
                async for chunk in gen:
                    if track:
                        items = _sse_items(chunk)
                        for it in items:
                            p, c = _usage(it)
                            prompt, completion = max(prompt, p), max(completion, c)
                        # the usage-only chunk we asked for is not the client's
                        if (
                            not wants_usage
                            and items
                            and all(not it.get("choices") and it.get("usage") for it in items)
                        ):
                            continue
                    yield chunk
                ok = True
            finally:
                done(ok, prompt, completion)

        return StreamingResponse(
            open_ai_json_wrapper(counted()), media_type="text/event-stream", headers=headers
        )

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._serve(body, "completions", request)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._serve(body, "chat", request)

    async def _cards(self) -> list[dict]:
        """OpenAI model cards: each base, the adapters that fit it, each experiment."""
        adapters = await self.store.adapters()
        now = int(time.time())

        def card(mid, root, parent=None, **extra):
            return {
                "id": mid,
                "object": "model",
                "created": now,
                "owned_by": "lorafleet",
                "root": root,
                "parent": parent,
                **extra,
            }

        cards = []
        for mid, base in self.bases.items():
            cards.append(card(mid, base))
            cards += [
                card(f"{mid}:{a}", a, mid)
                for a, b in sorted(adapters.items())
                if self._fits(b, mid)
            ]
        for name, e in self.experiments.items():
            cards.append(card(name, name, experiment={"variants": [v.name for v in e.variants]}))
        return cards

    async def models(self, request: Request):
        self._auth(request)
        return JSONResponse({"object": "list", "data": await self._cards()})

    async def model_data(self, model: str, request: Request):
        self._auth(request)
        for card in await self._cards():
            if card["id"] == model:
                return JSONResponse(card)
        raise await self._not_found(model, f"model {model!r} does not exist")

    async def list_experiments(self, request: Request):
        self._auth(request)
        await self._sync()
        summary = await self.state.summary.remote()
        for name, e in self.experiments.items():
            for v in e.variants:
                summary[name]["variants"][v.name]["target"] = (
                    f"{v.model}:{v.adapter}" if v.adapter else v.model
                )
        return JSONResponse({"experiments": summary})

    async def set_weights(self, name: str, request: Request):
        self._auth(request)
        if name not in self.experiments:
            raise ApiError(
                404,
                f"unknown experiment {name!r}; expected one of {sorted(self.experiments)}",
                "not_found",
            )
        try:
            payload: Any = json.loads(await request.body())
        except ValueError as e:
            raise ApiError(400, f"body is not valid JSON: {e}") from None
        weights = payload.get("weights") if isinstance(payload, dict) else None
        if not isinstance(weights, dict):
            raise ApiError(400, 'expected {"weights": {"<variant>": <positive number>, ...}}')
        result = await self.state.set_weights.remote(name, weights)
        if "error" in result:
            raise ApiError(400, result["error"])
        await self._sync()
        return JSONResponse(result)


ENDPOINTS = {
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "list_experiments": lambda app: app.get("/v1/experiments"),
    "set_weights": lambda app: app.put("/v1/experiments/{name}"),
}
