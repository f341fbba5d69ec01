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
                                         response id counts once (409 after), rate-limited (429)
    POST /v1/releases                    [admin] start a canary release {adapter, version, steps, gates}
    GET  /v1/releases                    every release: state, step, counts, decision log
    GET  /v1/releases/{adapter}          one release
    POST /v1/releases/{adapter}/abort    [admin] roll it back now
    POST /v1/releases/{adapter}/pause    [admin] hold it at its step
    POST /v1/releases/{adapter}/resume   [admin] its step again, on fresh counts
    GET  /v1/adapters/{name}             versions, current, history, replicas holding it
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
import contextvars
import difflib
import json
import math
import random
import time
import typing
import uuid

from fastapi import Depends, Request
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.responses import JSONResponse, Response, StreamingResponse

from cluster import versions
from cluster.prompt_format import PromptFormatError
from cluster.schema_base import name_problem
from cluster.serve_config import ServeAppConfig
from cluster.versions import is_version_id
from serve import ui
from serve.api_checks import (
    ALLOWED_FIELDS,
    Limits,
    Rejected,
    RequestGate,
    check_context,
    deadline_s,
    parse_json,
)
from serve.auth import SAFE_METHODS, Access, ApiError, RateLimits
from serve.experiments import (
    EXPERIMENT_HEADER,
    REMEMBER_TIMEOUT_S,
    RESPONSE_ID_HEADER,
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
    loaded_model_ids,
    open_ai_json_wrapper,
    peek_at_generator,
)
from serve.release import ARMS as RELEASE_ARMS
from serve.release import RELEASE_PREFIX, latency_bucket
from serve.store import AdapterStore, Served, split_adapter

USER_HEADER = "x-user-id"
TIMEOUT_HEADER = "x-lorafleet-timeout-s"  # a client's own, shorter deadline (api_checks)
# an unknown adapter re-lists the store at most this often (a publish is seen within it)
MISS_TTL_S = 2.0
MAX_MISSES = 4096
RELEASE_ARM_HEADER = "X-Lorafleet-Release-Arm"  # control | candidate, while a release runs
SYNC_INTERVAL_S = 1.0
REWARD_BOUNDARIES = [0.25, 0.5, 0.75, 1.0]
# GET /v1/adapters/{name} asks Serve's controller what the replicas hold at most this often, and
# answers "unknown" (loaded_on: null) when it does not answer within the timeout
LOADED_TTL_S = 1.0
LOADED_TIMEOUT_S = 2.0
LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


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


def _replica_ingress():
    from ray import serve

    return serve.get_replica_context().servable_object  # the FleetIngress of this replica


def make_app():
    """Ray Serve LLM's FastAPI app (its error middleware turns body validation errors into 400)
    plus our ApiError handler, behind `RequestGate` (added last, so it runs first: the key, the
    body's size and the checks of serve/api_checks.py come before FastAPI reads a body)."""
    app = init()

    async def _api_error(request, exc: Rejected):
        return _error_response(exc)

    app.add_exception_handler(Rejected, _api_error)
    app.add_middleware(RequestGate, gate=_replica_ingress)
    return app


def _allowed_fields() -> dict[str, frozenset]:
    """The body fields each generation endpoint takes: api_checks.ALLOWED_FIELDS (an allow-list),
    less any that this vLLM's request models do not have."""
    engine = {"completions": CompletionRequest, "chat": ChatCompletionRequest}
    return {k: ALLOWED_FIELDS[k] & frozenset(m.model_fields) for k, m in engine.items()}


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
        self.feedback = metrics.Counter(
            "lorafleet_feedback",
            "Outcomes (POST /v1/feedback) per experiment variant.",
            tag_keys=tags,
        )
        # a histogram: its _sum is the reward sum (rewards may be negative; a counter cannot fall)
        self.reward = metrics.Histogram(
            "lorafleet_reward",
            "Rewards per experiment variant (_sum: reward sum, _count: outcomes).",
            boundaries=REWARD_BOUNDARIES,
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
            (latency_bucket(latency_s), 1),  # the /ui page's p50/p99 (serve/ui.py)
        ):
            c[k] = c.get(k, 0) + v

    def record_feedback(self, exp: str, var: str, reward: float) -> None:
        tags = {"experiment": exp, "variant": var}
        self.feedback.inc(1, tags)
        self.reward.observe(reward, tags)

    def take(self) -> dict:
        out, self.pending = self.pending, {}
        return out

    def put_back(self, taken: dict) -> None:
        """Counts a failed sync took: added to what came in since, for the next sync (at least
        once: a sync whose reply was lost after the state applied it counts twice)."""
        merge_counts(self.pending, taken)


