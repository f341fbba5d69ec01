"""The adapter store's index (cluster/store/index.py) and pointer moves as compare-and-swaps
(cluster/store/versions.py), on the S3 server on loopback (moto, the session's `s3_bucket`) and on
a local disk: a refresh with nothing changed costs the same few requests at any number of
adapters, counted in the S3 server's own request log; a publish, promote and rollback are seen
by the next refresh; a root an older lorafleet left (no index) still lists; and a promote racing
publishes undoes none of them, nor they it."""

from __future__ import annotations

import json
import threading
import time
import uuid
from asyncio import run
from pathlib import Path

import pytest

from cluster.store import index, storage, versions
from serve.store import AdapterStore
from tests.helpers.toolbox import S3RequestLog, fake_adapters

OLD = "20261201-000000-000-0000"  # the fake adapters' one version (older than any publish)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """`<storage.root>/adapters` on a local disk, and under a prefix of its own in the bucket."""
    if request.param == "local":
        return str(tmp_path / "store" / "adapters")
    return f"{request.getfixturevalue('s3_bucket')}/idx-{uuid.uuid4().hex[:8]}/adapters"


def _publish(root, tmp_path, n: int, name="live", **kw) -> str:
    src = tmp_path / f"src-{name}-{n}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "adapter_config.json").write_text(json.dumps({"r": 8, "publish": n}))
    (src / "adapter_model.safetensors").write_bytes(bytes([n % 256]) * 64)
    return versions.publish(src, root, name, {"publish": n}, **kw)


def _refresh(store: AdapterStore) -> dict[str, str]:
    return {n: s.version for n, s in run(store.current(refresh=True)).items()}


def test_a_refresh_costs_the_same_few_s3_requests_at_any_number_of_adapters(s3_bucket, tmp_path):
    """At 20 and at 400 adapters, counted in the S3 server's request log: a refresh with nothing
    changed is one request, one with a promote two (the index, the new version's metadata), and
    the same at both sizes; a root without its index costs a request per adapter (what the
    count would show if the reader went back to reading every pointer)."""
    costs = {}
    for n in (20, 400):
        token = f"scale{n}-{uuid.uuid4().hex[:8]}"
        root = f"{s3_bucket}/{token}/adapters"
        fake_adapters(root, [f"a{i:05d}" for i in range(n)], OLD)
        v1 = _publish(root, tmp_path, 1)
        _publish(root, tmp_path, 2)
        store = AdapterStore(root, ttl_s=3600)
        assert len(_refresh(store)) == n + 1
        with S3RequestLog(token) as log:
            same, same_lines = log.count(lambda: _refresh(store))  # noqa: B023
            versions.promote(root, "live", v1)
            changed, changed_lines = log.count(lambda: _refresh(store))  # noqa: B023
            assert _refresh(store)["live"] == v1
            storage.delete_file(index.index_uri(root))  # an older lorafleet's root
            unindexed, _ = log.count(lambda: _refresh(AdapterStore(root, ttl_s=3600)))  # noqa: B023
        costs[n] = (same, changed, unindexed)
        assert same <= 3 and changed <= 3, (n, same_lines, changed_lines)
        assert unindexed > n, (n, unindexed)
    assert costs[20][:2] == costs[400][:2], costs  # does not grow with the number of adapters
    assert costs[20][:2] == (1, 2), costs


def test_a_publish_promote_and_rollback_are_seen_by_the_next_refresh(root, tmp_path):
    store = AdapterStore(root, ttl_s=3600)
    assert _refresh(store) == {}
    v1 = _publish(root, tmp_path, 1)
    # a name missing from the listing asks the index again (no ttl wait): served at once
    time.sleep(0.25)
    assert run(store.get("live")).version == v1
    v2 = _publish(root, tmp_path, 2)
    assert _refresh(store) == {"live": v2}
    versions.promote(root, "live", v1)
    assert _refresh(store) == {"live": v1}
    versions.rollback(root, "live")
    assert _refresh(store) == {"live": v2}
    v3 = _publish(root, tmp_path, 3, make_current=False)  # a canary's version: not served yet
    assert _refresh(store) == {"live": v2}
    o1 = _publish(root, tmp_path, 1, name="other")
    assert _refresh(store) == {"live": v2, "other": o1}
    versions.set_current(root, "live", v3, by="release")  # a release's promotion
    assert _refresh(store) == {"live": v3, "other": o1}
    assert (
        versions.listing(root)
        == {"live": v3, "other": o1}
        == index.listing(root, lambda n: versions.current(root, n))
    )
    time.sleep(0.25)
    assert run(store.get("ghost")) is None  # an unknown name: the index says so


def test_a_root_without_an_index_still_lists_and_its_first_move_builds_one(root, tmp_path, capsys):
    """A root as an older lorafleet left it: readers list every pointer (and say so by not
    being indexed); the first pointer move writes the index from that listing, and from then on
    readers read the index. `lorafleet adapters list` lists it both ways."""
    from cluster.cli import main as cli

    names = [f"old{i}" for i in range(5)]
    fake_adapters(root, names, OLD, index=False)
    assert index.read(root)[0] == "missing"
    store = AdapterStore(root, ttl_s=3600)
    assert _refresh(store) == dict.fromkeys(names, OLD) and not store._indexed
    assert versions.listing(root) == dict.fromkeys(names, OLD)
    store_root = root.rsplit("/", 1)[0]
    assert cli.main(["adapters", "list", "--root", store_root]) == 0
    out = capsys.readouterr().out
    assert all(f"{n}  {OLD}  1" in out for n in names), out

    v1 = _publish(root, tmp_path, 1)  # the first move: the index is built
    state, found, _ = index.read(root)
    assert state == "new" and found == {**dict.fromkeys(names, OLD), "live": v1}
    assert _refresh(store) == found and store._indexed
    assert cli.main(["adapters", "list", "--root", store_root]) == 0
    assert f"live  {v1}  1" in capsys.readouterr().out

    # a pointer moved behind the index's back (an older lorafleet): reindex puts it right
    later = "20261201-000000-001-0000"
    fake_adapters(root, ["old0"], later, index=False)
    assert _refresh(store)["old0"] == OLD
    assert cli.main(["adapters", "reindex", "--root", store_root]) == 0
    assert "indexed 6 adapter(s)" in capsys.readouterr().out
    assert _refresh(store)["old0"] == later


