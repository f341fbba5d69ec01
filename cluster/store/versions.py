"""Immutable adapter versions, and the pointer that names the one served.

    <storage.root>/adapters/<name>/versions/<version>/   adapter files, then lorafleet.json (last)
    <storage.root>/adapters/<name>/current               {"version": ..., "history": [...], ...}

A publish writes a whole version first and moves the pointer last, so a reader that follows the
pointer finds the old version or the new one, never a half. A version is complete when its
lorafleet.json exists: on a local disk the version is built under a hidden temporary name and
renamed into place; on s3:// or gs:// its metadata is written after every other file. A publish
killed mid-copy leaves an incomplete version that nothing lists or serves; pruning removes it.

Version ids sort by publish time (`20261202-003015-123-9f3a`: UTC to the millisecond, plus 4
random hex digits), and a publish moves the pointer only forward: of two concurrent publishes of
one name both land as versions, and `current` names the later one.

Moving the pointer: a publish, `promote` and a release's promotion move it *forward* (to any
complete version) and push the version they leave onto the pointer's `history`, newest first:
`history` is what is behind the current version, in the order it was served. `rollback` walks
back: it pops the newest complete version off `history` and serves it, and records the version
it left in `rolled_back` (newest first; a forward move clears it). Repeated rollbacks therefore
go v3 -> v2 -> v1 and then refuse (`NothingToRollBack`); a rollback never returns to a version
it left, and `promote` is the only way forward again. A pointer written before `rolled_back`
existed is read as one: if it was last moved by a rollback, the version that rollback left
(the head of its old history) is taken off `history` and put in `rolled_back`.

Every move is a compare-and-swap on what the mover read (`_put`): on s3:// a conditional PUT
(`If-Match` on the pointer's ETag, `If-None-Match: *` for a first one); on a local disk an flock
beside the pointer. A publish that loses re-reads and retries (forward only); a promote or a
rollback that loses raises PointerConflict and writes nothing, so neither undoes the other
silently. gs:// has no conditional writes here (pyarrow exposes no generation preconditions): the
last writer wins there, and a publish looks again after it (`_settle`). After the pointer, each
move records itself in the store's index (cluster/store/index.py), which is what readers poll.

Containment: every entry point that takes an adapter `name` or a `version` checks it before
building any path, whoever calls it: a name must pass `name_problem` (the name rule, one path
segment, not reserved) and a version must be a version id. The readers that answer "not found"
with None (`pointer`, `current`, `read_meta`) answer None for a name or version that breaks the
rule (no such adapter can be in the store); every other entry point (`version_uri`,
`version_ids`, `versions`, `set_current`, `publish`, `promote`, `rollback`, `prune`,
`local_version_dir`) raises `VersionError` naming what is wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from cluster.config.base import NAME_RE, RESERVED_NAMES, name_problem
from cluster.errors import LorafleetError
from cluster.store import index, storage
from cluster.store.layout import ADAPTER_CONFIG, ADAPTER_META, is_version_id

__all__ = ["RESERVED_NAMES", "name_problem"]  # the name rule, kept beside the schema

VERSIONS = "versions"
CURRENT = "current"
HISTORY_KEPT = 20
MOVE_TRIES = 60  # a publish's pointer move, retried after each lost compare-and-swap
# an incomplete version younger than this may be a publish still copying: pruning leaves it
INCOMPLETE_GRACE_S = 3600


class VersionError(LorafleetError):
    """An adapter or version that is not in the store, or a move the store cannot make."""


class NothingToRollBack(VersionError):
    """A rollback with no complete version behind the current one (`promote` moves forward)."""


class PointerConflict(VersionError):
    """A promote or rollback that lost a race: the pointer moved between its read and its
    write, so nothing was written (on S3, its conditional write was refused)."""


def _name_error(name) -> str | None:
    """Why `name` cannot address an adapter in the store, or None."""
    if not isinstance(name, str):
        return f"invalid adapter name {name!r}: expected a string, got {type(name).__name__}"
    if not NAME_RE.fullmatch(name):  # name_problem's pattern ends in `$`, which allows "x\n"
        return (
            f"invalid adapter name {name!r}: letters, digits, '.', '_', '-' only, starting with a "
            "letter or digit, no '..'"
        )
    return name_problem(name)


name_error = _name_error  # for callers that check a name before they fetch or build anything


def _version_error(version) -> str | None:
    if is_version_id(version):
        return None
    return f"invalid version {version!r}: expected an id like 20261202-003015-123-9f3a"


def _check(name, version=None, with_version: bool = False) -> None:
    """Raise VersionError when `name` (or `version`, with `with_version`) breaks the rule."""
    problem = _name_error(name) or (_version_error(version) if with_version else None)
    if problem:
        raise VersionError(problem)


def _ok(name, version=None, with_version: bool = False) -> bool:
    return _name_error(name) is None and (not with_version or is_version_id(version))


_last_ms = [0]
_id_lock = threading.Lock()


def new_version_id(now: float | None = None) -> str:
    """`YYYYmmdd-HHMMSS-mmm-xxxx`: ids sort in publish order. Two ids made by one process in
    the same millisecond would sort by their random suffix, so a later one takes the next
    millisecond instead (seen: a version published right after another sorted before it)."""
    if now is None:
        with _id_lock:
            ms = max(int(time.time() * 1000), _last_ms[0] + 1)
            _last_ms[0] = ms
    else:
        ms = int(now * 1000)
    stamp = datetime.fromtimestamp(ms // 1000, UTC)
    return f"{stamp:%Y%m%d-%H%M%S}-{ms % 1000:03d}-{secrets.token_hex(2)}"


def version_uri(root: str, name: str, version: str) -> str:
    _check(name, version, with_version=True)
    return storage.join(root, name, VERSIONS, version)


# --- reading --------------------------------------------------------------------------------


def pointer(root: str, name: str) -> dict | None:
    """The `current` pointer of adapter `name`, or None: {"version", "history" (the versions
    behind it, newest first: what `rollback` walks back), "rolled_back" (the versions rollbacks
    left since the last forward move, newest first), "at", "by"}."""
    return _read_pointer(root, name)[0] if _ok(name) else None


def _read_pointer(root: str, name: str) -> tuple[dict | None, str | None]:
    """(the pointer or None, the tag of what is stored there, None when nothing is): what a
    move compares against when it writes (`storage.write_if`)."""
    try:
        text, tag = storage.read_tagged(storage.join(root, name, CURRENT))
        data = json.loads(text) if text is not None else None
    except (FileNotFoundError, OSError, ValueError):
        return None, None
    if not (isinstance(data, dict) and is_version_id(data.get("version"))):
        return None, tag
    return _normalized(data), tag


def _ids(value) -> list[str]:
    return [v for v in value if is_version_id(v)] if isinstance(value, list) else []


def _normalized(data: dict) -> dict:
    """The pointer as this module writes it, from what is stored (older pointers included)."""
    version = data["version"]
    history = _ids(data.get("history"))
    if "rolled_back" in data:
        rolled_back = _ids(data["rolled_back"])
    else:
        # written before `rolled_back`: a rollback then pushed the version it left onto history
        left = str(data.get("by", "")).removeprefix("rollback from ")
        rolled_back = [left] if history and history[0] == left else []
        history = history[len(rolled_back) :]
    return {
        **data,
        "version": version,
        "history": [v for v in history if v != version],
        "rolled_back": [v for v in rolled_back if v != version],
    }


def current(root: str, name: str) -> str | None:
    p = pointer(root, name)
    return p["version"] if p else None


def read_meta(root: str, name: str, version: str) -> dict | None:
    """A complete version's lorafleet.json, or None (missing, or a publish not finished)."""
    if not _ok(name, version, with_version=True):
        return None
    try:
        return json.loads(
            storage.read_text(storage.join(version_uri(root, name, version), ADAPTER_META))
        )
    except (FileNotFoundError, OSError, ValueError):
        return None


