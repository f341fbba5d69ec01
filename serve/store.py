"""The adapter store as the server sees it: `<storage.root>/adapters/<name>/` with its immutable
versions and the `current` pointer (`cluster.store.versions`), written by training. Which version
of each adapter is current comes from the store's index (`cluster.store.index`): a refresh that
finds nothing changed costs one conditional request, whatever the number of adapters.

The root is a local directory on one node, or `s3://` / `gs://` on a cluster. Ray Serve LLM's own
`dynamic_lora_loading_path` takes only cloud URIs, so lorafleet plugs its own loader into
`LLMServer(model_downloader=...)`: one code path for every root, through `cluster.store.storage` (the
seam training publishes through). Local versions are read in place; remote ones are copied into
a per-node cache first, as Ray's loader does. A version never changes once complete, so the cache
keys on it and never looks again.

A served adapter is addressed `<adapter>@<version>` inside the app (vLLM's LoRA name, Serve's
multiplexed model id, the node cache): a promote changes the id, so every replica loads the new
version on its next request for it, and vLLM's prefix cache, which keys on the LoRA name, never
hands one version's KV blocks to another.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cluster.config.base import name_problem
from cluster.errors import LorafleetError
from cluster.store import index, storage, versions
from cluster.store.layout import ADAPTER_CONFIG, TINY_MARKER, tiny_dir, tiny_name
from cluster.text.prompt_format import Recorded

VERSION_SEP = "@"


def split_adapter(spec: str) -> tuple[str, str | None]:
    """'support@20261202-003015-123-9f3a' -> ('support', '20261202-...'); 'support' -> (.., None)."""
    name, sep, version = spec.partition(VERSION_SEP)
    return name, (version if sep else None)


def is_adapter_name(name: str) -> bool:
    """A name the store may serve: a valid name, not one of lorafleet's own."""
    return name_problem(name) is None


class BaseNotBuilt(LorafleetError):
    """A `tiny://` base that no training run or demo has built on this machine yet."""


def resolve_base(base: str, storage_root: str) -> str:
    """What each replica loads: `tiny://<name>` is the model training built (its directory, or
    on a bucket root the URI it uploaded there); a local directory its absolute path; anything
    else (an s3:// or gs:// URI, a hub id) as given. A replica fetches a URI into its node's
    cache before vLLM starts (`base_source`), so no node needs the driver's files."""
    from cluster.store.layout import tiny_uri

    name = tiny_name(base)
    if name is not None and storage.is_remote(storage_root):
        uri = tiny_uri(name, storage_root)
        if not storage.exists(storage.join(uri, TINY_MARKER)):
            raise BaseNotBuilt(
                f"base {base!r} is not built (no model at {uri}); build it first with "
                f"`lorafleet train` on a config with model.base: {base} and this storage.root"
            )
        return uri
    if name is not None:
        path = tiny_dir(name, storage_root)
        if not (path / "config.json").is_file() or not (path / TINY_MARKER).is_file():
            raise BaseNotBuilt(
                f"base {base!r} is not built (no model at {path}); build it first with "
                f"`lorafleet demo`, or `lorafleet train` on a config with model.base: {base}"
            )
        return str(path)
    if not storage.is_remote(base) and Path(base).expanduser().exists():
        return storage.absolute(base)
    return base


def base_source(source: str, log=print, key: str = "models[].base") -> str:
    """What vLLM loads for `resolve_base`'s answer, on this node: an s3:// or gs:// base as a
    copy in the node's cache, fetched once per node and per content (as training fetches its
    base); a directory or hub id as given. `key`: the config key an error names."""
    if not storage.is_remote(source):
        return source
    return str(storage.local_model(source, key, log=log))


def base_identity(
    base: str, storage_root: str, revision: str | None = None, key: str = "models[].base"
) -> str:
    """The fingerprint of the base a model serves (`cluster.store.fingerprint`): what adapters are
    checked against, so any copy of the same base fits and a different base does not. A base on
    a bucket is hashed from this node's cached copy (`base_source`), so one that cannot be read
    is a one-line error here, before anything starts."""
    from cluster.store.fingerprint import base_fingerprint

    return base_fingerprint(base_source(resolve_base(base, storage_root), key=key), revision)


@dataclass(frozen=True)
class Served:
    """The version of an adapter a request gets, and the base it was trained on."""

    name: str
    version: str
    base: str | None  # base_model as training recorded it (None: a plain PEFT adapter)
    fingerprint: str | None  # None: unknown, fits any base of the right shape
    # the prompt format it was trained in (None: not recorded; served as the base model is)
    prompt: Recorded | None = field(default=None, compare=False)

    @property
    def lora_id(self) -> str:
        return f"{self.name}{VERSION_SEP}{self.version}"


def version_refusal(root: str, name: str, version: str) -> str | None:
    """Why vLLM cannot serve this adapter version (cluster.store.servability, read from its
    adapter_config.json), naming `lorafleet merge` as the way out; None when it can."""
    import json

    from cluster.store.servability import MERGEABLE, refusal, vllm_problems

    uri = storage.join(versions.version_uri(root, name, version), ADAPTER_CONFIG)
    try:
        conf = json.loads(storage.read_text(uri))
    except (OSError, ValueError):  # no readable config: vLLM's own load error says what is wrong
        return None
    problems = vllm_problems(conf)
    if not problems:
        return None
    return refusal(name, version, problems, str(conf.get("peft_type", "")).upper() in MERGEABLE)


