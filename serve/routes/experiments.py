"""Experiments: their weights, shares, counts and outcomes; re-weighting (admin); and feedback,
the rewards clients post for an answer (by its response id, once) or for a user."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from serve import feedback_ids, ui
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
    response id is verified here, by its signature, with no lookup (serve/feedback_ids.py): a
    malformed, altered or another server's id gets 400, an expired one 410. It is rewarded once:
    the first reward counts, a second gets 409 (the state replica's record). Each caller (key)
    may send `http.feedback_rate_limit` of these; more get 429."""
    ing = current()
    ing._auth(request)
    ing.rate_limits.hit("feedback", ing.access.identity(request))
    body = await json_object(request, 'expected a JSON object with "reward"')
    answer = await _verified(ing, body.get("response_id"))
    try:
        max_age_s = ing.cfg.http.feedback_max_age_s
        result = await ing.state.feedback.remote(body, answer, max_age_s)
    except Exception as e:  # the state replica is restarting: the client retries
        msg = f"experiment state unavailable; retry ({e!r})"
        raise ApiError(503, msg, "server_error") from e
    if "error" in result:
        kinds = {404: "not_found", 409: "conflict", 410: "expired"}
        kind = kinds.get(result["status"], "invalid_request_error")
        raise ApiError(result["status"], result["error"], kind)
    if result["experiment"] is not None:
        ing.metrics.record_feedback(result["experiment"], result["variant"], result["reward"])
    release = result.get("release")
    if release and ing.release is not None and release_current(ing.releases, result):
        await ing._release_outcome(*release, result["reward"])  # the canary's outcome gate
    return JSONResponse(result)


async def _verified(ing, response_id) -> dict | None:
    """What a signed response id says (verified: signature, then age), or None for feedback by
    user and for ids recorded by name; ApiError 400 / 410 for an id that fails."""
    if not feedback_ids.is_signed(response_id):
        return None
    signer = await ing._feedback_signer()
    if signer is None:
        raise ApiError(503, "the feedback secret is not available yet; retry", "server_error")
    try:
        return signer.verify(response_id).as_dict()
    except feedback_ids.BadResponseId as e:
        kind = "expired" if e.status == 410 else "invalid_request_error"
        raise ApiError(e.status, e.message, kind, param="response_id") from None


def release_current(releases: dict, result: dict) -> bool:
    """Whether a release arm's answer (`result["release"]`, `result["version"]`) belongs to the
    release this ingress routes now: an answer of an earlier release of the same adapter (its
    version neither the running control nor candidate) must not move this one's outcome gate.
    True when this ingress knows no release of it (the manager then decides)."""
    adapter, arm = result["release"]
    running, version = releases.get(adapter), result.get("version")
    if running is None or version is None:
        return True
    control, candidate = running[0], running[1]  # (control, candidate, table, mirrored)
    return version == (candidate if arm == "candidate" else control)
