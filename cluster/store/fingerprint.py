"""What a base model is, independent of where it lies: the identity an adapter records and
serving checks, so any copy of the same base serves an adapter and a different base refuses it.

    a directory (or an s3:// / gs:// copy of one)   sha256:<16 hex> of config.json and the weights
    a hub id                                        hub:<id>@<revision, or main>

Hashing a large model's weights takes a while (~1 GB/s), so a directory's fingerprint is kept in
this node's cache, keyed by its path and the size and mtime of the files hashed: computed once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cluster.store import storage

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _hashed_files(directory: Path) -> list[Path]:
    files = [directory / "config.json"] if (directory / "config.json").is_file() else []
    return files + sorted(
        p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )


def _hash_directory(directory: Path) -> str:
    files = _hashed_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory}: no config.json or weight files to identify a model")
    stat = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([str(directory.resolve()), stat]).encode()).hexdigest()[:24]
    memo = storage.cache_root() / "fingerprints" / key
    if memo.is_file():
        return memo.read_text()
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    value = f"sha256:{digest.hexdigest()[:16]}"
    memo.parent.mkdir(parents=True, exist_ok=True)
    storage.write_text(str(memo), value)
    return value


def base_fingerprint(source: str, revision: str | None = None) -> str:
    """The identity of base `source`: a local directory, an s3:// or gs:// copy of one (fetched
    through the node cache), or a hub id (which names itself, with its revision)."""
    if storage.is_remote(source):
        return _hash_directory(storage.local_copy(source))
    path = Path(source).expanduser()
    if path.is_dir():
        return _hash_directory(path)
    return f"hub:{source}@{revision or 'main'}"
