"""Experiments: their weights, shares, counts and outcomes; re-weighting (admin); and feedback,
the rewards clients post for an answer (by its response id, once) or for a user."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from serve import ui
from serve.auth import ApiError, admin_router, current
from serve.gate import json_object

router = APIRouter()
admin = admin_router()


@router.get("/v1/experiments")
async def list_experiments(request: Request):
    ing = current()
    ing._auth(request)
    await ing._sync()
    summary = await ing.state.summary.remote()
    for name, e in ing.experiments.items():
        for v in e.variants:
            summary[name]["variants"][v.name]["target"] = (
                f"{v.model}:{v.adapter}" if v.adapter else v.model
            )
            ui.fold_latency(summary[name]["variants"][v.name])
    return JSONResponse({"experiments": summary, "latency_bounds_s": ui.LATENCY_BOUNDS_S})


@admin.put("/v1/experiments/{name}")
async def set_weights(name: str, request: Request):
    ing = current()
    if name not in ing.experiments:
        raise ApiError(
            404,
            f"unknown experiment {name!r}; expected one of {sorted(ing.experiments)}",
            "not_found",
        )
    expected = 'expected {"weights": {"<variant>": <positive number>, ...}}'
    weights = (await json_object(request, expected)).get("weights")
    if not isinstance(weights, dict):
        raise ApiError(400, 'expected {"weights": {"<variant>": <positive number>, ...}}')
    result = await ing.state.set_weights.remote(name, weights)
    if "error" in result:
        raise ApiError(400, result["error"])
    await ing._sync()
    return JSONResponse(result)


@router.post("/v1/feedback")
async def feedback(request: Request):
    """POST /v1/feedback {"response_id" | "experiment" + "user", "reward": number | "up" |
    "down"}: one outcome for the variant that answered (or that the user is bucketed in). A
    response id is rewarded once: the first reward counts, a second gets 409. Each caller
    (key) may send `http.feedback_rate_limit` of these; more get 429."""
    ing = current()
    ing._auth(request)
    ing.rate_limits.hit("feedback", ing.access.identity(request))
    body = await json_object(request, 'expected a JSON object with "reward"')
    try:
        result = await ing.state.feedback.remote(body)
    except Exception as e:  # the state replica is restarting: the client retries
        msg = f"experiment state unavailable; retry ({e!r})"
        raise ApiError(503, msg, "server_error") from e
    if "error" in result:
        kinds = {404: "not_found", 409: "conflict"}
        kind = kinds.get(result["status"], "invalid_request_error")
        raise ApiError(result["status"], result["error"], kind)
    if result["experiment"] is not None:
        ing.metrics.record_feedback(result["experiment"], result["variant"], result["reward"])
    if result.get("release") and ing.release is not None:  # the canary's outcome gate
        await ing._release_outcome(*result["release"], result["reward"])
    return JSONResponse(result)
