"""Canary releases as the ingress sees them: the routing of each adapter under release (the
user's bucket in the release's table picks control or candidate; per-arm counts pushed to the
ReleaseManager every second, its tables pulled: `ReleaseRoutingMixin`), and the release routes
(start, pause, resume and abort are admin). The decisions are serve/release.py's."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from serve.auth import ApiError, admin_router, current
from serve.experiments import Table, merge_counts
from serve.gate import json_object
from serve.release import ARMS as RELEASE_ARMS
from serve.release import RELEASE_PREFIX, latency_bucket

# rewards kept for a ReleaseManager that is restarting (a few seconds' worth is plenty)
MAX_PENDING_OUTCOMES = 10_000

router = APIRouter()
admin = admin_router()


class ReleaseRoutingMixin:
    """Needs from the ingress: release (the ReleaseManager's handle), releases,
    release_version, release_counts, pending_outcomes, rng, store."""

    async def _release_outcome(self, adapter: str, arm: str, reward: float) -> None:
        """A reward for a release arm's answer, to the manager's outcome gate. The feedback is
        already recorded (its id counts once), so a manager that is restarting gets it with the
        next sync instead of losing it to the client's retry (409)."""
        try:
            await self.release.add_outcome.remote(adapter, arm, reward)
        except Exception as e:
            if len(self.pending_outcomes) < MAX_PENDING_OUTCOMES:
                self.pending_outcomes.append((adapter, arm, reward))
            print(f"[ingress] release outcome queued for the next sync: {e!r}")

    def _release_arm(self, name: str, user: str | None) -> tuple[str, str] | None:
        """(arm, version) for a request of adapter `name` while a release of it runs."""
        rel = self.releases.get(name)
        if rel is None:
            return None
        control, candidate, table, _ = rel
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
                counts = {}  # sent: a later failure must not put them back to send twice
            while self.pending_outcomes:  # rewards the manager missed while it restarted
                await self.release.add_outcome.remote(*self.pending_outcomes[0])
                self.pending_outcomes.pop(0)
            version, snap = await self.release.snapshot.remote(self.release_version)
        except Exception as e:  # the manager restarting must not fail requests
            merge_counts(self.release_counts, counts)
            print(f"[ingress] release sync failed: {e!r}")
            return
        if snap is not None:
            if set(self.releases) - set(snap):  # ended: a promote moved `current`; read it
                await self.store.current(refresh=True)  # before the release stops routing
            self.releases = {
                a: (ctl, cand, Table(list(RELEASE_ARMS), w, o), mirrored)
                for a, (ctl, cand, w, o, mirrored) in snap.items()
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

    async def _release_result(self, method: str, *args) -> dict:
        if self.release is None:
            raise ApiError(404, "this app runs no release manager", "not_found")
        result = await getattr(self.release, method).remote(*args)
        if "error" in result:
            status = result.get("status", 400)
            raise ApiError(
                status, result["error"], "not_found" if status == 404 else "invalid_request_error"
            )
        return result

    async def _release_call(self, method: str, *args) -> JSONResponse:
        return JSONResponse(await self._release_result(method, *args))


@admin.post("/v1/releases")
async def start_release(request: Request):
    """POST /v1/releases {adapter, version, steps, gates, eval, shadow}: start a canary
    (admin). With `eval`, its rows are read first (400 if they cannot be) and this replica
    scores both versions in the background (serve/shadow.py)."""
    ing = current()
    spec = await json_object(request, "expected a JSON object: {adapter, version, steps, gates}")
    rows = await ing._eval_rows(spec)
    status = await ing._release_result("start", spec)
    if rows is not None and status.get("state") == "evaluating":
        ing._start_eval(status, rows)
    await ing._sync_releases()
    return JSONResponse(status)


@router.get("/v1/releases")
async def list_releases(request: Request):
    ing = current()
    ing._auth(request)
    return await ing._release_call("status")


@router.get("/v1/releases/{adapter}")
async def get_release(adapter: str, request: Request):
    ing = current()
    ing._auth(request)
    return await ing._release_call("status", adapter)


@admin.post("/v1/releases/{adapter}/abort")
async def abort_release(adapter: str, request: Request):
    ing = current()
    response = await ing._release_call("abort", adapter)
    await ing._sync_releases()
    return response


@admin.post("/v1/releases/{adapter}/pause")
async def pause_release(adapter: str, request: Request):
    """POST /v1/releases/{adapter}/pause: hold it at its step and split (admin)."""
    ing = current()
    return await ing._release_call("pause", adapter)


@admin.post("/v1/releases/{adapter}/resume")
async def resume_release(adapter: str, request: Request):
    """POST /v1/releases/{adapter}/resume: its step again, on fresh counts (admin)."""
    ing = current()
    return await ing._release_call("resume", adapter)
