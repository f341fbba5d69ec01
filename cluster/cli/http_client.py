"""The one HTTP client of lorafleet's own commands (`lorafleet serve set-weights`, `serve eval`):
JSON over a pooled `requests` session, the API key as a bearer token, and the two ways a call
fails told apart: no server at the address, or the server's own 4xx/5xx answer."""

from __future__ import annotations

from typing import Any

from cluster.errors import LorafleetError


class ServerUnreachable(LorafleetError):
    """Nothing answered at the address (not running, wrong port)."""


class HttpError(LorafleetError):
    """The server answered with an error status; the message carries its reason."""

    def __init__(self, status: int, text: str):
        self.status = status
        super().__init__(f"HTTP {status}: {text[:300]}")


class Client:
    def __init__(self, base_url: str, key: str | None = None, pool_size: int = 10):
        import requests

        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        self.session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=pool_size))
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def request(self, method: str, path: str, body: Any = None, timeout_s: float = 300):
        """The response of a 2xx answer; HttpError for any other, ServerUnreachable if none."""
        import requests

        try:
            r = self.session.request(method, f"{self.base_url}{path}", json=body, timeout=timeout_s)
        except requests.ConnectionError:
            raise ServerUnreachable(f"no lorafleet server at {self.base_url}") from None
        if not 200 <= r.status_code < 300:
            raise HttpError(r.status_code, r.text)
        return r

    def post(self, path: str, body: Any, timeout_s: float = 300):
        return self.request("POST", path, body, timeout_s)

    def put(self, path: str, body: Any, timeout_s: float = 30):
        return self.request("PUT", path, body, timeout_s)