def version_ids(root: str, name: str) -> list[str]:
    """Every version folder of `name`, complete or not, oldest first."""
    _check(name)
    return sorted(
        v for v in storage.listdir(storage.join(root, name, VERSIONS)) if is_version_id(v)
    )


def versions(root: str, name: str) -> list[dict]:
    """The complete versions of `name`, oldest first: each its lorafleet.json."""
    _check(name)
    out = []
    for v in version_ids(root, name):
        meta = read_meta(root, name, v)
        if meta is not None:
            out.append({**meta, "version": v})
    return out


def names(root: str) -> list[str]:
    """Adapters with a served version (a `current` pointer), sorted: every folder looked at
    (O(adapters); `cluster.store.index.listing` reads the index instead)."""
    return [
        n
        for n in storage.listdir(root)
        if name_problem(n) is None and storage.exists(storage.join(root, n, CURRENT))
    ]


def scan(root: str) -> dict[str, str]:
    """{name: current version} of every adapter, read from every pointer (O(adapters))."""
    return index.scan(root, lambda n: current(root, n))


def listing(root: str) -> dict[str, str]:
    """{name: current version} of every adapter, from the store's index when it has one (one
    read), else from every pointer (a root no lorafleet with an index has moved a pointer in)."""
    return index.listing(root, lambda n: current(root, n))


