"""One seam for every read and write of runs, checkpoints and adapters, and for reading data
files and base models from wherever they live (`local_copy`: remote ones via a per-node cache).

A storage root is a local path, `s3://bucket/prefix` or `gs://bucket/prefix`. pyarrow's
filesystems do the work (the same ones Ray Train uses for `RunConfig(storage_path=...)`), so an
S3-compatible server named by `AWS_ENDPOINT_URL_S3` works as a bucket. Credentials come from
the environment, never from the config.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from cluster.errors import LorafleetError

REMOTE_SCHEMES = ("s3://", "gs://")


def is_remote(uri: str) -> bool:
    return str(uri).startswith(REMOTE_SCHEMES)


class UnsafePath(LorafleetError, ValueError):
    """A path part that would leave the root it is joined to."""


def _part_problem(part) -> str | None:
    """Why `part` cannot be joined below a root: not a string, empty, absolute, or a `..` (or a
    NUL) in any of its segments; None when it stays below the root."""
    if not isinstance(part, str) or not part:
        return f"expected a non-empty relative name, got {part!r}"
    if "\0" in part:
        return f"{part!r} holds a NUL character"
    if part.startswith(("/", "\\")) or Path(part).is_absolute() or part[1:3] in (":/", ":\\"):
        return f"{part!r} is an absolute path"
    if any(seg == ".." for seg in part.replace("\\", "/").split("/")):
        return f"{part!r} climbs out with '..'"
    return None


def join(root: str, *parts: str) -> str:
    """`root` and `parts` as one URI or path. Every part must stay below the root: an absolute
    part, a `..` segment or a NUL raises UnsafePath, whoever the caller is (the adapter store's
    names are checked again against the name rule in cluster/store/versions.py)."""
    for part in parts:
        problem = _part_problem(part)
        if problem:
            raise UnsafePath(f"refusing to join {problem} below {root}")
    if is_remote(root):
        return "/".join([str(root).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root, *parts))


def absolute(uri: str) -> str:
    """Local paths become absolute (workers and jobs may run in another directory)."""
    return uri if is_remote(uri) else str(Path(uri).expanduser().resolve())


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if is_remote(uri):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if uri.startswith("s3://") and endpoint:
            bucket_path = uri[len("s3://") :]
            scheme, _, host = endpoint.partition("://")
            fs = pafs.S3FileSystem(
                endpoint_override=host or endpoint,
                scheme=scheme if host else "https",
                region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            )
            return fs, bucket_path
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it): what Ray Train's RunConfig takes."""
    return _fs(uri)


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def files(uri: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of every file under `uri`, sorted: a version fingerprint
    (a publish rewrites every file, so size and mtime change with it)."""
    fs, path = _fs(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    base = path.rstrip("/") + "/"
    return sorted(
        (i.path[len(base) :] if i.path.startswith(base) else i.path, i.size or 0, i.mtime_ns or 0)
        for i in infos
        if i.type == pafs.FileType.File
    )


def write_text(uri: str, text: str) -> None:
    """Write a whole small file, atomically: a reader sees the old text or the new, never half
    (a local file is written under a temporary name and renamed; an object PUT is atomic)."""
    if not is_remote(uri):
        dst = Path(uri).expanduser()
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(text)
        os.replace(tmp, dst)
        return
    fs, path = _fs(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(uri: str) -> str:
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory to `uri`, replacing what was there (a publish is whole)."""
    if not is_remote(uri):
        dst = Path(uri).expanduser()
        tmp = dst.with_name(dst.name + ".incoming")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(local_dir, tmp)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
        return
    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir_contents(path, missing_dir_ok=True)
    pafs.copy_files(str(Path(local_dir).resolve()), path, destination_filesystem=fs)


def download_dir(uri: str, local_dir: str | Path) -> Path:
    local = Path(local_dir)
    if not is_remote(uri):
        if Path(uri).resolve() != local.resolve():
            shutil.copytree(uri, local, dirs_exist_ok=True)
        return local
    fs, path = _fs(uri)
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local.resolve()), source_filesystem=fs)
    return local


def delete_dir(uri: str) -> None:
    """Remove `uri` and everything under it (nothing there: nothing to do)."""
    if not is_remote(uri):
        shutil.rmtree(Path(uri).expanduser(), ignore_errors=True)
        return
    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def listdir(uri: str) -> list[str]:
    fs, path = _fs(uri)
    info = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in info)


def cache_root() -> Path:
    """This node's cache of remote files: $LORAFLEET_CACHE, else ~/.cache/lorafleet/remote."""
    return Path(os.environ.get("LORAFLEET_CACHE") or "~/.cache/lorafleet/remote").expanduser()


def _fingerprint(uri: str) -> tuple[str, list]:
    """('file' | 'dir', listing) of `uri`; FileNotFoundError naming it when nothing is there."""
    fs, path = _fs(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return "file", [(info.base_name, info.size or 0, info.mtime_ns or 0)]
    listing = files(uri) if info.type == pafs.FileType.Directory else []
    if not listing:
        raise FileNotFoundError(f"{uri}: not found")
    return "dir", listing


def local_copy(uri: str, log=print) -> Path:
    """A local path with the content of `uri`: the path itself when local; for s3:// or gs://, a
    copy in this node's cache, fetched once per node and per content (keyed by the URI and the
    size and mtime of every file, so a rewrite is fetched again). The copy lands under a temporary
    name and is renamed into place, so workers racing on one node never see half a copy."""
    if not is_remote(uri):
        return Path(uri).expanduser()
    kind, listing = _fingerprint(uri)
    key = hashlib.sha256(json.dumps([uri.rstrip("/"), listing]).encode()).hexdigest()[:20]
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    dest = cache_root() / key / name
    if dest.exists():
        return dest
    tmp = dest.with_name(f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.incoming")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    size_mb = sum(size for _, size, _ in listing) / 1e6
    log(f"[storage] fetching {uri} ({len(listing)} file(s), {size_mb:,.1f} MB) into {dest.parent}")
    t0 = time.monotonic()
    try:
        if kind == "file":
            fs, path = _fs(uri)
            with fs.open_input_stream(path) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
        else:
            download_dir(uri, tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another process on this node got there first: theirs is the same
            pass
        log(f"[storage] fetched {uri} in {time.monotonic() - t0:.1f} s")
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return dest
