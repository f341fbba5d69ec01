"""The adapter store as the server sees it: `<storage.root>/adapters/<name>/`, written by training.

The root is a local directory on one node, or `s3://` / `gs://` on a cluster. Ray Serve LLM's own
`dynamic_lora_loading_path` takes only cloud URIs, so lorafleet plugs its own loader into
`LLMServer(model_downloader=...)`: one code path for every root, through `cluster.storage` (the
seam training publishes through). Local adapters are read in place; remote ones are copied into
a per-node cache first, as Ray's loader does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from cluster import storage
from cluster.errors import LorafleetError
from cluster.layout import ADAPTER_CONFIG, ADAPTER_META, TINY_MARKER, tiny_dir, tiny_name, tiny_uri
from cluster.schema_base import is_valid_name

# a publish in progress (`cluster.storage` writes `<name>.incoming`, then renames it)
INCOMING_SUFFIX = ".incoming"


def is_adapter_name(name: str) -> bool:
    """A name the store serves: a valid name, and not a publish still in progress."""
    return is_valid_name(name) and not name.endswith(INCOMING_SUFFIX)


class BaseNotBuilt(LorafleetError):
    """A `tiny://` base that no training run or demo has built on this machine yet."""


def resolve_base(base: str, storage_root: str) -> str:
    """`tiny://<name>` is the directory training built; anything else goes to vLLM as given."""
    name = tiny_name(base)
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


def base_key(base: str, storage_root: str) -> str:
    """One spelling per base (`tiny://demo` and its directory are the same model), so the
    adapter-fits-model check is a string comparison. On a remote root, training records a tiny
    base by its URI (`<root>/models/<name>`), not by any node's local copy."""
    name = tiny_name(base)
    if name is not None and storage.is_remote(storage_root):
        return tiny_uri(name, storage_root)
    try:
        return resolve_base(base, storage_root)
    except BaseNotBuilt:
        return base


class AdapterStore:
    """Names of the adapters in the store and the base each was trained on (as `base_key`),
    re-listed every `ttl_s` so adapters published after start are served without a redeploy."""

    def __init__(self, root: str, storage_root: str, ttl_s: float = 5.0):
        self.root = root
        self.storage_root = storage_root
        self.ttl_s = ttl_s
        self._listed_at = -1e9
        self._bases: dict[str, str | None] = {}

    def _list(self) -> dict[str, str | None]:
        bases: dict[str, str | None] = {}
        for name in storage.listdir(self.root):
            if not is_adapter_name(name):
                continue  # half-published `<name>.incoming` folders, stray files
            uri = storage.join(self.root, name)
            if not storage.exists(storage.join(uri, ADAPTER_CONFIG)):
                continue
            try:
                meta = json.loads(storage.read_text(storage.join(uri, ADAPTER_META)))
                bases[name] = base_key(meta["base_model"], self.storage_root)
            except Exception:
                bases[name] = None  # a plain PEFT adapter: fits any base of the right shape
        return bases

    async def adapters(self, refresh: bool = False) -> dict[str, str | None]:
        """{adapter name: base model it was trained on (None: unknown)}."""
        if refresh or time.monotonic() - self._listed_at > self.ttl_s:
            self._bases = await asyncio.to_thread(self._list)
            self._listed_at = time.monotonic()
        return self._bases


def _version(uri: str) -> str:
    """The published version of the adapter at `uri`: its files (sizes, times) and its
    lorafleet.json, which names the publish uniquely, so a same-size republish differs too."""
    listing = storage.files(uri)
    names = {f for f, _, _ in listing}
    if ADAPTER_CONFIG not in names:
        raise FileNotFoundError(uri)
    meta = storage.read_text(storage.join(uri, ADAPTER_META)) if ADAPTER_META in names else ""
    return hashlib.sha256(json.dumps([listing, meta]).encode()).hexdigest()[:16]


def local_copy(root: str, name: str, cache_dir: str | None = None, attempts: int = 3) -> str:
    """A local directory holding adapter `name`: the store itself when local, else a copy in the
    node's cache, kept per store and per published version, so two stores with one adapter name
    never share a copy and a republished adapter is fetched again. A publish that lands while a
    copy downloads makes it download again."""
    import shutil

    if not is_adapter_name(name):
        raise ValueError(f"invalid adapter name {name!r}")
    uri = storage.join(root, name)
    if not storage.is_remote(root):
        if not Path(uri, ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"adapter {name!r} not found in {root}")
        return uri
    cache = Path(cache_dir or Path(tempfile.gettempdir(), f"lorafleet-lora-cache-{os.getuid()}"))
    store_key = hashlib.sha256(root.rstrip("/").encode()).hexdigest()[:12]
    for _ in range(attempts):
        try:
            version = _version(uri)
        except FileNotFoundError:
            raise FileNotFoundError(f"adapter {name!r} not found in {root}") from None
        dest = cache / store_key / name / version
        if (dest / ADAPTER_CONFIG).is_file():
            return str(dest)
        tmp = dest.with_name(f".{version}.{os.getpid()}.incoming")
        try:
            storage.download_dir(uri, tmp)
            if _version(uri) != version:  # republished meanwhile: what came may be mixed
                continue
            try:
                tmp.rename(dest)
            except OSError:  # another replica on this node got there first
                pass
            return str(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise RuntimeError(f"adapter {name!r} in {root} changed during {attempts} downloads")