def rebuild_index(root: str) -> dict[str, str]:
    """Rewrite the store's index from every pointer (`lorafleet adapters reindex`)."""
    return index.rebuild(root, lambda n: current(root, n))


# --- writing --------------------------------------------------------------------------------


@contextlib.contextmanager
def _pointer_lock(root: str, name: str):
    """Serializes pointer moves on a local disk (an flock beside the pointer). An object store
    has no lock: there every move is a compare-and-swap instead (`_put`)."""
    if storage.is_remote(root):
        yield
        return
    import fcntl

    path = Path(root, name, ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _put(root: str, name: str, old: dict | None, tag, version, history, rolled_back, by):
    """Write the pointer if it is still what the mover read (`tag`): the new pointer, or None
    when another move got there first. `moves` counts every move the pointer has taken, so a
    move written over by another would show as a count too low. On s3:// a conditional PUT
    (If-Match / If-None-Match), on a local disk the flock the mover holds plus a re-check; gs://
    has no conditional writes here, so the last writer wins there (publishes settle, below)."""
    new = {
        "version": version,
        "history": [v for v in history if v != version][:HISTORY_KEPT],
        "rolled_back": [v for v in rolled_back if v != version][:HISTORY_KEPT],
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "by": by,
        "moves": int((old or {}).get("moves", 0) or 0) + 1,
    }
    uri, text = storage.join(root, name, CURRENT), json.dumps(new, indent=2)
    if not storage.supports_cas(root):
        storage.write_text(uri, text)
    elif not storage.write_if(uri, text, tag):
        return None
    # after the pointer: readers poll the index (cluster/store/index.py)
    index.record(root, name, lambda n: current(root, n))
    return new


def _conflict(root: str, name: str, what: str) -> PointerConflict:
    now = pointer(root, name) or {}
    return PointerConflict(
        f"adapter {name!r}: its pointer moved while {what} (now {now.get('version')}, by "
        f"{now.get('by')!r} at {now.get('at')}); nothing was changed: look again "
        f"(lorafleet adapters show {name}) and retry if it still should"
    )


def set_current(root: str, name: str, version: str, by: str, forward_only: bool = False) -> dict:
    """Move `name` forward to `version` (a complete one): the version it leaves goes on top of
    the history that `rollback` walks back. With `forward_only` (a publish), a pointer already
    at a later version stays, and a lost race is read again and retried; otherwise (a promote)
    a lost race raises PointerConflict. Returns the pointer as written (or as left)."""
    _check(name, version, with_version=True)
    if read_meta(root, name, version) is None:
        raise VersionError(f"adapter {name!r} has no complete version {version!r} in {root}")
    with _pointer_lock(root, name):
        for _ in range(MOVE_TRIES):
            old, tag = _read_pointer(root, name)
            if old and forward_only and old["version"] >= version:
                return old
            history = [old["version"], *old["history"]] if old else []
            new = _put(root, name, old, tag, version, history, [], by)
            if new is not None:
                return new
            if not forward_only:
                raise _conflict(root, name, f"{by} to {version} read it")
    raise _conflict(root, name, f"{by} to {version} tried {MOVE_TRIES} times")


def _settle(root: str, name: str, version: str) -> None:
    """gs:// has no conditional writes here: a publish that read the pointer before a later
    publish wrote it may write over it. Each publish looks again shortly after and puts the later
    version back, so racing publishes end with the later one current."""
    for delay in (0.1, 0.2, 0.4):
        time.sleep(delay)
        now = current(root, name)
        if now is not None and now >= version:
            return
        set_current(root, name, version, by="publish", forward_only=True)


def _write_version(local_dir: Path, uri: str, meta: dict) -> None:
    """Copy the adapter files, then lorafleet.json: its presence marks the version complete."""
    files = sorted(p for p in local_dir.iterdir() if p.is_file() and p.name != ADAPTER_META)
    if not storage.is_remote(uri):
        dest = Path(uri)
        tmp = dest.with_name(f".{dest.name}.incoming")
        tmp.mkdir(parents=True)
        for f in files:
            shutil.copy2(f, tmp / f.name)
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
        os.rename(tmp, dest)  # a version id is new: nothing is there to replace
        return
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(uri)
    fs.create_dir(path, recursive=True)
    for f in files:
        pafs.copy_files(str(f.resolve()), f"{path}/{f.name}", destination_filesystem=fs)
    storage.write_text(storage.join(uri, ADAPTER_META), json.dumps(meta, indent=2))


def publish(
    local_dir: str | Path,
    root: str,
    name: str,
    meta: dict,
    keep: int | None = None,
    make_current: bool = True,
) -> str:
    """Write the adapter in `local_dir` as a new version of `name`, then move `current` to it
    (forward only). `meta` goes into the version's lorafleet.json with its name, version and
    publish time. Prunes to `keep` complete versions when given. With `make_current=False` (a
    canary release will promote it) the pointer stays, unless the adapter has no version yet.
    Returns the version id."""
    _check(name)
    local_dir = Path(local_dir)
    if not (local_dir / ADAPTER_CONFIG).is_file():
        raise VersionError(f"{local_dir} holds no {ADAPTER_CONFIG}: not an adapter")
    version = new_version_id()
    meta = {
        **meta,
        "name": name,
        "version": version,
        "published_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }
    _write_version(local_dir, version_uri(root, name, version), meta)
    if make_current or current(root, name) is None:
        set_current(root, name, version, by="publish", forward_only=True)
        if not storage.supports_cas(root):
            _settle(root, name, version)
    if keep:
        prune(root, name, keep)
    return version


def promote(root: str, name: str, version: str) -> dict:
    _check(name)
    if read_meta(root, name, version) is None:
        have = [v["version"] for v in versions(root, name)]
        bad = f" ({_version_error(version)})" if not is_version_id(version) else ""
        raise VersionError(
            f"adapter {name!r} has no version {version!r}{bad}; it has {have or 'none'} "
            "(lorafleet adapters show NAME)"
        )
    return set_current(root, name, version, by="promote")


def rollback(root: str, name: str) -> dict:
    """Back one step: to the newest version in the pointer's history that still exists, taken
    off the history (versions pruned since are skipped and dropped). The version left goes into
    `rolled_back`; a rollback never moves forward to it. With nothing behind, it refuses
    (NothingToRollBack): `promote` is the way forward."""
    _check(name)
    with _pointer_lock(root, name):
        p, tag = _read_pointer(root, name)
        if p is None:
            raise VersionError(f"adapter {name!r} is not in {root}")
        behind = p["history"]
        for i, v in enumerate(behind):
            if read_meta(root, name, v) is not None:
                left = [p["version"], *p["rolled_back"]]
                by = f"rollback from {p['version']}"
                new = _put(root, name, p, tag, v, behind[i + 1 :], left, by)
                if new is None:
                    raise _conflict(root, name, f"rolling back from {p['version']}")
                return new
    undone = f" (rolled back from {', '.join(p['rolled_back'])})" if p["rolled_back"] else ""
    raise NothingToRollBack(
        f"adapter {name!r}: nothing to roll back to: no complete version was served before "
        f"{p['version']}{undone}; `lorafleet adapters promote {name} VERSION` moves it forward"
    )


def prune(root: str, name: str, keep: int, grace_s: float = INCOMPLETE_GRACE_S) -> list[str]:
    """Delete the oldest complete versions beyond `keep`, and incomplete ones older than
    `grace_s` (publishes that died); never the current version. Returns the ids deleted."""
    _check(name)
    cur = current(root, name)
    complete = [v["version"] for v in versions(root, name)]
    old = [v for v in complete[: max(len(complete) - keep, 0)] if v != cur]
    cutoff = time.time() - grace_s
    dead = [
        v
        for v in version_ids(root, name)
        if v not in complete and v != cur and _version_time(v) <= cutoff
    ]
    for v in old + dead:
        storage.delete_dir(version_uri(root, name, v))
    if not storage.is_remote(root):  # local publishes killed before their rename
        for tmp in Path(root, name, VERSIONS).glob(".*.incoming"):
            if tmp.stat().st_mtime <= cutoff:
                shutil.rmtree(tmp, ignore_errors=True)
                dead.append(tmp.name)
    return old + dead


def _version_time(version: str) -> float:
    return datetime.strptime(version[:15], "%Y%m%d-%H%M%S").replace(tzinfo=UTC).timestamp()


def local_version_dir(path: str) -> str:
    """A local adapter folder from what a user types: `<adapters>/<name>` (its current version),
    `<adapters>/<name>@<version>`, or a version's (or any PEFT adapter's) own folder."""
    folder, sep, version = str(path).rstrip("/").partition("@")
    root, name = os.path.split(folder)
    if sep:
        _check(name, version, with_version=True)
        if read_meta(root, name, version) is None:
            raise VersionError(f"{folder} has no complete version {version!r}")
        return version_uri(root, name, version)
    cur = current(root, name) if Path(folder, CURRENT).is_file() else None
    return version_uri(root, name, cur) if cur else folder
