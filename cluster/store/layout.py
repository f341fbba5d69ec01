"""Where lorafleet keeps things under `storage.root`, and the file names of a published
adapter: one rule each, read by training (which writes them) and serving (which reads them).

    <storage.root>/models/<name>/            a `tiny://<name>` base, built by the driver
    <storage.root>/adapters/<name>/          a published adapter: ADAPTER_FILES + ADAPTER_META
    <storage.root>/runs/<run>/               Ray Train / Tune runs and checkpoints
"""

from __future__ import annotations

import re
from pathlib import Path

from cluster.store import storage

TINY_SCHEME = "tiny://"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# what lorafleet adds beside PEFT's files: base, metrics, config, publish id
ADAPTER_META = "lorafleet.json"
# an adapter version's id (cluster/store/versions.py); ASCII digits only
VERSION_RE = re.compile(r"\d{8}-\d{6}-\d{3}-[0-9a-f]{4}", re.ASCII)


def is_version_id(version) -> bool:
    """A version id (VERSION_RE, whole: `$` would let a trailing newline through)."""
    return isinstance(version, str) and bool(VERSION_RE.fullmatch(version))


# what ensure_tiny_base writes last, so a half-built tiny base is never taken for a whole one
TINY_MARKER = "lorafleet-tiny.json"


def tiny_name(base: str) -> str | None:
    """`tiny://demo` -> 'demo'; None for any other base (a directory or a hub id)."""
    return base[len(TINY_SCHEME) :] if base.startswith(TINY_SCHEME) else None


def tiny_uri(name: str, storage_root: str) -> str:
    """Where `tiny://<name>` lives for every node: `<root>/models/<name>` (local path or URI).
    Training records it as the adapter's base, so serving compares bases by it."""
    return storage.join(storage.absolute(storage_root), "models", name)


def tiny_dir(name: str, storage_root: str) -> Path:
    """The local directory of `tiny://<name>` on this machine: under a local storage root,
    `<root>/models/<name>`; under a remote one (s3://, gs://), the driver builds it in this
    machine's cache before uploading it to `tiny_uri`, since Hugging Face savers write locally."""
    if storage.is_remote(storage_root):
        return Path("~/.cache/lorafleet/models", name).expanduser()
    return Path(storage.absolute(storage_root), "models", name)


def adapters_root(storage_root: str) -> str:
    return storage.join(storage.absolute(storage_root), "adapters")


def runs_root(storage_root: str) -> str:
    return storage.join(storage.absolute(storage_root), "runs")
