"""lorafleet's OpenAI-compatible ingress: Ray Serve LLM's `OpenAiIngress` plus experiments,
releases, API keys, per-variant metrics and 4xx answers for bad requests, all in the one HTTP hop.
Every route (`ROUTES` below; a test checks this list against it). [admin]: needs an admin key
(serve/auth.py: one dependency on every admin route, `require_admin`).

    GET  /v1/models                      base models, their adapters (`<model>:<adapter>`), experiments
    GET  /v1/models/{model}              one of those cards
    POST /v1/completions                 OpenAI completions (stream: true gives server-sent events)
    POST /v1/chat/completions            OpenAI chat completions (stream too)
    GET  /v1/experiments                 weights, shares, per-variant counts and outcomes
    PUT  /v1/experiments/{name}          [admin] {"weights": {"a": 50, "b": 50}}: re-weight, no redeploy
    POST /v1/feedback                    {"response_id": ..., "reward": 1 | 0.3 | "up" | "down"}
                                         or {"experiment": ..., "user": ..., "reward": ...}; a
                                         response id is signed (serve/feedback_ids.py) and counts
                                         once (409 after), rate-limited (429)
    POST /v1/releases                    [admin] start a canary release {adapter, version, steps, gates,
                                         eval, shadow}
    GET  /v1/releases                    every release: state, step, counts, decision log
    GET  /v1/releases/{adapter}          one release
    POST /v1/releases/{adapter}/abort    [admin] roll it back now
    POST /v1/releases/{adapter}/pause    [admin] hold it at its step
    POST /v1/releases/{adapter}/resume   [admin] its step again, on fresh counts
    GET  /v1/adapters/{name}             versions, current, history, replicas holding it
    POST /v1/adapters/{name}/versions    [admin] {"source": folder | s3://... | hub id, "model": ...}:
                                         import a PEFT folder as a new version (checked first)
    POST /v1/adapters/{name}/{action}    [admin] promote {"version": ...}: move `current` to it;
                                         rollback: `current` back one version
    GET  /ui                             the experiments and releases page (serve/ui.py; the key
                                         as the password of HTTP Basic, any user name)
    GET  /ui/static/{name}               its script, style sheet and Chart.js

A request whose `model` is an experiment is given a variant by its user id (the OpenAI `user`
field, else the `X-User-Id` header); the response names it in `X-Lorafleet-Variant`.
"""

from __future__ import annotations

import asyncio
import math
import random
import time

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import JSONResponse

from cluster.config.serve import ServeAppConfig
from serve.answer import AnswerMixin, _RecordedHandle
from serve.api_checks import ALLOWED_FIELDS, Limits, Rejected
from serve.auth import SAFE_METHODS, Access, ApiError, RateLimits, current, require_admin
from serve.experiments import REMEMBER_TIMEOUT_S, Table, tables_for
from serve.feedback_ids import FeedbackIds
from serve.gate import RequestGate
from serve.metrics import VariantMetrics
from serve.names import MISS_TTL_S, NamesMixin
from serve.ray_internal import ChatCompletionRequest, CompletionRequest, OpenAiIngress, init
from serve.routes import adapters, experiments, openai, releases, ui
from serve.routes.adapters import LOADED_TTL_S, LoadedMixin
from serve.routes.releases import ReleaseRoutingMixin
from serve.shadow import ShadowMixin
from serve.store import AdapterStore

__all__ = ["MISS_TTL_S", "ApiError", "FleetIngress", "make_app"]

SYNC_INTERVAL_S = 1.0
# the only routes that change anything and that an API key (not only an admin key) may call
INFERENCE_WRITES = frozenset({"completions", "chat", "feedback"})
ROUTERS = [
    router
    for module in (openai, experiments, releases, adapters, ui)
    for router in (module.router, module.admin)
]


def _error_response(e: Rejected) -> JSONResponse:
    return JSONResponse(
        status_code=e.status,
        content={
            "error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}
        },
        headers=_retry_after(e),
    )


def _retry_after(e: Rejected) -> dict | None:
    """Retry-After for a 503 (1 s) or a 429 (when the caller's window frees a request)."""
    if e.status == 429:
        return {"Retry-After": str(max(math.ceil(getattr(e, "retry_after_s", 1) or 1), 1))}
    return {"Retry-After": "1"} if e.status == 503 else None


def is_admin_route(name: str, method: str) -> bool:
    """Every route that changes something is admin, except the inference writes."""
    return method not in SAFE_METHODS and name not in INFERENCE_WRITES


def check_admin_routes(routers) -> int:
    """Refuse routers in which a route that changes the server lacks `require_admin`, or an
    inference route has it (a route added to `router` instead of `admin` fails at start). The
    routers' own routes are read, not the app's (FastAPI 0.137+ nests included routers)."""
    checked = 0
    for route in (r for router in routers for r in router.routes):
        if not isinstance(route, APIRoute):
            continue
        guarded = require_admin in {d.call for d in route.dependant.dependencies}
        for method in route.methods:
            checked += 1
            if is_admin_route(route.name, method) != guarded:
                why = (
                    "changes the server but is not on an admin router"
                    if not guarded
                    else ("is an inference route on an admin router")
                )
                raise RuntimeError(f"route {method} {route.path} ({route.name}) {why}")
    if not checked:
        raise RuntimeError("no route to check: the routers hold no APIRoute")
    return checked


def make_app():
    """Ray Serve LLM's FastAPI app (its error middleware turns body validation errors into 400)
    plus our ApiError handler and every router of serve/routes/, behind `RequestGate` (added last,
    so it runs first: the key, the body's size and the checks of serve/api_checks.py come before
    FastAPI reads a body)."""
    app = init()

    async def _api_error(request, exc: Rejected):
        return _error_response(exc)

    app.add_exception_handler(Rejected, _api_error)
    check_admin_routes(ROUTERS)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(RequestGate, gate=current)
    return app


