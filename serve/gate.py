"""`RequestGate`: the ASGI layer in front of the ingress's FastAPI app that runs the checks of
serve/api_checks.py (and the API-key check) before FastAPI reads or validates a body: the headers'
size (431), the key (401, before any body is read), the body's size (413, from Content-Length
before reading, or while reading one sent chunked), the content type (415), and for the two
generation endpoints the JSON and every field (400). Other paths pass untouched. No Ray here:
tests/test_api_checks.py runs it in front of a plain Starlette app.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Protocol

from serve.api_checks import (
    GENERATE_PATHS,
    MAX_HEADER_BYTES,
    Limits,
    Rejected,
    check_chat,
    check_completion,
    error_body,
    parse_json,
)


def deadline_s(configured_s: float, header: str | None) -> float:
    """The request's deadline: `http.request_timeout_s`, or less when the client asks for less
    (`X-Lorafleet-Timeout-S`); a client never extends the server's bound."""
    if header:
        try:
            asked = float(header)
        except ValueError:
            raise Rejected(
                400, f"X-Lorafleet-Timeout-S must be a number of seconds, got {header[:40]!r}"
            ) from None
        if not (asked > 0 and math.isfinite(asked)):
            raise Rejected(400, f"X-Lorafleet-Timeout-S must be > 0 seconds, got {header[:40]!r}")
        return min(asked, configured_s)
    return configured_s


async def json_object(request, expected: str) -> dict:
    """The request's body as a JSON object; 400 saying `expected` for anything else."""
    try:
        return parse_json(await request.body())
    except Rejected as e:
        raise Rejected(400, f"{e.message}; {expected}") from None


class Gate(Protocol):
    """What `RequestGate` asks of the ingress replica it fronts."""

    limits: Limits
    allowed: dict[str, frozenset]  # "completions" | "chat" -> fields a body may hold

    def check_key(self, scope: dict) -> None:
        """Raise Rejected (401) unless the request's headers carry an accepted key."""


class RequestGate:
    """ASGI middleware in front of the FastAPI app. For /v1/ paths it checks the API key from
    the headers alone (401 before any body is read), refuses a body over `max_body_bytes` (413,
    from Content-Length before reading, or while reading one sent chunked), and for the two
    generation endpoints parses and checks the JSON (`check_completion` / `check_chat`) before
    FastAPI's validation and the engine see it. Other paths (Serve's /-/healthz is answered
    before the app) pass untouched. `gate()` returns the replica's `Gate` (its keys, limits)."""

    def __init__(self, app, gate: Callable[[], Gate]):
        self.app, self._gate_fn, self._gate = app, gate, None

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # an app under a route prefix: the path within it
            path = path[len(root) :]
        if not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self._gate is None:
            self._gate = self._gate_fn()
        try:
            receive = await self._check(scope, receive, path)
        except Rejected as e:
            return await _send_error(send, e)
        return await self.app(scope, receive, send)

    async def _check(self, scope, receive, path: str):
        gate = self._gate
        size, length, ctype = _headers(scope.get("headers", ()))
        if size > MAX_HEADER_BYTES:
            raise Rejected(431, f"request headers too large: {size} bytes > {MAX_HEADER_BYTES}")
        if scope.get("method") == "OPTIONS":
            return receive  # a CORS preflight carries no key by design; CORS answers it
        gate.check_key(scope)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        limit = gate.limits.max_body_bytes
        if length is not None and not (length.isascii() and length.isdigit()):
            raise Rejected(400, f"invalid Content-Length {length[:20]!r}")
        if length is not None and int(length) > limit:
            raise Rejected(
                413,
                f"request body too large: {length[:20]} bytes > limit {limit} (http.max_body_bytes)",
            )
        endpoint = GENERATE_PATHS.get(path.rstrip("/"))
        if endpoint is None and length is not None:
            return receive  # its size is known and fine; the endpoint reads it
        if endpoint is not None:
            ctype = (ctype or "application/json").split(";", 1)[0].strip().lower()
            if ctype != "application/json" and not ctype.endswith("+json"):
                raise Rejected(
                    415,
                    f"expected Content-Type: application/json, got {ctype[:60]!r} (send the body as JSON)",
                )
        body = await _read_body(receive, limit)
        if endpoint is not None:
            parsed = parse_json(body)
            check = check_chat if endpoint == "chat" else check_completion
            check(parsed, gate.limits, gate.allowed[endpoint])
        return _replay(body, receive)


def _headers(raw) -> tuple[int, str | None, str | None]:
    """(bytes of all headers, Content-Length, Content-Type); ASGI names are lower-case."""
    size, length, ctype = 0, None, None
    for k, v in raw:
        size += len(k) + len(v)
        if k == b"content-length":
            length = v.decode("latin-1")
        elif k == b"content-type":
            ctype = v.decode("latin-1")
    return size, length, ctype


async def _read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Rejected(400, "the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Rejected(
                413, f"request body too large: more than {limit} bytes (http.max_body_bytes)"
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive) -> Callable[[], Awaitable[dict]]:
    """The body read here, once; then the client's own messages (its disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _send_error(send, e: Rejected) -> None:
    payload = error_body(e.status, e.message, e.kind, e.param)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if e.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
