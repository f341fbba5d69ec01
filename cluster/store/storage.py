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
import threading
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from cluster.errors import LorafleetError, ModelError

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


def _s3_endpoint() -> tuple[str | None, str]:
    """(the S3 endpoint URL the environment names, or None for AWS's own; the region): what
    pyarrow's filesystem (`_fs`) and the boto3 client (`_s3`) both talk to."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return endpoint or None, os.environ.get("AWS_DEFAULT_REGION", "us-east-1")


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if is_remote(uri):
        endpoint, region = _s3_endpoint()
        if uri.startswith("s3://") and endpoint:
            bucket_path = uri[len("s3://") :]
            scheme, _, host = endpoint.partition("://")
            fs = pafs.S3FileSystem(
                endpoint_override=host or endpoint,
                scheme=scheme if host else "https",
                region=region,
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


# --- conditional reads and writes (compare-and-swap) ----------------------------------------
#
# A tag names one stored state of a small file: on S3 its ETag, on a local disk its inode, size
# and mtime (a write renames a new file into place, so every write changes the inode). `write_if`
# writes only when the file still has the tag its writer read (None: only when there is no file):
# S3 conditional writes (PUT with `If-Match: <etag>` / `If-None-Match: *`, answered 412 when
# lost); on a local disk an flock beside the file around a re-check and the rename. gs:// is not
# covered: pyarrow's GcsFileSystem exposes no generation preconditions (`supports_cas` is False
# there, and the callers say what they do instead).


class ConditionalWritesUnsupported(LorafleetError):
    """A compare-and-swap asked of a storage root that cannot do one (gs://, for now)."""


def supports_cas(uri: str) -> bool:
    """Whether `write_if` is a real compare-and-swap on `uri`: a local disk and s3://."""
    return not is_remote(uri) or str(uri).startswith("s3://")


_s3_clients: dict = {}
_s3_lock = threading.Lock()


def _s3(uri: str):
    """(boto3 S3 client, bucket, key) for an s3:// URI: the endpoint and region `_fs` uses.
    boto3, not pyarrow: pyarrow's S3FileSystem sends no If-Match / If-None-Match."""
    endpoint, region = _s3_endpoint()
    with _s3_lock:
        client = _s3_clients.get((endpoint, region))
        if client is None:
            import boto3

            client = boto3.client("s3", endpoint_url=endpoint, region_name=region)
            _s3_clients[(endpoint, region)] = client
    bucket, _, key = str(uri)[len("s3://") :].partition("/")
    return client, bucket, key


def _s3_code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _stat_tag(st: os.stat_result) -> str:
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


def _local_tag(path: Path) -> str | None:
    try:
        return _stat_tag(path.stat())
    except FileNotFoundError:
        return None


def read_tagged(uri: str, if_changed_from: str | None = None) -> tuple[str | None, str | None]:
    """(text, tag) of a small file; (None, None) when there is none. With `if_changed_from`, a
    file still at that tag answers (None, that tag) without its content: one conditional GET on
    S3 (`If-None-Match`, answered 304), one stat on a local disk."""
    if not is_remote(uri):
        path = Path(uri).expanduser()
        tag = _local_tag(path)
        if tag is None or tag == if_changed_from:
            return None, tag
        try:  # the tag of the file opened, whatever a rename did since the stat
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                text = f.read().decode()
        except FileNotFoundError:
            return None, None
        return text, _stat_tag(st)
    if not str(uri).startswith("s3://"):  # gs://: the modification time stands in for a tag
        fs, path = _fs(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return None, None
        tag = f"{info.size}-{info.mtime_ns}"
        if tag == if_changed_from:
            return None, tag
        return read_text(uri), tag
    from botocore.exceptions import ClientError

    client, bucket, key = _s3(uri)
    kw = {"IfNoneMatch": if_changed_from} if if_changed_from else {}
    try:
        got = client.get_object(Bucket=bucket, Key=key, **kw)
    except ClientError as e:
        code = _s3_code(e)
        if code == "304":
            return None, if_changed_from
        if code in ("NoSuchKey", "404"):
            return None, None
        raise
    return got["Body"].read().decode(), got["ETag"]


def write_if(uri: str, text: str, tag: str | None) -> bool:
    """Write `text` to `uri` only if the file is still at `tag` (None: only if there is no file);
    False when another writer got there first (nothing written: re-read and decide again).
    Raises ConditionalWritesUnsupported where `supports_cas` is False."""
    if not is_remote(uri):
        import fcntl

        dst = Path(uri).expanduser()
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst.with_name(f".{dst.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if _local_tag(dst) != tag:
                    return False
                write_text(uri, text)
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    if not str(uri).startswith("s3://"):
        raise ConditionalWritesUnsupported(
            f"{uri}: conditional writes are implemented for s3:// and local roots only"
        )
    from botocore.exceptions import ClientError

    client, bucket, key = _s3(uri)
    cond = {"IfMatch": tag} if tag else {"IfNoneMatch": "*"}
    try:
        client.put_object(Bucket=bucket, Key=key, Body=text.encode(), **cond)
    except ClientError as e:
        # 412: the precondition failed; 409: a racing conditional write on the same key (S3)
        if _s3_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return False
        if _s3_code(e) in ("NoSuchKey", "404") and tag:  # If-Match on a file deleted since
            return False
        raise
    return True


def read_text(uri: str) -> str:
    if str(uri).startswith("s3://"):  # one GET (pyarrow's input stream asks with a HEAD first)
        text, _ = read_tagged(uri)
        if text is None:
            raise FileNotFoundError(f"{uri}: not found")
        return text
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


def delete_file(uri: str) -> None:
    """Remove the file at `uri` (nothing there: nothing to do)."""
    if not is_remote(uri):
        Path(uri).expanduser().unlink(missing_ok=True)
        return
    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


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


def local_model(uri: str, what: str, log=print) -> Path:
    """The model directory at an s3:// or gs:// `uri` as this node's cached copy (`local_copy`);
    a ModelError starting with `what` (the config key that named it) when it cannot be read."""
    try:
        return local_copy(uri, log=log)
    except OSError as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(
            f"{what}: '{uri}' could not be read ({reason}); expected a model directory "
            "(config.json, weights, tokenizer files) at that URI"
        ) from None
