"""The adapter store the server reads, on an S3-compatible server on loopback (moto, started by
the session's `s3_bucket` fixture): listing with each adapter's base, download into the node
cache, names checked; and a local store, read in place."""

from __future__ import annotations

import json
from asyncio import run
from pathlib import Path

import pytest

from cluster import storage
from serve.store import AdapterStore, base_key, local_copy


@pytest.fixture()
def s3_root(s3_bucket, request):
    return f"{s3_bucket}/{request.node.name}"


def _adapter(dir_, base, weights=bytes(range(256)) * 40, publish_id="p1"):
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (dir_ / "adapter_model.safetensors").write_bytes(weights)
    if base:  # as training publishes it
        meta = {"base_model": base, "publish_id": publish_id}
        (dir_ / "lorafleet.json").write_text(json.dumps(meta))


def test_s3_store_lists_adapters_with_their_base_and_copies_them_to_the_cache(
    s3_root, tmp_path, monkeypatch
):
    adapters = storage.join(s3_root, "adapters")
    _adapter(tmp_path / "src" / "support", "org/base-7b")
    _adapter(tmp_path / "src" / "plain", None)
    for name in ("support", "plain"):
        storage.upload_dir(tmp_path / "src" / name, storage.join(adapters, name))
    store = AdapterStore(adapters, s3_root, ttl_s=3600)
    assert run(store.adapters()) == {"support": base_key("org/base-7b", s3_root), "plain": None}
    # published after the first listing: seen on a refresh (the ingress refreshes on a miss)
    _adapter(tmp_path / "src" / "late", "org/base-7b")
    storage.upload_dir(tmp_path / "src" / "late", storage.join(adapters, "late"))
    assert "late" not in run(store.adapters())
    assert "late" in run(store.adapters(refresh=True))

    cache = tmp_path / "cache"
    path = local_copy(adapters, "support", cache_dir=str(cache))
    assert Path(path).is_relative_to(cache) and Path(path).parent.name == "support"
    for f in ("adapter_config.json", "adapter_model.safetensors", "lorafleet.json"):
        assert Path(path, f).read_bytes() == (tmp_path / "src" / "support" / f).read_bytes()
    downloads = []
    real_download = storage.download_dir
    monkeypatch.setattr(
        storage, "download_dir", lambda *a: downloads.append(a) or real_download(*a)
    )
    assert local_copy(adapters, "support", cache_dir=str(cache)) == path
    assert local_copy(adapters + "/", "support", cache_dir=str(cache)) == path
    assert downloads == []  # cached: not downloaded again

    # republished under the same name at once, same sizes, other weights: fetched again
    v2 = bytes(reversed(range(256))) * 40
    _adapter(tmp_path / "src" / "support", "org/base-7b", weights=v2, publish_id="p2")
    storage.upload_dir(tmp_path / "src" / "support", storage.join(adapters, "support"))
    path2 = local_copy(adapters, "support", cache_dir=str(cache))
    assert path2 != path and len(downloads) == 1
    assert Path(path2, "adapter_model.safetensors").read_bytes() == v2

    # a publish landing while a copy downloads: that copy is dropped and the new one fetched
    _adapter(tmp_path / "src" / "support", "org/base-7b", weights=v2, publish_id="p2b")
    storage.upload_dir(tmp_path / "src" / "support", storage.join(adapters, "support"))
    v3 = b"v3" * 5120

    def download_then_republish(*a):
        downloads.append(a)
        real_download(*a)
        if len(downloads) == 1:
            _adapter(tmp_path / "src" / "support", "org/base-7b", weights=v3, publish_id="p3")
            storage.upload_dir(tmp_path / "src" / "support", storage.join(adapters, "support"))

    downloads.clear()
    monkeypatch.setattr(storage, "download_dir", download_then_republish)
    path4 = local_copy(adapters, "support", cache_dir=str(cache))
    assert len(downloads) == 2
    assert Path(path4, "adapter_model.safetensors").read_bytes() == v3
    assert not list(Path(path4).parent.glob(".*incoming"))  # the dropped copy is gone
    # another store's adapter of the same name is another copy
    other = storage.join(s3_root, "other", "adapters")
    storage.upload_dir(tmp_path / "src" / "plain", storage.join(other, "support"))
    path3 = local_copy(other, "support", cache_dir=str(cache))
    assert path3 not in (path, path2)
    assert not Path(path3, "lorafleet.json").exists()

    with pytest.raises(FileNotFoundError, match="'nope' not found"):
        local_copy(adapters, "nope", cache_dir=str(cache))
    with pytest.raises(ValueError, match="invalid adapter name"):
        local_copy(adapters, "../support", cache_dir=str(cache))