# every route: name -> (HTTP method, path); the module docstring lists them (a test checks)
ROUTES = {
    route.name: (next(iter(route.methods)), route.path)
    for router in ROUTERS
    for route in router.routes
}
# Ray's make_fastapi_ingress decorates class methods by this map: the routes are functions of
# serve/routes/ instead, mounted by make_app
ENDPOINTS: dict = {}


def _allowed_fields() -> dict[str, frozenset]:
    """The body fields each generation endpoint takes: api_checks.ALLOWED_FIELDS (an allow-list),
    less any that this vLLM's request models do not have."""
    engine = {"completions": CompletionRequest, "chat": ChatCompletionRequest}
    return {k: ALLOWED_FIELDS[k] & frozenset(m.model_fields) for k, m in engine.items()}


class FleetIngress(
    NamesMixin, AnswerMixin, ShadowMixin, ReleaseRoutingMixin, LoadedMixin, OpenAiIngress
):
    """One ingress replica's state: the config, the store, the keys, the experiments' tables and
    counts, the releases' tables; and the plumbing that keeps them in step with the app's
    ExperimentState and ReleaseManager replicas. The routes are in serve/routes/."""

    def __init__(
        self,
        llm_deployments: dict,
        model_cards: dict,
        *,
        app_config: dict,
        adapter_root: str,
        key_hashes: list[str],
        admin_key_hashes: list[str] | None = None,
        state,
        base_ids: dict[str, str] | None = None,
        release=None,
    ):
        super().__init__(llm_deployments, model_cards)
        self.llm_handles = dict(llm_deployments)  # model id -> its vLLM deployment's handle
        self._loaded_at: tuple[float, dict | None] = (-LOADED_TTL_S, None)
        self._loaded_lock = asyncio.Lock()
        self.cfg = ServeAppConfig.model_validate(app_config)
        self.bases = {m.id: m.base for m in self.cfg.models}
        self.experiments = {e.name: e for e in self.cfg.experiments}
        self.store = AdapterStore(adapter_root)
        self.base_ids = base_ids or {}  # model id -> fingerprint of the base it serves
        h = self.cfg.http
        self.access = Access(
            key_hashes,
            admin_key_hashes or [],
            open_admin=h.open_admin_on_loopback,
            admin_keys_env=h.admin_keys_env,
        )
        self.rate_limits = RateLimits(
            {"feedback": h.feedback_rate_limit, "admin": h.admin_rate_limit}
        )
        self.state = state
        self.feedback_ids: FeedbackIds | None = None  # from the state replica's secret, at a sync
        self.tables = tables_for(app_config["experiments"])
        self.version = 0
        self.rng = random.Random()
        self.metrics = VariantMetrics()
        self._last_sync = 0.0
        self._sync_task: asyncio.Task | None = None
        self.release = release  # the ReleaseManager's handle (serve/release.py)
        self.releases: dict[str, tuple[str, str, Table]] = {}  # adapter -> control, candidate
        self.release_version = -1
        self.release_counts: dict[str, dict[str, dict[str, float]]] = {}
        self.pending_outcomes: list[tuple[str, str, float]] = []  # (adapter, arm, reward)
        self.background: set[asyncio.Task] = set()  # shadow answers and eval gates running
        self.limits = Limits(
            max_body_bytes=h.max_body_bytes, max_n=h.max_n, max_prompts=h.max_prompts
        )
        self.allowed = _allowed_fields()
        self.max_model_len = {
            m.id: m.max_model_len or m.engine_kwargs.get("max_model_len") for m in self.cfg.models
        }
        self._misses: dict[tuple[str, str | None], float] = {}  # adapter not found -> when

    # --- plumbing -------------------------------------------------------------------------

    def _auth(self, request: Request, admin: bool = False) -> str:
        """serve/auth.py's rules for this request: the caller's role, or ApiError 401/403."""
        return self.access.check(request, admin)

    def _get_configured_serve_handle(self, model_id: str):
        # Ray's _get_response calls vLLM through this handle; recorded, a 504 can cancel it
        return _RecordedHandle(super()._get_configured_serve_handle(model_id))

    def check_key(self, scope) -> None:
        """RequestGate's key check (api_checks.Gate): `_auth` on the headers alone."""
        self._auth(Request(scope))

    async def _feedback_signer(self) -> FeedbackIds | None:
        """What signs and verifies this app's response ids, made once from the secret the state
        replica holds (every replica, and every restart, gets the same); None while it cannot
        be asked."""
        if self.feedback_ids is None:
            try:
                call = self.state.feedback_key.remote()
                secret = await asyncio.wait_for(call, REMEMBER_TIMEOUT_S)
                self.feedback_ids = FeedbackIds(secret, self.cfg.http.feedback_max_age_s)
            except Exception as e:  # the state replica restarting: the next sync asks again
                print(f"[ingress] cannot get the feedback secret yet: {type(e).__name__}: {e}")
        return self.feedback_ids

    async def _sync(self) -> None:
        """Push this replica's counts to the shared state; pull re-weighted tables (and, once,
        the feedback secret)."""
        if self.feedback_ids is None:
            await self._feedback_signer()
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
        await self._sync_releases()

    def _maybe_sync(self) -> None:
        now = time.monotonic()
        if now - self._last_sync > SYNC_INTERVAL_S and (
            self._sync_task is None or self._sync_task.done()
        ):
            self._last_sync = now
            self._sync_task = asyncio.get_running_loop().create_task(self._sync())

    async def check_health(self):
        self._maybe_sync()
