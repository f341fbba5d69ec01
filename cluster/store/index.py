"""The adapter store's index: one small object naming every adapter's current version, so a
reader learns that nothing changed with one request instead of one per adapter.

    <storage.root>/adapters/_index.json   {"format": 1, "generation": 42, "at": "...",
                                           "adapters": {"<name>": "<current version>", ...}}

Every pointer move updates it (cluster/store/versions.py: a publish that makes its version
current, `promote`, `rollback`, a release's promotion), right after the pointer and as a
compare-and-swap (`storage.write_if`: S3 `If-Match` on the ETag the writer read, an flock and a
re-check on a local disk): a writer that loses the race reads the index again and retries. A
writer reads the index *before* it re-reads the pointer it records, so of two racing writers
the later pointer always wins: the one that wrote first changed the tag, and the other's write
then fails and re-reads both. `_index` is no adapter name (names start with a letter or digit),
so nothing that lists adapters takes it for one.

A reader (serve/store.py) keeps the tag of the index it last read and asks again with it: one
conditional GET that answers 304 when nothing changed, one stat on a local disk. When the index
changed, it gets the whole object (about 60 bytes an adapter: ~0.6 MB at 10,000) and re-reads
only the adapters whose version differs from what it holds. The pointers stay the truth (they
carry the history rollbacks walk); the index is what readers poll.

Existing roots: read both ways, and migrated on first write. A root with no index (written by
an older lorafleet) is listed the old way, every pointer read, until the first pointer move
builds the index from that same listing (a one-time O(adapters) cost on the writer, who is
writing anyway) and from then on readers pay O(changes). Readers never write: an ingress may
run with read-only credentials, and two writers building one index race safely only because
each builds it with a create-only write (`If-None-Match: *`). `rebuild` (`lorafleet adapters
reindex`) rewrites it from the pointers, for a root an older lorafleet moved pointers in after
the index existed, or a writer killed between its pointer and the index.

gs://: pyarrow's GCS filesystem has no generation preconditions, so the index there is written
blindly and checked again once after a pause (`_settle`), as pointers were before.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

from cluster.config.base import NAME_RE, name_problem
from cluster.errors import LorafleetError
from cluster.store import storage
from cluster.store.layout import is_version_id

INDEX = "_index.json"
FORMAT = 1
MAX_TRIES = 60
# every function that reads pointers takes `current_of(name) -> version | None` (versions.current
# on the same root): this module sits below cluster/store/versions.py, which imports it
CurrentOf = Callable[[str], "str | None"]


class IndexConflict(LorafleetError):
    """An index write that kept losing its compare-and-swap (the pointer itself did move)."""


def _is_name(name) -> bool:
    return isinstance(name, str) and bool(NAME_RE.fullmatch(name)) and name_problem(name) is None


def index_uri(root: str) -> str:
    return storage.join(root, INDEX)


def _parse(text: str | None) -> dict | None:
    """{name: version} from the stored text, or None when it is not an index of this format."""
    try:
        data = json.loads(text) if text else None
    except ValueError:
        return None
    if not (isinstance(data, dict) and data.get("format") == FORMAT):
        return None
    adapters = data.get("adapters")
    if not isinstance(adapters, dict):
        return None
    return {n: v for n, v in adapters.items() if _is_name(n) and is_version_id(v)}


def _text(adapters: dict[str, str], generation: int) -> str:
    return json.dumps(
        {
            "format": FORMAT,
            "generation": generation,
            "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "adapters": dict(sorted(adapters.items())),
        },
        separators=(",", ":"),
    )


def read(root: str, tag: str | None = None) -> tuple[str, dict | None, str | None]:
    """What a reader polls: ("same", None, tag) when the index is still at `tag`; ("new",
    {name: version}, its tag) when it changed; ("missing", None, None) when the root has no
    (readable) index, and the reader lists it the old way."""
    text, new_tag = storage.read_tagged(index_uri(root), if_changed_from=tag)
    if new_tag is None:
        return "missing", None, None
    if text is None:
        return "same", None, new_tag
    found = _parse(text)
    return ("missing", None, None) if found is None else ("new", found, new_tag)


def scan(root: str, current_of: CurrentOf) -> dict[str, str]:
    """{name: current version} the old way: list the root, read every pointer (O(adapters))."""
    out = {}
    for name in storage.listdir(root):
        version = current_of(name) if _is_name(name) else None
        if version:
            out[name] = version
    return out


def listing(root: str, current_of: CurrentOf) -> dict[str, str]:
    """{name: current version} for every adapter with a served version: from the index (one
    read), else from the pointers (a root no lorafleet with an index has written yet)."""
    state, found, _ = read(root)
    return dict(sorted((found if state == "new" else scan(root, current_of)).items()))


def _generation(text: str | None) -> int:
    try:
        return int(json.loads(text).get("generation", 0)) if text else 0
    except (ValueError, AttributeError, TypeError):
        return 0


def _swap(root: str, make: Callable[[str | None], str | None], failed: str) -> bool:
    """Replace the index with `make(the text read)` (None: leave it) as a compare-and-swap on the
    tag read with it, reading again after each lost race. Returns True when the root has no
    conditional writes (gs://) and it was written blindly. IndexConflict(`failed`) when it kept
    losing."""
    uri = index_uri(root)
    for attempt in range(MAX_TRIES):
        text, tag = storage.read_tagged(uri)  # the index first, then what `make` reads
        new = make(text)
        if new is None:
            return False
        if not storage.supports_cas(root):
            storage.write_text(uri, new)
            return True
        if storage.write_if(uri, new, tag):  # tag None: create it, only if still absent
            return False
        time.sleep(random.uniform(0, 0.005 * 2 ** min(attempt, 6)))  # lost: read again
    raise IndexConflict(failed)


def record(root: str, name: str, current_of: CurrentOf) -> None:
    """Put `name`'s current version (its pointer, read now) into the index: a compare-and-swap,
    retried with a fresh read of both until it lands. A root with no index gets one, built from
    every pointer (migration on first write)."""

    def make(text: str | None) -> str | None:
        parsed = _parse(text)
        # no index yet (or not one this lorafleet reads): build it from every pointer
        found = dict(parsed) if parsed is not None else scan(root, current_of)
        version = current_of(name)  # read after the index: see above
        if parsed is not None and parsed.get(name) == version:
            return None  # already says so (a racing writer recorded the same move)
        if version is None:
            found.pop(name, None)
        else:
            found[name] = version
        return _text(found, _generation(text) + 1)

    failed = (
        f"the index of {root} did not take {name!r}'s move after {MAX_TRIES} tries (the pointer "
        "did move); `lorafleet adapters reindex` rebuilds it"
    )
    if _swap(root, make, failed):
        _settle(root, name, current_of)


def _settle(root: str, name: str, current_of: CurrentOf) -> None:
    """gs:// (no conditional writes): look once more after a pause and put back an entry a
    racing blind write left out."""
    time.sleep(0.2)
    state, found, _ = read(root)
    version = current_of(name)
    if state != "new" or found.get(name) != version:
        found = dict(found or scan(root, current_of))
        if version:
            found[name] = version
        storage.write_text(index_uri(root), _text(found, int(time.time())))


def rebuild(root: str, current_of: CurrentOf) -> dict[str, str]:
    """Rewrite the index from every pointer (a compare-and-swap against what was there), and
    return it. What `lorafleet adapters reindex` runs."""
    found: dict[str, str] = {}

    def make(text: str | None) -> str:
        found.clear()
        found.update(scan(root, current_of))
        return _text(found, _generation(text) + 1)

    _swap(root, make, f"the index of {root} kept changing while it was rebuilt; try again")
    return found