async def _json_object(request: Request, expected: str) -> dict:
    """The request's body as a JSON object; 400 saying `expected` for anything else."""
    try:
        return parse_json(await request.body())
    except Rejected as e:
        raise ApiError(400, f"{e.message}; {expected}") from None


def _lora_load_error(error: BaseException) -> str | None:
    """vLLM's reason an adapter failed to load (e.g. a rank above max_lora_rank), or None."""
    text = str(error)
    marker = "Failed to load lora model: "
    if marker not in text:
        return None
    reason = text.rsplit(marker, 1)[1].splitlines()[0]  # the last: a traceback quotes the code
    inner = reason.split("Worker failed with error '", 1)
    return inner[1].split("', please check", 1)[0] if len(inner) == 2 else reason


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


# the engine calls (DeploymentResponseGenerators) the request being served has made: a 504
# cancels them. Serve cancels a child call by itself only when its parent request is cancelled
# (a client hanging up), and a 504 is an answer, not a cancel.
_ENGINE_CALLS: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "lorafleet_engine_calls", default=None
)


class _RecordedHandle:
    """A vLLM deployment's handle that notes each completions/chat call in `_ENGINE_CALLS`,
    so that a timed-out request can cancel it (`DeploymentResponseGenerator.cancel()`, Serve's
    public way, in every HTTP mode)."""

    def __init__(self, handle):
        self._handle = handle

    def options(self, **kwargs) -> _RecordedHandle:
        return _RecordedHandle(self._handle.options(**kwargs))

    def __getattr__(self, name: str):
        attr = getattr(self._handle, name)
        return _RecordedHandle(attr) if name in ("completions", "chat") else attr

    def remote(self, *args, **kwargs):
        response = self._handle.remote(*args, **kwargs)
        calls = _ENGINE_CALLS.get()
        if calls is not None:
            calls.append(response)
        return response


def _cancel_engine_calls() -> int:
    """Cancel this request's calls to vLLM (a 504 must not leave it generating for nobody)."""
    calls = _ENGINE_CALLS.get() or []
    for call in calls:
        try:
            call.cancel()
        except Exception as e:  # finished or failed meanwhile: nothing left to cancel
            print(f"[ingress] cancelling a timed-out engine call: {e!r}")
    return len(calls)


async def _counted(gen, track: bool, wants_usage: bool, done):
    """The rest of a stream, its tokens counted from the usage block (`done` at its end); the
    usage-only chunk the ingress asked for itself is not the client's."""
    prompt = completion = 0
    ok = False
    try:
        async for chunk in gen:
            if track:
                items = _sse_items(chunk)
                for it in items:
                    p, c = _usage(it)
                    prompt, completion = max(prompt, p), max(completion, c)
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


