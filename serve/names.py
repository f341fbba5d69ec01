"""Names a request may send as `model`, and what they resolve to: a base model, an experiment,
or `<model>:<adapter>[@<version>]` from the adapter store (serve/store.py), checked against the
base it was trained on and against what vLLM can load. A miss is remembered for MISS_TTL_S, so
a client repeating an unknown name costs no store reads; the 404 names what could have been
meant. A mixin of the ingress replica (serve/ingress.py): it reads the replica's store, bases
and experiments, and the release routing (serve/routes/releases.py) picks a canary's version.
"""

from __future__ import annotations

import difflib
import time

from fastapi import Request

from cluster.config.base import name_problem
from cluster.store.versions import is_version_id
from serve.auth import ApiError
from serve.store import Served, split_adapter

# an unknown adapter re-lists the store at most this often (a publish is seen within it)
MISS_TTL_S = 2.0
MAX_MISSES = 4096
# GET /v1/models?limit=N&after=ID (serve/routes/openai.py)
MAX_PAGE = 1000
DEFAULT_PAGE = 100


def page(cards: list[dict], limit: str | None, after: str | None) -> dict:
    """One page of `cards` (in /v1/models order): the `limit` cards after the card `after`."""
    if limit is None:
        n = DEFAULT_PAGE
    else:
        try:
            n = int(limit)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_PAGE or not limit.strip().isdigit():
            raise ApiError(
                400,
                f"limit: expected an integer from 1 to {MAX_PAGE}, got {limit!r}",
                param="limit",
            )
    start = 0
    if after is not None:
        ids = [c["id"] for c in cards]
        if after not in ids:
            raise ApiError(
                400,
                f"after: {after!r} is not a model id in the list (pass the last_id of the page "
                "before)",
                param="after",
            )
        start = ids.index(after) + 1
    data = cards[start : start + n]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": start + n < len(cards),
    }


class NamesMixin:
    """Needs from the ingress: store, bases, base_ids, experiments, _misses, _release_arm."""

    async def _lookup(self, name: str, version: str | None) -> Served | None:
        """The store's `name` (at `version`, else current), or None. A name not in the last
        listing reads its own pointer (one read, not a listing of the store), so an adapter
        published a moment ago is served on its first request; a miss is remembered for
        MISS_TTL_S, so repeated requests for an unknown adapter read nothing."""
        now = time.monotonic()
        key = (name, version)
        missed = self._misses.get(key)
        if missed is not None and now - missed < MISS_TTL_S:
            return None
        if version is not None:
            served = await self.store.get(name, version)
        else:
            served = await self.store.get(name)
        if served is None:
            if len(self._misses) >= MAX_MISSES:
                self._misses.clear()
            self._misses[key] = now
        else:
            self._misses.pop(key, None)
        return served

    def _fits(self, adapter: Served, model_id: str) -> bool:
        """An adapter fits a model serving the same base (by fingerprint: any copy of it, wherever
        it lies); one whose base is unknown (a plain PEFT adapter) fits any."""
        serves = self.base_ids.get(model_id)
        return adapter.fingerprint is None or serves is None or adapter.fingerprint == serves

    async def _not_found(self, model: str, what: str) -> ApiError:
        names = [c["id"] for c in await self._cards()]
        close = difflib.get_close_matches(model, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        return ApiError(
            404,
            f"{what}. Served: models {sorted(self.bases)}, experiments "
            f"{sorted(self.experiments)}, adapters as '<model>:<adapter>' (GET /v1/models).{hint}",
            "model_not_found",
            "model",
        )

    async def _check_target(self, model: str, request: Request | None = None, user=None) -> str:
        """The model id to send on: `<model>:<adapter>[@<version>]` becomes `<model>:<adapter>@
        <version>` (current unless pinned). 404 for unknown models, adapters and versions (Ray's
        ingress answers 500), 400 for bad names and for an adapter trained on another base."""
        base_id, sep, spec = model.partition(":")
        if base_id not in self.bases:
            raise await self._not_found(model, f"model {model!r} does not exist")
        if not sep:
            return model
        name, version = split_adapter(spec)
        problem = name_problem(name)
        if problem or (version is not None and not is_version_id(version)):
            raise ApiError(
                400,
                problem
                or f"invalid version {version!r}: expected an id like "
                "20261202-003015-123-9f3a (lorafleet adapters show NAME)",
                param="model",
            )
        served = await self._lookup(name, version)
        if served is None and version is not None:
            raise ApiError(
                404, f"adapter {name!r} has no version {version!r}", "model_not_found", "model"
            )
        if served is None:
            raise await self._not_found(model, f"adapter {name!r} is not in the adapter store")
        if not self._fits(served, base_id):
            raise ApiError(
                400,
                f"adapter {name!r} version {served.version} was trained on base {served.base!r} "
                f"(fingerprint {served.fingerprint}), but model {base_id!r} serves "
                f"{self.bases[base_id]!r} (fingerprint {self.base_ids.get(base_id)}): a "
                "different model",
                param="model",
            )
        refused = await self.store.refusal(served)  # DoRA, bias, not LoRA: vLLM would fail (500)
        if refused:
            raise ApiError(400, refused, param="model")
        arm = self._release_arm(name, user) if version is None else None
        if arm is not None:  # a canary release of this adapter: the user's arm picks the version
            request.state.release = (name, arm[0])
            return f"{base_id}:{name}@{arm[1]}"
        return f"{base_id}:{served.lora_id}"

    async def _cards(self) -> list[dict]:
        """OpenAI model cards: each base, the adapters that fit it, each experiment."""
        adapters = await self.store.current()
        now = int(time.time())

        def card(mid, root, parent=None, **extra):
            return {
                "id": mid,
                "object": "model",
                "created": now,
                "owned_by": "lorafleet",
                "root": root,
                "parent": parent,
                **extra,
            }

        cards = []
        for mid, base in self.bases.items():
            cards.append(card(mid, base))
            cards += [
                card(f"{mid}:{a}", a, mid, version=served.version)
                for a, served in sorted(adapters.items())
                if self._fits(served, mid)
            ]
        for name, e in self.experiments.items():
            cards.append(card(name, name, experiment={"variants": [v.name for v in e.variants]}))
        return cards