class AdapterStore:
    """Each adapter's current version and each version's metadata (read once: versions never
    change). The current versions come from the store's index (cluster/store/index.py), asked
    again every `ttl_s` with the tag of the copy held: one conditional request when nothing
    changed, and only the adapters whose version changed are read again. A root without an index
    (no lorafleet with one has moved a pointer there yet) is listed the old way: every pointer."""

    def __init__(self, root: str, ttl_s: float = 1.0):
        self.root = root
        self.ttl_s = ttl_s
        self._listed_at = -1e9
        self._current: dict[str, str] = {}
        self._tag: str | None = None  # the index's tag when last read; None: not read, or none
        self._indexed = False  # the root has an index: it answers "unknown name" too
        self._meta: dict[tuple[str, str], Served] = {}
        self._refusals: dict[tuple[str, str], str | None] = {}  # vLLM cannot serve: why

    def _describe(self, name: str, version: str) -> Served | None:
        key = (name, version)
        if key not in self._meta:
            meta = versions.read_meta(self.root, name, version)
            if meta is None:
                return None
            self._meta[key] = Served(
                name,
                version,
                meta.get("base_model"),
                meta.get("base_fingerprint"),
                Recorded.from_meta(meta.get("prompt_format")),  # read once per version
            )
        return self._meta[key]

    def described(self, name: str, version: str) -> Served | None:
        """The version as already read (no I/O): what a routed request's version is, once
        `get` or `lookup` has found it."""
        return self._meta.get((name, version))

    async def refusal(self, served: Served) -> str | None:
        """version_refusal for a version the store found, read once per version (versions never
        change)."""
        key = (served.name, served.version)
        if key not in self._refusals:
            self._refusals[key] = await asyncio.to_thread(
                version_refusal, self.root, served.name, served.version
            )
        return self._refusals[key]

    def _list(self) -> dict[str, str]:
        """A root without an index: every adapter's pointer, read one by one."""
        found = {n: v for n, v in versions.scan(self.root).items() if is_adapter_name(n)}
        return self._described(found)

    def _described(self, found: dict[str, str]) -> dict[str, str]:
        """`found` less the versions that cannot be read; the metadata of versions not held yet
        read in parallel (a replica's first listing reads every adapter's, later ones only what
        changed)."""
        new = [(n, v) for n, v in found.items() if (n, v) not in self._meta]
        if len(new) > 8:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda nv: self._describe(*nv), new))
        return {n: v for n, v in found.items() if self._describe(n, v) is not None}

    def _refresh(self) -> tuple[dict[str, str], str | None, bool]:
        """(current versions, the index's tag, whether the root has an index), from one
        conditional read of the index when nothing changed."""
        state, found, tag = index.read(self.root, self._tag if self._indexed else None)
        if state == "same":
            return self._current, tag, True
        if state == "missing":
            return self._list(), None, False
        return self._described({n: v for n, v in found.items() if is_adapter_name(n)}), tag, True

    async def _fresh(self, refresh: bool = False) -> dict[str, str]:
        """{name: current version}, read again when `refresh` or older than `ttl_s`."""
        if refresh or time.monotonic() - self._listed_at > self.ttl_s:
            self._current, self._tag, self._indexed = await asyncio.to_thread(self._refresh)
            self._listed_at = time.monotonic()
        return self._current

    async def current(self, refresh: bool = False) -> dict[str, Served]:
        """{adapter name: its current version}."""
        return {n: self._meta[(n, v)] for n, v in (await self._fresh(refresh)).items()}

    def _read(self, name: str) -> tuple[str | None, Served | None]:
        version = versions.current(self.root, name) if is_adapter_name(name) else None
        return version, (self._describe(name, version) if version else None)

    async def lookup(self, name: str) -> Served | None:
        """`name`'s current version, for a name missing from the last listing: with an index,
        the index asked again (one conditional read; serve/names.py remembers a miss for
        MISS_TTL_S), so an adapter published a moment ago is served on its first request and an
        unknown one costs no read of its own; without one, its own pointer (not a listing of every adapter)."""
        if self._indexed:
            await self._fresh(refresh=True)
            version = self._current.get(name)
            return self._meta.get((name, version)) if version else None
        version, served = await asyncio.to_thread(self._read, name)
        if served is not None:  # on the event loop, where current() iterates the same dict
            self._current[name] = version
        return served

    async def get(self, name: str, version: str | None = None) -> Served | None:
        """The version a request for `name` (pinned to `version`, or current) gets; None if the
        store has no such adapter or version."""
        if version is not None:
            return await asyncio.to_thread(self._describe, name, version)
        version = (await self._fresh()).get(name)  # one name: no map of every adapter built
        return self._meta[(name, version)] if version else await self.lookup(name)


def local_copy(root: str, lora_id: str, cache_dir: str | None = None) -> str:
    """A local directory holding `<name>@<version>`: the version itself when the store is local,
    else a copy in the node's cache, per store and per version, fetched once (a version never
    changes) under a temporary name and renamed into place."""
    import shutil

    name, version = split_adapter(lora_id)
    if not is_adapter_name(name) or version is None or not versions.is_version_id(version):
        raise ValueError(f"invalid adapter id {lora_id!r}: expected <name>@<version>")
    if versions.read_meta(root, name, version) is None:
        raise FileNotFoundError(f"adapter {name!r} has no complete version {version!r} in {root}")
    uri = versions.version_uri(root, name, version)
    if not storage.is_remote(root):
        return uri
    cache = Path(cache_dir or Path(tempfile.gettempdir(), f"lorafleet-lora-cache-{os.getuid()}"))
    store_key = hashlib.sha256(root.rstrip("/").encode()).hexdigest()[:12]
    dest = cache / store_key / name / version
    if (dest / ADAPTER_CONFIG).is_file():
        return str(dest)
    tmp = dest.with_name(f".{version}.{os.getpid()}.{uuid.uuid4().hex[:8]}.incoming")
    try:
        storage.download_dir(uri, tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another replica on this node got there first: theirs is the same
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