class FleetIngress(OpenAiIngress):
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
        self.tables = tables_for(app_config["experiments"])
        self.version = 0
        self.rng = random.Random()
        self.metrics = _Metrics()
        self._last_sync = 0.0
        self._sync_task: asyncio.Task | None = None
        self.release = release  # the ReleaseManager's handle (serve/release.py)
        self.releases: dict[str, tuple[str, str, Table]] = {}  # adapter -> control, candidate
        self.release_version = -1
        self.release_counts: dict[str, dict[str, dict[str, float]]] = {}
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

    def admin_request(self, request: Request) -> None:
        """What `require_admin` runs before every admin route: an admin key (or the open local
        default, serve/auth.py), then the per-key admin rate limit."""
        self.access.check(request, admin=True)
        self.rate_limits.hit("admin", self.access.identity(request))

    def _get_configured_serve_handle(self, model_id: str):
        # Ray's _get_response calls vLLM through this handle; recorded, a 504 can cancel it
        return _RecordedHandle(super()._get_configured_serve_handle(model_id))

    def check_key(self, scope) -> None:
        """RequestGate's key check (api_checks.Gate): `_auth` on the headers alone."""
        self._auth(Request(scope))

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

    # --- names ----------------------------------------------------------------------------

    async def _lookup(self, name: str, version: str | None) -> Served | None:
        """The store's `name` (at `version`, else current), or None. A name not in the last
        listing reads its own pointer (one read, not a listing of the store), so an adapter
        published a moment ago is served on its first request; a miss is remembered for
        MISS_TTL_S, so repeated requests for an unknown adapter read nothing."""
        now = time.monotonic()
        key = (name, version)
        missed = self._misses.get(key)
        if missed is not None and now - missed < MISS_TTL_S:
            return None
        if version is not None:
            served = await self.store.get(name, version)
        else:
            served = await self.store.get(name)
        if served is None:
            if len(self._misses) >= MAX_MISSES:
                self._misses.clear()
            self._misses[key] = now
        else:
            self._misses.pop(key, None)
        return served

    def _fits(self, adapter: Served, model_id: str) -> bool:
        """An adapter fits a model serving the same base (by fingerprint: any copy of it, wherever
        it lies); one whose base is unknown (a plain PEFT adapter) fits any."""
        serves = self.base_ids.get(model_id)
        return adapter.fingerprint is None or serves is None or adapter.fingerprint == serves

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

    async def _check_target(self, model: str, request: Request | None = None, user=None) -> str:
        """The model id to send on: `<model>:<adapter>[@<version>]` becomes `<model>:<adapter>@
        <version>` (current unless pinned). 404 for unknown models, adapters and versions (Ray's
        ingress answers 500), 400 for bad names and for an adapter trained on another base."""
        base_id, sep, spec = model.partition(":")
        if base_id not in self.bases:
            raise await self._not_found(model, f"model {model!r} does not exist")
        if not sep:
            return model
        name, version = split_adapter(spec)
        problem = name_problem(name)
        if problem or (version is not None and not is_version_id(version)):
            raise ApiError(
                400,
                problem
                or f"invalid version {version!r}: expected an id like "
                "20261202-003015-123-9f3a (lorafleet adapters show NAME)",
                param="model",
            )
        served = await self._lookup(name, version)
        if served is None and version is not None:
            raise ApiError(
                404, f"adapter {name!r} has no version {version!r}", "model_not_found", "model"
            )
        if served is None:
            raise await self._not_found(model, f"adapter {name!r} is not in the adapter store")
        if not self._fits(served, base_id):
            raise ApiError(
                400,
                f"adapter {name!r} version {served.version} was trained on base {served.base!r} "
                f"(fingerprint {served.fingerprint}), but model {base_id!r} serves "
                f"{self.bases[base_id]!r} (fingerprint {self.base_ids.get(base_id)}): a "
                "different model",
                param="model",
            )
        refused = await self.store.refusal(served)  # DoRA, bias, not LoRA: vLLM would fail (500)
        if refused:
            raise ApiError(400, refused, param="model")
        arm = self._release_arm(name, user) if version is None else None
        if arm is not None:  # a canary release of this adapter: the user's arm picks the version
            request.state.release = (name, arm[0])
            return f"{base_id}:{name}@{arm[1]}"
        return f"{base_id}:{served.lora_id}"

    # --- requests -------------------------------------------------------------------------

    async def _route(self, body, request: Request) -> tuple[str | None, str | None]:
        """Rewrite an experiment name to its variant's `model[:adapter]`; (experiment, variant)."""
        if not body.model:
            raise ApiError(400, "`model` is required", param="model")
        exp = self.experiments.get(body.model)
        user = body.user or request.headers.get(USER_HEADER)
        if exp is None:
            body.model = await self._check_target(body.model, request, user)
            return None, None
        name = self.tables[exp.name].assign(exp.name, user, self.rng)
        v = next(x for x in exp.variants if x.name == name)
        target = f"{v.model}:{v.adapter}" if v.adapter else v.model
        body.model = await self._check_target(target, request, user)
        return exp.name, name

    async def _first_chunk(self, body, call_method: str, request: Request, done):
        """(first chunk, its head item, the rest) of the engine's answer; the errors before it
        as ApiErrors."""
        try:
            gen = self._get_response(body=body, call_method=call_method, raw_request=request)
            first, gen = await peek_at_generator(gen)
        except BackPressureError as e:  # models[].max_queued_requests waiting already
            done(False)
            raise ApiError(
                503,
                f"{body.model!r} is at capacity (its replicas' queue is full); retry the request "
                "after Retry-After",
                "server_busy",
            ) from e
        except RayActorError as e:  # the replica died mid-request; Serve replaces it
            done(False)
            raise ApiError(
                503,
                f"the replica serving {body.model!r} stopped; retry the request",
                "server_error",
            ) from e
        except Exception as e:
            done(False)
            reason = _lora_load_error(e)
            if reason:  # a version vLLM cannot load: the request's model, not the server, is bad
                raise ApiError(
                    400, f"{body.model!r} cannot be served: {reason}", param="model"
                ) from None
            raise
        head = first[0] if isinstance(first, list) else first
        if isinstance(head, ErrorResponse):
            done(False)
            code = head.error.code
            raise ApiError(code if 400 <= code < 600 else 500, head.error.message, head.error.type)
        return first, head, gen

    async def _serve(self, body, call_method: str, request: Request) -> Response:
        """The answer, or 504 when it (for a stream: its first token) is not there within the
        deadline (`http.request_timeout_s`, or the client's shorter one); the engine's request
        is cancelled with it. The body's fields were checked by RequestGate (api_checks)."""
        self._auth(request)
        self._maybe_sync()
        asked = request.headers.get(TIMEOUT_HEADER)
        deadline = deadline_s(self.cfg.http.request_timeout_s, asked)
        _ENGINE_CALLS.set([])  # this request's task's own context
        timer = asyncio.timeout(deadline)
        try:
            async with timer:
                return await self._answer(body, call_method, request)
        except TimeoutError:
            if not timer.expired():  # a TimeoutError of something inside, not the deadline
                raise
            failed = getattr(request.state, "done", None)
            if failed is not None:
                failed(False)
            cancelled = _cancel_engine_calls()
            source = "X-Lorafleet-Timeout-S" if asked else "http.request_timeout_s"
            raise ApiError(
                504,
                f"no answer within {deadline:g} s ({source}); cancelled {cancelled} engine call(s)",
                "timeout_error",
            ) from None

    async def _render_prompt(self, body, call_method: str) -> None:
        """A request to an adapter that recorded its prompt format (cluster/prompt_format.py)
        is rendered the way training rendered its rows: a completion's text prompt becomes what
        training saw (the alpaca prompt, BOS as training put it); a chat request goes with the
        recorded chat template, or, for a single-turn adapter, as the one prompt rendered from
        its messages. The base model, and versions that recorded no format, are left as sent.
        Clients cannot send a chat template (api_checks refuses one); this is the only source."""
        _, sep, spec = body.model.partition(":")
        if not sep:
            return
        name, version = split_adapter(spec)
        served = self.store.described(name, version) or await self.store.get(name, version)
        fmt = served.prompt if served is not None else None
        if fmt is None:
            return
        if call_method == "chat":
            try:
                body.messages = fmt.chat_messages(body.messages)
            except PromptFormatError as e:
                raise ApiError(400, f"{spec!r}: {e}", param="messages") from None
            body.chat_template = fmt.serving_chat_template()
        else:
            body.prompt = fmt.completion_prompt(body.prompt)
        body.add_special_tokens = False  # BOS is in the rendered text where training had it

    async def _answer(self, body, call_method: str, request: Request) -> Response:
        exp, var = await self._route(body, request)
        base_id = body.model.partition(":")[0]
        await self._render_prompt(body, call_method)
        check_context(body, base_id, self.max_model_len.get(base_id))
        release = getattr(request.state, "release", None)  # (adapter, arm) of a canary
        track = exp is not None
        t0 = time.perf_counter()
        headers = {VARIANT_HEADER: var, EXPERIMENT_HEADER: exp} if track else {}
        if release:
            headers[RELEASE_ARM_HEADER] = release[1]

        def done(ok: bool, prompt=0, completion=0):
            self._record_release(release, ok, time.perf_counter() - t0)
            if track:
                self.metrics.record(
                    exp,
                    var,
                    ok=ok,
                    latency_s=time.perf_counter() - t0,
                    prompt=prompt,
                    completion=completion,
                )

        request.state.done = done  # what a timeout records
        # the usage block is how tokens are counted; a stream carries it only when asked
        wants_usage = bool(getattr(body, "stream_options", None)) and bool(
            getattr(body.stream_options, "include_usage", False)
        )
        if getattr(body, "stream", False) and track and not wants_usage:
            options_cls = typing.get_args(type(body).model_fields["stream_options"].annotation)[0]
            body.stream_options = options_cls(include_usage=True)
        first, head, gen = await self._first_chunk(body, call_method, request, done)
        if track or release:  # the id feedback names (the response's own, streamed or not)
            headers[RESPONSE_ID_HEADER] = await self._remember(first, exp, var, release)
        if isinstance(head, NON_STREAMING_RESPONSE_TYPES):
            done(True, *_usage(head))
            return JSONResponse(content=head.model_dump(), headers=headers)
        return StreamingResponse(
            open_ai_json_wrapper(_counted(gen, track, wants_usage, done)),
            media_type="text/event-stream",
            headers=headers,
        )

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._serve(body, "completions", request)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._serve(body, "chat", request)

    async def _cards(self) -> list[dict]:
        """OpenAI model cards: each base, the adapters that fit it, each experiment."""
        adapters = await self.store.current()
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
                card(f"{mid}:{a}", a, mid, version=served.version)
                for a, served in sorted(adapters.items())
                if self._fits(served, mid)
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
                ui.fold_latency(summary[name]["variants"][v.name])
        return JSONResponse({"experiments": summary, "latency_bounds_s": ui.LATENCY_BOUNDS_S})

    async def set_weights(self, name: str, request: Request):
        if name not in self.experiments:
            raise ApiError(
                404,
                f"unknown experiment {name!r}; expected one of {sorted(self.experiments)}",
                "not_found",
            )
        expected = 'expected {"weights": {"<variant>": <positive number>, ...}}'
        weights = (await _json_object(request, expected)).get("weights")
        if not isinstance(weights, dict):
            raise ApiError(400, 'expected {"weights": {"<variant>": <positive number>, ...}}')
        result = await self.state.set_weights.remote(name, weights)
        if "error" in result:
            raise ApiError(400, result["error"])
        await self._sync()
        return JSONResponse(result)

    # --- outcomes -------------------------------------------------------------------------

    async def _remember(self, first, exp: str | None, var: str | None, release=None) -> str:
        """The response's id (OpenAI's `id`, else a new one), told to the experiment state before
        the client sees it, so feedback sent at once to any ingress replica finds its variant."""
        ids = [it.get("id") for it in _sse_items(first)]
        rid = next((i for i in ids if isinstance(i, str) and i), None) or f"lf-{uuid.uuid4().hex}"
        try:  # bounded: while the state replica restarts, answers go on without it
            call = self.state.remember.remote(rid, exp, var, release and list(release))
            await asyncio.wait_for(call, REMEMBER_TIMEOUT_S)
        except Exception as e:
            print(f"[ingress] cannot record response {rid} for feedback: {e!r}")
        return rid

    async def feedback(self, request: Request):
        """POST /v1/feedback {"response_id" | "experiment" + "user", "reward": number | "up" |
        "down"}: one outcome for the variant that answered (or that the user is bucketed in). A
        response id is rewarded once: the first reward counts, a second gets 409. Each caller
        (key) may send `http.feedback_rate_limit` of these; more get 429."""
        self._auth(request)
        self.rate_limits.hit("feedback", self.access.identity(request))
        body = await _json_object(request, 'expected a JSON object with "reward"')
        try:
            result = await self.state.feedback.remote(body)
        except Exception as e:  # the state replica is restarting: the client retries
            msg = f"experiment state unavailable; retry ({e!r})"
            raise ApiError(503, msg, "server_error") from e
        if "error" in result:
            kinds = {404: "not_found", 409: "conflict"}
            kind = kinds.get(result["status"], "invalid_request_error")
            raise ApiError(result["status"], result["error"], kind)
        if result["experiment"] is not None:
            self.metrics.record_feedback(result["experiment"], result["variant"], result["reward"])
        if result.get("release") and self.release is not None:  # the canary's outcome gate
            await self.release.add_outcome.remote(*result["release"], result["reward"])
        return JSONResponse(result)

    # --- releases -------------------------------------------------------------------------

    def _release_arm(self, name: str, user: str | None) -> tuple[str, str] | None:
        """(arm, version) for a request of adapter `name` while a release of it runs."""
        rel = self.releases.get(name)
        if rel is None:
            return None
        control, candidate, table = rel
        arm = table.assign(f"{RELEASE_PREFIX}{name}", user, self.rng)
        return arm, candidate if arm == "candidate" else control

    async def _sync_releases(self) -> None:
        """Push this replica's per-arm counts to the release manager; pull its tables."""
        if self.release is None:
            return
        counts, self.release_counts = self.release_counts, {}
        try:
            if counts:
                await self.release.add_counts.remote(counts)
            version, snap = await self.release.snapshot.remote(self.release_version)
        except Exception as e:  # the manager restarting must not fail requests
            merge_counts(self.release_counts, counts)
            print(f"[ingress] release sync failed: {e!r}")
            return
        if snap is not None:
            if set(self.releases) - set(snap):  # ended: a promote moved `current`; read it
                await self.store.current(refresh=True)  # before the release stops routing
            self.releases = {
                a: (ctl, cand, Table(list(RELEASE_ARMS), w, o))
                for a, (ctl, cand, w, o) in snap.items()
            }
            self.release_version = version

    def _record_release(self, tag: tuple[str, str] | None, ok: bool, latency_s: float) -> None:
        """Count one answer of a release arm (pushed to the release manager with each sync)."""
        if tag is None:
            return
        adapter, arm = tag
        c = self.release_counts.setdefault(adapter, {}).setdefault(arm, {})
        for k, v in (("requests", 1), ("errors", 0 if ok else 1), (latency_bucket(latency_s), 1)):
            c[k] = c.get(k, 0) + v

    async def _release_call(self, method: str, *args) -> JSONResponse:
        if self.release is None:
            raise ApiError(404, "this app runs no release manager", "not_found")
        result = await getattr(self.release, method).remote(*args)
        if "error" in result:
            status = result.get("status", 400)
            raise ApiError(
                status, result["error"], "not_found" if status == 404 else "invalid_request_error"
            )
        return JSONResponse(result)

    async def start_release(self, request: Request):
        """POST /v1/releases {adapter, version, steps, gates}: start a canary (admin)."""
        spec = await _json_object(
            request, "expected a JSON object: {adapter, version, steps, gates}"
        )
        response = await self._release_call("start", spec)
        await self._sync_releases()
        return response

    async def list_releases(self, request: Request):
        self._auth(request)
        return await self._release_call("status")

    async def get_release(self, adapter: str, request: Request):
        self._auth(request)
        return await self._release_call("status", adapter)

    async def abort_release(self, adapter: str, request: Request):
        response = await self._release_call("abort", adapter)
        await self._sync_releases()
        return response

    async def pause_release(self, adapter: str, request: Request):
        """POST /v1/releases/{adapter}/pause: hold it at its step and split (admin)."""
        return await self._release_call("pause", adapter)

    async def resume_release(self, adapter: str, request: Request):
        """POST /v1/releases/{adapter}/resume: its step again, on fresh counts (admin)."""
        return await self._release_call("resume", adapter)

    async def _loaded(self) -> dict[str, dict[str, list[str]]] | None:
        """{model id: {replica id: the multiplexed ids it holds}} for every vLLM deployment, as
        Serve's controller knows them (ray_internal.loaded_model_ids), asked at most once per
        LOADED_TTL_S (the page asks once per adapter per poll); None when it does not answer."""
        async with self._loaded_lock:
            at, found = self._loaded_at
            if time.monotonic() - at < LOADED_TTL_S:
                return found
            deployments = {
                mid: (h.app_name, h.deployment_name) for mid, h in self.llm_handles.items()
            }
            try:
                found = await loaded_model_ids(deployments, LOADED_TIMEOUT_S)
            except Exception as e:  # the controller restarting: the page says "unknown"
                print(f"[ingress] cannot read the replicas' loaded adapters: {e!r}")
                found = None
            self._loaded_at = (time.monotonic(), found)
            return found

    async def _loaded_on(self, name: str) -> list[dict] | None:
        """[{"model", "replica", "versions"}]: each vLLM replica holding (or loading) a version of
        adapter `name`, and which versions; None when Serve's controller did not say."""
        found = await self._loaded()
        if found is None:
            return None
        out = []
        for model_id, replicas in sorted(found.items()):
            for replica, ids in sorted(replicas.items()):
                held = set()
                for mid in ids:  # `<model>:<adapter>@<version>` (_check_target)
                    base, _, spec = mid.partition(":")
                    adapter, version = split_adapter(spec)
                    if base == model_id and adapter == name and version:
                        held.add(version)
                if held:
                    out.append({"model": model_id, "replica": replica, "versions": sorted(held)})
        return out

    async def adapter_versions(self, name: str, request: Request):
        """GET /v1/adapters/{name}: its versions (metrics, source, publish time), the current, and
        the vLLM replicas that hold it (`loaded_on`: which replica, which versions; null when
        Serve's controller did not answer)."""
        self._auth(request)
        if name_problem(name):  # checked before the name touches a path
            raise ApiError(400, name_problem(name), param="name")
        pointer = await asyncio.to_thread(versions.pointer, self.store.root, name)
        if pointer is None:
            raise await self._not_found(name, f"adapter {name!r} is not in the adapter store")
        found = await asyncio.to_thread(versions.versions, self.store.root, name)
        keep = (
            "version",
            "published_at",
            "source",
            "step",
            "eval_loss",
            "metrics",
            "base_fingerprint",
            "prompt_format",  # how requests to it are rendered (cluster/prompt_format.py)
        )
        return JSONResponse(
            {
                "adapter": name,
                "current": pointer["version"],
                "history": pointer.get("history", []),
                "versions": [{k: m.get(k) for k in keep} for m in found],
                "loaded_on": await self._loaded_on(name),
            }
        )

    async def move_adapter(self, name: str, action: str, request: Request):
        """POST /v1/adapters/{name}/promote {"version": ...} | /rollback (admin): move `current`."""
        if action not in ("promote", "rollback"):
            raise ApiError(404, f"no action {action!r}: promote or rollback", "not_found")
        if name_problem(name):
            raise ApiError(400, name_problem(name), param="name")
        version = None
        if action == "promote":
            expected = 'expected {"version": "<version id>"}'
            version = (await _json_object(request, expected)).get("version")
            if not isinstance(version, str) or not is_version_id(version):
                raise ApiError(400, 'expected {"version": "<version id>"}', param="version")
        try:
            if version:
                pointer = await asyncio.to_thread(versions.promote, self.store.root, name, version)
            else:
                pointer = await asyncio.to_thread(versions.rollback, self.store.root, name)
        except versions.VersionError as e:
            raise ApiError(404, str(e), "not_found") from None
        await self.store.current(refresh=True)
        return JSONResponse({"adapter": name, **pointer})

    # --- the /ui page (serve/ui.py): HTML and its files, behind the same keys -----------------

    async def ui_page(self, request: Request):
        """GET /ui: the experiments and releases page; 401 (a Basic challenge) without a key.
        GET /ui?login=admin asks the browser for a key when the page is open to all (no API key
        set) and the viewer is not an admin yet: that is how an admin key reaches the page."""
        try:
            self._auth(request)
        except ApiError as e:
            return ui.refused(e.message)
        try:
            self.access.check(request, admin=True)
            admin = True
        except ApiError as e:
            if request.query_params.get("login") == "admin":
                return ui.refused(e.message)
            admin = False
        return ui.page(self.cfg, admin)

    async def ui_file(self, name: str, request: Request):
        """GET /ui/static/{name}: the page's script, style sheet and Chart.js (served offline)."""
        try:
            self._auth(request)
        except ApiError as e:
            return ui.refused(e.message)
        return ui.static_file(name)


