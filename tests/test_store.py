"""The adapter store the server reads, on an S3-compatible server on loopback (moto, started
here): listing with each adapter's base, download into the node cache, names checked."""

from __future__ import annotations

import json
import socket
from asyncio import run

import pytest

from cluster import storage
from serve.store import AdapterStore, base_key, local_copy


@pytest.fixture()
def s3_root(monkeypatch):
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="fleet")
    yield "s3://fleet/runs"
    server.stop()


def _adapter(dir_, base):
    dir_.mkdir(parents=True)
    (dir_ / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (dir_ / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40)
    if base:
        (dir_ / "lorafleet.json").write_text(json.dumps({"base_model": base}))


def test_s3_store_lists_adapters_with_their_base_and_copies_them_to_the_cache(s3_root, tmp_path):
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
    assert path == str(cache / "support")
    for f in ("adapter_config.json", "adapter_model.safetensors", "lorafleet.json"):
        assert (cache / "support" / f).read_bytes() == (
            tmp_path / "src" / "support" / f
        ).read_bytes()
    assert local_copy(adapters, "support", cache_dir=str(cache)) == path  # cached, not again
    with pytest.raises(FileNotFoundError, match="'nope' not found"):
        local_copy(adapters, "nope", cache_dir=str(cache))
    with pytest.raises(ValueError, match="invalid adapter name"):
        local_copy(adapters, "../support", cache_dir=str(cache))