def test_a_promote_that_loses_its_race_to_a_publish_reports_it_and_writes_nothing(
    s3_bucket, tmp_path, monkeypatch
):
    """On S3: the promote reads the pointer; a publish lands; the promote's write is refused
    (If-Match: the ETag it read is gone) and it says so; the publish stays current. Promoted
    again, it lands on top of the publish, which stays in the history. (On a local disk the
    flock makes that publish wait for the promote: the free-running race below covers it.)"""
    root = f"{s3_bucket}/cas-{uuid.uuid4().hex[:8]}/adapters"
    v1, v2 = _publish(root, tmp_path, 1), _publish(root, tmp_path, 2)
    real = versions._read_pointer
    raced = threading.local()
    published = []

    def read_then_publish(r, name):
        got = real(r, name)
        if getattr(raced, "armed", False):
            raced.armed = False
            published.append(_publish(root, tmp_path, 3))  # lands between the read and write
        return got

    monkeypatch.setattr(versions, "_read_pointer", read_then_publish)
    raced.armed = True
    with pytest.raises(
        versions.PointerConflict, match=r"moved while promote to .* \(now .*nothing was changed"
    ):
        versions.promote(root, "live", v1)
    (v3,) = published
    p = versions.pointer(root, "live")
    assert (p["version"], p["history"][:2]) == (v3, [v2, v1]), p
    assert versions.promote(root, "live", v1)["history"][:2] == [v3, v2]
    assert index.read(root)[1] == {"live": v1}


def test_a_promote_racing_publishes_undoes_none_of_them(root, tmp_path):
    """Publishes in one thread, promotes of the first version in another, free-running. Every
    move that reported success is in the pointer's move count (none written over), every
    publish is current or in the history (none silently undone), a promote that lost said so
    (PointerConflict), and the index names what the pointer does."""
    v0 = _publish(root, tmp_path, 0)
    moves_before = versions.pointer(root, "live")["moves"]
    done = threading.Event()
    published, promoted, conflicts, errors = [], [], [], []

    def publisher():
        try:
            for n in range(1, 7):
                published.append(_publish(root, tmp_path, n))
        except Exception as e:  # reported below
            errors.append(repr(e))
        finally:
            done.set()

    def promoter():
        while not done.is_set():
            try:
                promoted.append(versions.promote(root, "live", v0)["moves"])
            except versions.PointerConflict as e:
                conflicts.append(str(e))
            except Exception as e:  # reported below
                errors.append(repr(e))
                return

    threads = [threading.Thread(target=publisher), threading.Thread(target=promoter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == [] and len(published) == 6, errors
    p = versions.pointer(root, "live")
    assert p["moves"] - moves_before == len(published) + len(promoted), (p, promoted, conflicts)
    assert len(set(promoted)) == len(promoted)  # each promote its own move
    chain = [p["version"], *p["history"]]
    assert all(v in chain for v in published), (published, chain)
    assert index.read(root)[1] == {"live": p["version"]}
    print(f"{len(promoted)} promotes landed, {len(conflicts)} reported a conflict")


def test_v1_models_pages_like_openais_list_endpoints():
    from serve.auth import ApiError
    from serve.names import page

    cards = [{"id": f"m:{i:03d}"} for i in range(7)]
    first = page(cards, "3", None)
    assert [c["id"] for c in first["data"]] == ["m:000", "m:001", "m:002"]
    assert (first["first_id"], first["last_id"], first["has_more"]) == ("m:000", "m:002", True)
    ids, after = [], None
    while True:
        got = page(cards, "3", after)
        ids += [c["id"] for c in got["data"]]
        if not got["has_more"]:
            break
        after = got["last_id"]
    assert ids == [c["id"] for c in cards]
    assert page(cards, None, "m:005")["data"] == [{"id": "m:006"}]
    for bad in ("0", "-1", "x", "1001", "2.5"):
        with pytest.raises(ApiError, match="limit: expected an integer from 1 to 1000"):
            page(cards, bad, None)
    with pytest.raises(ApiError, match="after: 'nope' is not a model id"):
        page(cards, "2", "nope")


def test_conditional_writes_on_s3_and_on_disk(root, tmp_path):
    """`storage.write_if`: create-only when no tag, If-Match otherwise; a stale tag loses."""
    uri = storage.join(root, "cas.json")
    assert storage.read_tagged(uri) == (None, None)
    assert storage.write_if(uri, "one", None) is True
    assert storage.write_if(uri, "two", None) is False  # it exists now
    text, tag = storage.read_tagged(uri)
    assert text == "one" and storage.read_tagged(uri, tag) == (None, tag)  # 304 / same stat
    assert storage.write_if(uri, "three", tag) is True
    assert storage.write_if(uri, "four", tag) is False  # a stale tag
    assert storage.read_tagged(uri)[0] == "three"
    if not storage.is_remote(root):
        assert not Path(root, "cas.json.tmp").exists()