async def require_admin(request: Request) -> None:
    """The one admin check: a FastAPI dependency on every admin route (`ENDPOINTS`)."""
    _replica_ingress().admin_request(request)


# the only routes that change anything and that an API key (not only an admin key) may call
INFERENCE_WRITES = frozenset({"completions", "chat", "feedback"})
# method name -> (HTTP method, path). Every route whose method is not a safe one and whose name
# is not in INFERENCE_WRITES is an admin route: `require_admin` runs before it
ROUTES = {
    "models": ("GET", "/v1/models"),
    "model_data": ("GET", "/v1/models/{model:path}"),
    "completions": ("POST", "/v1/completions"),
    "chat": ("POST", "/v1/chat/completions"),
    "list_experiments": ("GET", "/v1/experiments"),
    "set_weights": ("PUT", "/v1/experiments/{name}"),
    "feedback": ("POST", "/v1/feedback"),
    "start_release": ("POST", "/v1/releases"),
    "list_releases": ("GET", "/v1/releases"),
    "get_release": ("GET", "/v1/releases/{adapter}"),
    "abort_release": ("POST", "/v1/releases/{adapter}/abort"),
    "pause_release": ("POST", "/v1/releases/{adapter}/pause"),
    "resume_release": ("POST", "/v1/releases/{adapter}/resume"),
    "adapter_versions": ("GET", "/v1/adapters/{name}"),
    "move_adapter": ("POST", "/v1/adapters/{name}/{action}"),
    "ui_page": ("GET", "/ui"),
    "ui_file": ("GET", "/ui/static/{name}"),
}


def is_admin_route(name: str, method: str) -> bool:
    return method not in SAFE_METHODS and name not in INFERENCE_WRITES


def _endpoint(name: str, method: str, path: str):
    admin = [Depends(require_admin)] if is_admin_route(name, method) else None
    return lambda app: app.api_route(path, methods=[method], dependencies=admin)


# what Ray's make_fastapi_ingress takes: method name -> the route decorator for an app
ENDPOINTS = {name: _endpoint(name, m, path) for name, (m, path) in ROUTES.items()}
