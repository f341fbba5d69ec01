"""Who may do what on the HTTP API: API keys, admin keys, the loopback default, cross-site
requests and per-key rate limits. One module, so a reader finds every rule of access in one hop.

    inference and reads   an API key or an admin key; with no API key configured (only possible
                          on a loopback host: serve/app.py refuses anything else), open
    admin (every route that changes the server: weights, releases, promote, rollback)
                          an admin key; with no key configured at all, refused unless
                          `http.open_admin_on_loopback: true` (a one-person machine)

Admin routes get their check from one FastAPI dependency, `require_admin`, that the ingress puts
on every state-changing route except the few inference writes named in `INFERENCE_WRITES`
(serve/ingress.py: `ENDPOINTS`), so a new route is admin unless someone says otherwise.

A request without a key (an open local server) that changes anything must not come from another
site: a page the user visits could otherwise post a form to 127.0.0.1 (`keyless_change_problem`:
another Origin, a non-loopback Host, a form's content type).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time

from starlette.requests import Request

from serve.api_checks import Rejected

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# a page's own changing requests carry this header: another site's form cannot set it, so a
# browser's cached Basic credentials cannot be used against the admin endpoints from elsewhere
UI_HEADER = "x-lorafleet-ui"


class ApiError(Rejected):
    """An error answered with its status and an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param=None,
        retry_after_s: float | None = None,
    ):
        super().__init__(status, message, param, kind)
        self.retry_after_s = retry_after_s


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.strip().encode()).digest()


def credentials(request) -> tuple[str, str]:
    """(scheme, key) from `Authorization`: `Bearer <key>` as sent, or Basic with the key as the
    password (the /ui page in a browser), given as bearer. ('', '') for anything else."""
    import base64
    import binascii

    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return scheme, token
    try:
        _, _, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    if request.method not in SAFE_METHODS and request.headers.get(UI_HEADER) != "1":
        return "", ""  # a cross-site form riding the browser's credentials: no key
    if cross_site(request):
        return "", ""  # another site's script reading with the browser's saved login: no key
    return "bearer", password


