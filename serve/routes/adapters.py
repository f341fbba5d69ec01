"""The adapter store over HTTP: an adapter's versions, its current one and history, and which
vLLM replicas hold each version (from Serve's controller: `LoadedMixin`); promote and rollback
(admin) move its `current` pointer (cluster/store/versions.py); an import (admin) publishes a PEFT
folder lorafleet did not train (cluster/store/importing.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from cluster.config.base import name_problem
from cluster.store import storage, versions
from cluster.store.versions import is_version_id
from serve.auth import ApiError, admin_router, current
from serve.gate import json_object
from serve.ray_internal import loaded_model_ids
from serve.store import split_adapter

# GET /v1/adapters/{name} asks Serve's controller what the replicas hold at most this often, and
# answers "unknown" (loaded_on: null) when it does not answer within the timeout
LOADED_TTL_S = 1.0
LOADED_TIMEOUT_S = 2.0

router = APIRouter()
admin = admin_router()


class LoadedMixin:
    """Needs from the ingress: llm_handles, _loaded_at, _loaded_lock."""

    async def _loaded(self) -> dict[str, dict[str, list[str]]] | None:
        """{model id: {replica id: the multiplexed ids it holds}} for every vLLM deployment, as
        Serve's controller knows them (ray_internal.loaded_model_ids), asked at most once per
        LOADED_TTL_S (the page asks once per adapter per poll); None when it does not answer."""
        async with self._loaded_lock:
            at, found = self._loaded_at
            if time.monotonic() - at < LOADED_TTL_S:
                return found
            deployments = {
                mid: (h.app_name, h.deployment_name) for mid, h in self.llm_handles.items()
            }
            try:  # no vLLM deployment (an ingress without engines): nothing to ask
                found = await loaded_model_ids(deployments, LOADED_TIMEOUT_S) if deployments else {}
            except Exception as e:  # the controller restarting: the page says "unknown"
                print(f"[ingress] cannot read the replicas' loaded adapters: {e!r}")
                found = None
            self._loaded_at = (time.monotonic(), found)
            return found

    async def _loaded_on(self, name: str) -> list[dict] | None:
        """[{"model", "replica", "versions"}]: each vLLM replica holding (or loading) a version of
        adapter `name`, and which versions; None when Serve's controller did not say."""
        found = await self._loaded()
        if found is None:
            return None
        out = []
        for model_id, replicas in sorted(found.items()):
            for replica, ids in sorted(replicas.items()):
                held = set()
                for mid in ids:  # `<model>:<adapter>@<version>` (_check_target)
                    base, _, spec = mid.partition(":")
                    adapter, version = split_adapter(spec)
                    if base == model_id and adapter == name and version:
                        held.add(version)
                if held:
                    out.append({"model": model_id, "replica": replica, "versions": sorted(held)})
        return out


@router.get("/v1/adapters/{name}")
async def adapter_versions(name: str, request: Request):
    """GET /v1/adapters/{name}: its versions (metrics, source, publish time), the current, and
    the vLLM replicas that hold it (`loaded_on`: which replica, which versions; null when
    Serve's controller did not answer)."""
    ing = current()
    ing._auth(request)
    if name_problem(name):  # checked before the name touches a path
        raise ApiError(400, name_problem(name), param="name")
    pointer = await asyncio.to_thread(versions.pointer, ing.store.root, name)
    if pointer is None:
        raise await ing._not_found(name, f"adapter {name!r} is not in the adapter store")
    found = await asyncio.to_thread(versions.versions, ing.store.root, name)
    keep = (
        "version",
        "published_at",
        "source",
        "step",
        "eval_loss",
        "metrics",
        "base_fingerprint",
        "prompt_format",  # how requests to it are rendered (cluster/text/prompt_format.py)
    )
    return JSONResponse(
        {
            "adapter": name,
            "current": pointer["version"],
            "history": pointer.get("history", []),
            "versions": [{k: m.get(k) for k in keep} for m in found],
            "loaded_on": await ing._loaded_on(name),
        }
    )


