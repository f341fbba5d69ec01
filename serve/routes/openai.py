"""OpenAI's endpoints: the model list and cards, completions and chat (answered by
serve/answer.py in the replica; the body was checked by serve/gate.py before FastAPI read it).

GET /v1/models pages when asked, as OpenAI's list endpoints do: `?limit=N` (1 to MAX_PAGE) and
`?after=<id>` (the last id of the page before) answer `data` plus `first_id`, `last_id` and
`has_more` (serve/names.py `page`). Without either, the whole list, as before."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from serve.auth import admin_router, current
from serve.names import page
from serve.ray_internal import ChatCompletionRequest, CompletionRequest

router = APIRouter()
admin = admin_router()


@router.get("/v1/models")
async def models(request: Request):
    ing = current()
    ing._auth(request)
    cards, query = await ing._cards(), request.query_params
    if "limit" in query or "after" in query:
        return JSONResponse(page(cards, query.get("limit"), query.get("after")))
    return JSONResponse({"object": "list", "data": cards})


@router.get("/v1/models/{model:path}")
async def model_data(model: str, request: Request):
    ing = current()
    ing._auth(request)
    for card in await ing._cards():
        if card["id"] == model:
            return JSONResponse(card)
    raise await ing._not_found(model, f"model {model!r} does not exist")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await current()._serve(body, "completions", request)


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request) -> Response:
    return await current()._serve(body, "chat", request)
