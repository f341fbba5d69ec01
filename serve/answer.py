"""Answering an OpenAI request inside the ingress replica: an experiment's name becomes its
variant's model (sticky per user), an adapter its version (a canary's arm under release), the
prompt is rendered the way training rendered it, and the answer comes back whole or streamed,
its tokens and latency counted for the experiment and the release, named with a signed response
id that carries what feedback needs (serve/feedback_ids.py; no call to the state replica).
The deadline (`http.request_timeout_s`, or the client's shorter one) answers 504 and cancels
the engine's call. A mixin of the ingress replica (serve/ingress.py); the routes that call it
are in serve/routes/openai.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
import time
import typing
import uuid

from fastapi import Request
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.responses import JSONResponse, Response, StreamingResponse

from cluster.text.prompt_format import PromptFormatError
from serve.api_checks import check_context
from serve.auth import ApiError
from serve.experiments import (
    EXPERIMENT_HEADER,
    REMEMBER_TIMEOUT_S,
    RESPONSE_ID_HEADER,
    VARIANT_HEADER,
)
from serve.gate import deadline_s
from serve.ray_internal import (
    NON_STREAMING_RESPONSE_TYPES,
    ErrorResponse,
    open_ai_json_wrapper,
    peek_at_generator,
)
from serve.store import split_adapter

USER_HEADER = "x-user-id"
TIMEOUT_HEADER = "x-lorafleet-timeout-s"  # a client's own, shorter deadline (serve/gate.py)
RELEASE_ARM_HEADER = "X-Lorafleet-Release-Arm"  # control | candidate, while a release runs


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


def _usage_only(item) -> bool:
    return isinstance(item, dict) and not item.get("choices") and bool(item.get("usage"))


def _usage_event(event: str) -> bool:
    data = event.strip()
    if not data.startswith("data:") or data[5:].strip() in ("", "[DONE]"):
        return False
    try:
        return _usage_only(json.loads(data[5:]))
    except ValueError:
        return False


def _without_usage(chunk):
    """`chunk` less its usage-only events (the block the ingress asked vLLM for, to count
    tokens, when the client did not): Ray batches a stream's events, so the usage block often
    comes in one chunk with the last text (a string of several `data:` events, or a list).
    None when nothing is left."""
    if isinstance(chunk, list):
        kept = [c for c in (_without_usage(c) for c in chunk) if c is not None]
        return kept or None
    if isinstance(chunk, str):
        events = re.split(r"(?<=\n\n)|(?<=\r\n\r\n)", chunk)  # each keeps its separator
        kept = [e for e in events if not _usage_event(e)]
        if len(kept) == len(events):
            return chunk
        text = "".join(kept)
        return text if text.strip() else None
    items = _sse_items(chunk)
    return None if items and all(_usage_only(it) for it in items) else chunk


async def _counted(gen, track: bool, wants_usage: bool, done):
    """The rest of a stream, its tokens counted from the usage block (`done` at its end); the
    usage-only events the ingress asked for itself are not the client's."""
    prompt = completion = 0
    ok = False
    try:
        async for chunk in gen:
            if track:
                for it in _sse_items(chunk):
                    p, c = _usage(it)
                    prompt, completion = max(prompt, p), max(completion, c)
                if not wants_usage:
                    chunk = _without_usage(chunk)
                    if chunk is None:
                        continue
            yield chunk
        ok = True
    finally:
        done(ok, prompt, completion)


async def _renamed(stream, old: str, new: str):
    """The stream's SSE text with the engine's response id, a JSON string in every event, as
    `new` (a JSON string token equal to the id: the id itself, never part of a text)."""
    old_json, new_json = json.dumps(old), json.dumps(new)
    async for chunk in stream:
        yield chunk.replace(old_json, new_json) if isinstance(chunk, str) else chunk


class AnswerMixin:
    """Needs from the ingress: cfg, experiments, tables, rng, metrics, state, feedback_ids,
    max_model_len, store, _check_target (serve/names.py), _record_release
    (serve/routes/releases.py), _shadow_copy and _mirror (serve/shadow.py), _get_response
    (Ray's OpenAiIngress), _maybe_sync."""

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
        """A request to an adapter that recorded its prompt format (cluster/text/prompt_format.py)
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
        release = getattr(request.state, "release", None)  # (adapter, arm) of a canary
        shadow = self._shadow_copy(body, release)  # the candidate's too, in a shadow step
        await self._render_prompt(body, call_method)
        check_context(body, base_id, self.max_model_len.get(base_id))
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
        engine_id = rid = None
        if track or release:  # the id feedback names, in the header and the body (every chunk)
            engine_id, rid = self._name_answer(first, exp, var, release, body.model)
            if rid is None:
                rid = await self._remember(engine_id, exp, var, release and list(release))
            headers[RESPONSE_ID_HEADER] = rid
        if isinstance(head, NON_STREAMING_RESPONSE_TYPES):
            done(True, *_usage(head))
            content = head.model_dump()
            self._mirror(shadow, call_method, release and release[0], content)
            if rid is not None:
                content["id"] = rid
            return JSONResponse(content=content, headers=headers)
        self._mirror(shadow, call_method, release and release[0], None)
        stream = open_ai_json_wrapper(_counted(gen, track, wants_usage, done))
        if engine_id and rid and rid != engine_id:
            stream = _renamed(stream, engine_id, rid)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    def _name_answer(self, first, exp, var, release, model: str):
        """(the engine's response id, the id feedback names): signed with the app's secret,
        carrying the experiment and variant, the release arm, the adapter's version and the time
        (serve/feedback_ids.py); None for the second until this replica holds the secret."""
        ids = [it.get("id") for it in _sse_items(first)]
        engine_id = next((i for i in ids if isinstance(i, str) and i), None)
        if self.feedback_ids is None:
            return engine_id, None
        _, _, spec = model.partition(":")
        adapter, version = split_adapter(spec) if spec else (None, None)
        arm = release[1] if release else None
        signed = self.feedback_ids.sign(exp, var, adapter, version, arm)
        return engine_id, signed

    async def _remember(self, rid: str | None, exp: str | None, var: str | None, release) -> str:
        """An id told to the experiment state before the client sees it: how a replica names
        answers before it holds the feedback secret (its first sync, a second after start)."""
        rid = rid or f"lf-{uuid.uuid4().hex}"
        try:  # bounded: while the state replica restarts, answers go on without it
            for _ in range(2):  # an id already known (a client's reused X-Request-ID): a new one
                call = self.state.remember.remote(rid, exp, var, release)
                if await asyncio.wait_for(call, REMEMBER_TIMEOUT_S) is not False:
                    break
                rid = f"lf-{uuid.uuid4().hex}"
        except Exception as e:
            print(f"[ingress] cannot record response {rid} for feedback: {e!r}")
        return rid