@admin.post("/v1/adapters/{name}/versions")
async def import_version(name: str, request: Request):
    """POST /v1/adapters/{name}/versions {"source": PATH | s3://... | HUB_ID, "model": ID,
    "candidate": false} (admin): check a PEFT folder the server can read against model ID's base
    and publish it as a new version (cluster/store/importing.py); 201 with the version and its
    provenance, 400 naming every problem."""
    from cluster.errors import LorafleetError
    from cluster.store import importing
    from serve.store import resolve_base

    ing = current()
    if name_problem(name):
        raise ApiError(400, name_problem(name), param="name")
    expected = 'expected {"source": "<folder | s3://... | org/hub-id>", "model": "<model id>"}'
    body = await json_object(request, expected)
    source, candidate = body.get("source"), body.get("candidate", False)
    if not isinstance(source, str) or not source.strip():
        raise ApiError(400, f"source: {expected}. Got {source!r} instead", param="source")
    if not isinstance(candidate, bool):
        raise ApiError(
            400, f"candidate: expected true or false. Got {candidate!r}", param="candidate"
        )
    model = body.get("model") or (next(iter(ing.bases)) if len(ing.bases) == 1 else None)
    if model not in ing.bases:
        why = f"model: expected one of {sorted(ing.bases)} (the base it will be served on)"
        raise ApiError(400, f"{why}. Got {model!r} instead", param="model")
    m = next(m for m in ing.cfg.models if m.id == model)

    def run() -> dict:
        where = resolve_base(m.base, ing.cfg.storage.root)
        local = Path(where) if not storage.is_remote(where) and Path(where).is_dir() else None
        fingerprint = (
            ing.base_ids.get(model) or importing.base_for(m.base, ing.cfg.storage.root).fingerprint
        )
        base = importing.Base(m.base, local, fingerprint)
        return importing.import_adapter(
            name,
            source,
            ing.store.root,
            base,
            by="http",
            make_current=not candidate,
            max_rank=m.max_lora_rank,
        )

    try:
        meta = await asyncio.to_thread(run)
    except importing.ImportRefused as e:
        raise ApiError(
            400, f"cannot import {source}: " + "; ".join(e.problems), param="source"
        ) from None
    except LorafleetError as e:
        raise ApiError(400, str(e), param="source") from None
    await ing.store.current(refresh=True)
    keep = ("version", "published_at", "source", "base_model", "base_fingerprint")
    now = await asyncio.to_thread(versions.current, ing.store.root, name)
    return JSONResponse(
        {"adapter": name, "current": now, **{k: meta.get(k) for k in keep}}, status_code=201
    )


@admin.post("/v1/adapters/{name}/{action}")
async def move_adapter(name: str, action: str, request: Request):
    """POST /v1/adapters/{name}/promote {"version": ...} | /rollback (admin): move `current`."""
    ing = current()
    if action not in ("promote", "rollback"):
        raise ApiError(404, f"no action {action!r}: promote or rollback", "not_found")
    if name_problem(name):
        raise ApiError(400, name_problem(name), param="name")
    version = None
    if action == "promote":
        expected = 'expected {"version": "<version id>"}'
        version = (await json_object(request, expected)).get("version")
        if not isinstance(version, str) or not is_version_id(version):
            raise ApiError(400, 'expected {"version": "<version id>"}', param="version")
    try:
        if version:
            pointer = await asyncio.to_thread(versions.promote, ing.store.root, name, version)
        else:
            pointer = await asyncio.to_thread(versions.rollback, ing.store.root, name)
    except (versions.NothingToRollBack, versions.PointerConflict) as e:  # the adapter is
        raise ApiError(409, str(e), "conflict") from None  # there; the move is not, or raced
    except versions.VersionError as e:
        raise ApiError(404, str(e), "not_found") from None
    await ing.store.current(refresh=True)
    return JSONResponse({"adapter": name, **pointer})