def cross_site(request) -> bool:
    """True for a browser request that another site started (Sec-Fetch-Site, else Origin). A
    non-browser client (curl, the openai SDK, lorafleet's CLI) sends neither: not cross-site."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    return (
        origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}"
    )


# the content types an HTML form can post without a CORS preflight: a keyless change sent as one
# may be another site's form in a browser that sends no Origin (older ones, some extensions)
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")
LOOPBACK_NAMES = ("localhost", "::1", "[::1]")


def _loopback_host(request) -> bool:
    """True when the request's Host names this machine's loopback (or there is no Host: HTTP/1.0
    clients). A page whose own name was re-pointed at 127.0.0.1 (DNS rebinding) is same-origin
    to the browser; its Host is still its own name."""
    host = request.headers.get("host")
    if not host:
        return True
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.lower()
    return name in LOOPBACK_NAMES or name.endswith(".localhost") or _is_127(name)


def _is_127(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "127" and all(p.isdigit() for p in parts)


def keyless_change_problem(request) -> str | None:
    """Why a state-changing request without a valid key must be refused, or None. It must come
    from this server's own page (same origin) or from a client that is not a browser (curl, the
    openai SDK, lorafleet's CLI: no Origin, no Sec-Fetch-Site, JSON or no body); a form that another
    site posts to 127.0.0.1 is neither."""
    if cross_site(request):
        started = request.headers.get("origin") or request.headers.get("sec-fetch-site")
        return f"a request from another site ({started}) cannot change this server without a key"
    if not _loopback_host(request):
        return (
            f"Host {request.headers.get('host')!r} is not this machine's loopback name, and a "
            "server without keys takes changes only at 127.0.0.1 or localhost (a page whose name "
            "was re-pointed at this machine could otherwise change it)"
        )
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in FORM_TYPES:
        return (
            f"Content-Type {kind!r} is what another site's form can send: send "
            "`Content-Type: application/json` (or a key)"
        )
    return None


class Access:
    """The keys one ingress replica accepts (as SHA-256 digests: keys never travel in Ray's
    deployment config) and the rules above."""

    def __init__(
        self,
        key_hashes: list[str],
        admin_key_hashes: list[str],
        *,
        open_admin: bool = False,
        admin_keys_env: str = "LORAFLEET_ADMIN_KEYS",
    ):
        self.key_hashes = [bytes.fromhex(h) for h in key_hashes]
        self.admin_hashes = [bytes.fromhex(h) for h in admin_key_hashes]
        self.open_admin = open_admin
        self.admin_keys_env = admin_keys_env

    def _role(self, request) -> str | None:
        """'admin', 'key', or None (no valid key) for the request's credentials."""
        scheme, token = credentials(request)
        if scheme.lower() != "bearer" or not token:
            return None
        digest = _digest(token)
        if any(hmac.compare_digest(digest, h) for h in self.admin_hashes):
            return "admin"
        if any(hmac.compare_digest(digest, h) for h in self.key_hashes):
            return "key"
        return None

    def check(self, request, admin: bool = False) -> str:
        """The caller's role ('admin', 'key' or 'open'); 401 without a valid key where one is
        needed, 403 for an admin route without an admin key, 403 for a keyless change that
        another site started. With no API key configured, a request's own Authorization header
        is ignored on non-admin routes (the openai SDK always sends one, often a dummy)."""
        role = self._role(request)
        # a change that no key is asked for (an open server): only from this machine's own
        # clients; where a key is needed, the 401 below answers first
        needs_key = bool(self.key_hashes) or (admin and self.has_keys)
        keyless = role is None and not needs_key and request.method not in SAFE_METHODS
        why = keyless_change_problem(request) if keyless else None
        if why:
            raise ApiError(403, f"{why} (send `Authorization: Bearer <key>`)", "permission_error")
        if admin:
            return self._admin(role)
        if role is None and self.key_hashes:
            raise _invalid_key()
        return role or "open"

    def _admin(self, role: str | None) -> str:
        if role == "admin":
            return role
        if not self.has_keys and self.open_admin:
            return "open"
        if role is None and self.has_keys:
            raise _invalid_key()
        env = self.admin_keys_env
        if self.admin_hashes:
            why = "this endpoint changes the server and needs an admin key; this is an API key"
        elif self.key_hashes:
            why = (
                f"this endpoint changes the server and no admin key is set: start the server "
                f"with {env} (or http.admin_keys_file) and send one of those keys"
            )
        else:
            why = (
                f"this endpoint changes the server and needs an admin key: start the server with "
                f"{env} (or http.admin_keys_file) and send one of those keys, or set "
                "http.open_admin_on_loopback: true to let anyone on this machine change it"
            )
        raise ApiError(403, why, "permission_error")

    @property
    def has_keys(self) -> bool:
        return bool(self.key_hashes or self.admin_hashes)

    def identity(self, request) -> str:
        """Who a rate limit counts: a valid key's digest, else the client's address (a made-up
        key on an open server must not buy a fresh window)."""
        if self._role(request) is not None:
            return _digest(credentials(request)[1]).hex()[:16]
        client = request.client
        return f"addr:{client.host if client else '?'}"


def _invalid_key() -> ApiError:
    return ApiError(
        401,
        "missing or invalid API key: send `Authorization: Bearer <key>`",
        "authentication_error",
    )


class RateLimits:
    """Per caller (`Access.identity`) and per kind ('feedback', 'admin'): at most the configured
    rate (the `limits` package's notation, e.g. "200/second"), over a moving window, in this
    ingress replica; more get 429 with Retry-After. Each replica counts its own traffic, so N
    ingress replicas let N times the rate through in all."""

    def __init__(self, rates: dict[str, str]):
        from limits import parse
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._items = {kind: parse(rate) for kind, rate in rates.items()}
        self.rates = dict(rates)

    def hit(self, kind: str, who: str) -> None:
        """Count one request; ApiError 429 when `who` is over its `kind` rate."""
        item = self._items[kind]
        if self._limiter.hit(item, kind, who):
            return
        stats = self._limiter.get_window_stats(item, kind, who)
        wait_s = max(stats.reset_time - time.time(), 0.0)
        raise ApiError(
            429,
            f"too many {kind} requests from this key: at most {self.rates[kind]} (http."
            f"{kind}_rate_limit); retry after {math.ceil(wait_s)} s",
            "rate_limit_error",
            retry_after_s=wait_s,
        )


def current():
    """The FleetIngress of this Serve replica (the route functions' `self`)."""
    from ray import serve

    return serve.get_replica_context().servable_object


async def require_admin(request: Request) -> None:
    """The one admin check: the dependency of every admin router (serve/routes/), run by FastAPI
    before the route: an admin key (or the open local default above), then the per-key admin
    rate limit."""
    ingress = current()
    ingress.access.check(request, admin=True)
    ingress.rate_limits.hit("admin", ingress.access.identity(request))


def admin_router(**kwargs):
    """An APIRouter whose every route needs an admin key (`require_admin`)."""
    from fastapi import APIRouter, Depends

    return APIRouter(dependencies=[Depends(require_admin)], **kwargs)
