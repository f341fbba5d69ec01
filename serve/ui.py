"""The /ui page: experiments, outcomes, releases and adapters in a browser, served by the app's own
ingress (serve/ingress.py) on its port, behind the same keys.

    lorafleet serve configs/serve-demo.yaml   then open http://127.0.0.1:8000/ui

A browser cannot put a Bearer header on a navigation, so the page takes the key as the password of
HTTP Basic (any user name): `GET /ui` without a key answers 401 with a Basic challenge, the browser
asks once, and sends the same credentials with the page's own requests. The page reads only the
JSON endpoints (`/v1/experiments`, `/v1/releases`, `/v1/models`, `/v1/adapters/{name}`) and acts
through them; it keeps no state of its own beyond the samples it polled. Chart.js comes from npm
(serve/ui/package.json), copied into serve/ui/static by `make setup`, and is served from here: no
CDN.
"""

from __future__ import annotations

import html
import json
import string
from pathlib import Path

from starlette.responses import HTMLResponse, Response

from serve.release import LATENCY_BOUNDS

UI_DIR = Path(__file__).resolve().parent / "ui"
STATIC = {  # the only files served, and their types
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "chart.umd.min.js": "text/javascript; charset=utf-8",
}
REALM = 'Basic realm="lorafleet", charset="UTF-8"'
LATENCY_BOUNDS_S = [round(b, 6) for b in LATENCY_BOUNDS]


def quantile_s(buckets: dict[str, float], q: float) -> float | None:
    """The `q` quantile of a latency histogram ({"lat_<i>": n}, serve/release.latency_bucket) as
    the upper bound of its bucket (within 25%); None without observations."""
    n = sum(buckets.values())
    if not n:
        return None
    seen = 0.0
    for key in sorted(buckets):
        seen += buckets[key]
        if seen >= q * n:
            i = int(key[4:])
            return LATENCY_BOUNDS_S[i] if i < len(LATENCY_BOUNDS_S) else None
    return None


def fold_latency(variant: dict) -> None:
    """A variant's summary (GET /v1/experiments), in place: its `lat_<i>` counters become one
    `latency_buckets` object (upper bounds in the response's `latency_bounds_s`), with p50 and
    p99 since the start. The page takes differences between polls for its time series."""
    buckets = {k: variant.pop(k) for k in [k for k in variant if k.startswith("lat_")]}
    variant["latency_buckets"] = buckets
    variant["p50_s"] = quantile_s(buckets, 0.5)
    variant["p99_s"] = quantile_s(buckets, 0.99)


def refused(message: str) -> HTMLResponse:
    """401 with a Basic challenge: the browser asks for the key (as the password)."""
    body = (
        "<!doctype html><html lang=en><meta charset=utf-8><title>lorafleet: key needed</title>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        "<body style='font-family:system-ui,sans-serif;margin:2rem'><h1>401: key needed</h1>"
        f"<p>{html.escape(message)}.</p><p>Open this page with your lorafleet key as the "
        "password (any user name). An admin key can also re-weight, pause, resume, abort, promote "
        "and roll back.</p></body></html>"
    )
    return HTMLResponse(body, status_code=401, headers={"WWW-Authenticate": REALM})


# no framing (an admin's Promote/Abort clicked through another site's frame), scripts and data
# from this origin only (style attributes: the share bars), no sniffing a file as another type
PAGE_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; "
    "style-src 'self' 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}


def page(cfg, admin: bool) -> HTMLResponse:
    """The page's HTML: the app's name and the viewer's role server-rendered; the data comes from
    the JSON endpoints, polled by static/app.js."""
    template = string.Template((UI_DIR / "index.html").read_text())
    settings = {"app": cfg.name, "admin": admin, "admin_keys_env": cfg.http.admin_keys_env}
    body = template.substitute(
        app=html.escape(cfg.name),
        role="admin" if admin else "read-only",
        admin="true" if admin else "false",
        settings=html.escape(json.dumps(settings)),
    )
    return HTMLResponse(body, headers={"Cache-Control": "no-store", **PAGE_HEADERS})


def static_file(name: str) -> Response:
    """One of the page's files; 404 for any other name, 503 if `make setup` has not built it."""
    if name not in STATIC:
        return Response(f"no file {name!r} here", status_code=404, media_type="text/plain")
    path = UI_DIR / "static" / name
    if not path.is_file():
        return Response(
            f"{name} is missing from {path.parent}: run `make setup` (it copies Chart.js from "
            "serve/ui/node_modules)",
            status_code=503,
            media_type="text/plain",
        )
    return Response(
        path.read_bytes(), media_type=STATIC[name], headers={"X-Content-Type-Options": "nosniff"}
    )