def test_local_store_is_read_in_place(tmp_path):
    root = str(tmp_path / "runs")
    adapters = storage.join(root, "adapters")
    _adapter(tmp_path / "runs" / "adapters" / "support", "org/base-7b")
    store = AdapterStore(adapters, root, ttl_s=3600)
    assert run(store.adapters()) == {"support": base_key("org/base-7b", root)}
    assert local_copy(adapters, "support") == str(tmp_path / "runs" / "adapters" / "support")
    with pytest.raises(FileNotFoundError, match="'nope' not found"):
        local_copy(adapters, "nope")
    with pytest.raises(ValueError, match="invalid adapter name"):
        local_copy(adapters, "../runs")


def test_a_half_published_incoming_folder_is_neither_listed_nor_served(s3_root, tmp_path):
    """`<name>.incoming` is a publish still being written: the store lists and serves only whole
    adapters, on local and remote roots alike."""
    local = str(tmp_path / "runs" / "adapters")
    _adapter(Path(local) / "support", "org/base-7b")
    _adapter(Path(local) / "support.incoming", "org/base-7b", publish_id="p2")
    remote = storage.join(s3_root, "adapters")
    for name in ("support", "support.incoming"):
        storage.upload_dir(Path(local) / name, storage.join(remote, name))
    for root, storage_root in ((local, str(tmp_path / "runs")), (remote, s3_root)):
        assert list(run(AdapterStore(root, storage_root).adapters())) == ["support"]
        with pytest.raises(ValueError, match="invalid adapter name 'support.incoming'"):
            local_copy(root, "support.incoming", cache_dir=str(tmp_path / "cache"))


def test_a_tiny_base_resolves_where_training_builds_it(tmp_path, monkeypatch):
    """`tiny://NAME` is one directory for training and serving (cluster.layout.tiny_dir): under a
    local root, `<root>/models/NAME`; under a remote root, this machine's cache. A base never built
    is a one-line error naming the base and the command that builds it."""
    from cluster.errors import LorafleetError
    from cluster.layout import TINY_MARKER, tiny_dir
    from serve.store import resolve_base

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    local_root = str(tmp_path / "store")
    for root in (local_root, "s3://fleet/somewhere"):
        with pytest.raises(LorafleetError) as e:
            resolve_base("tiny://toy", root)
        msg = str(e.value)
        assert "\n" not in msg and "'tiny://toy' is not built" in msg, msg
        assert "`lorafleet demo`" in msg and "model.base: tiny://toy" in msg, msg
        built = tiny_dir("toy", root)
        built.mkdir(parents=True)
        (built / "config.json").write_text("{}")
        with pytest.raises(LorafleetError):  # no marker: a half-built base
            resolve_base("tiny://toy", root)
        (built / TINY_MARKER).write_text("{}")
        assert resolve_base("tiny://toy", root) == str(built)
    assert tiny_dir("toy", local_root) == tmp_path / "store" / "models" / "toy"
    assert tiny_dir("toy", "s3://fleet/somewhere").is_relative_to(tmp_path / "home")
    assert base_key("tiny://never", local_root) == "tiny://never"
