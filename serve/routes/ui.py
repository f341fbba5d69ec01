"""The /ui page (serve/ui.py renders it) and its files, behind the same keys as the API."""

from __future__ import annotations

from fastapi import APIRouter, Request

from serve import ui
from serve.auth import ApiError, admin_router, current

router = APIRouter()
admin = admin_router()


@router.get("/ui")
async def ui_page(request: Request):
    """GET /ui: the experiments and releases page; 401 (a Basic challenge) without a key.
    GET /ui?login=admin asks the browser for a key when the page is open to all (no API key
    set) and the viewer is not an admin yet: that is how an admin key reaches the page."""
    ing = current()
    try:
        ing._auth(request)
    except ApiError as e:
        return ui.refused(e.message)
    try:
        ing.access.check(request, admin=True)
        admin = True
    except ApiError as e:
        if request.query_params.get("login") == "admin":
            return ui.refused(e.message)
        admin = False
    return ui.page(ing.cfg, admin)


@router.get("/ui/static/{name}")
async def ui_file(name: str, request: Request):
    """GET /ui/static/{name}: the page's script, style sheet and Chart.js (served offline)."""
    ing = current()
    try:
        ing._auth(request)
    except ApiError as e:
        return ui.refused(e.message)
    return ui.static_file(name)
