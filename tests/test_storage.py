"""Data files and base models on a bucket (the S3 server the tests start on loopback): read through
one per-node cache, errors naming the remote file, a `tiny://` base shared through the root."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest
from conftest import job_config

from cluster.store import storage


@pytest.fixture
def prefix(s3_bucket, tmp_path, monkeypatch) -> str:
    """A fresh prefix in the session's bucket, and a fresh node cache for this test."""
    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path / "cache"))
    return f"{s3_bucket}/t-{uuid.uuid4().hex[:8]}"


def test_a_bad_row_in_an_s3_data_file_names_the_uri_and_the_row(prefix, tmp_path, tiny_base):
    """The driver checks every row before any worker starts; the message names the s3:// file
    (not the cache path it was read from) and the row."""
    from train.data import DataError
    from train.trainer import prepare_run

    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(5)]
    rows[2] = {"prompt": "no completion here"}
    local = tmp_path / "bad.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in rows))
    uri = storage.join(prefix, "data", "bad.jsonl")
    storage.write_text(uri, local.read_text())
    cfg = job_config(tmp_path, tiny_base, uri)
    with pytest.raises(DataError) as e:
        prepare_run(cfg, log=lambda *_: None)
    msg = str(e.value)
    assert msg.startswith(f"{uri}: row 3: missing field 'completion'"), msg
    assert str(tmp_path / "cache") not in msg
    missing = storage.join(prefix, "data", "nowhere.jsonl")
    with pytest.raises(DataError, match=f"^{missing}: data file not found$"):
        prepare_run(job_config(tmp_path, tiny_base, missing), log=lambda *_: None)


def test_an_s3_model_base_loads_in_4bit_from_the_node_cache(prefix, tmp_path, tiny_base):
    import torch

    from cluster.errors import ModelError
    from train.model import load_base, load_tokenizer

    uri = storage.join(prefix, "models", "test")
    storage.upload_dir(tiny_base, uri)
    cfg = job_config(tmp_path, uri, tmp_path / "unused.jsonl")
    tok = load_tokenizer(cfg)
    model = load_base(cfg)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ids = torch.tensor([tok("upper: cat")["input_ids"]])
    logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    cached = storage.local_copy(uri)
    assert cached.is_relative_to(tmp_path / "cache") and (cached / "config.json").is_file()
    missing = storage.join(prefix, "models", "nowhere")
    with pytest.raises(ModelError, match=f"^model.base: '{missing}' could not be read"):
        load_tokenizer(job_config(tmp_path, missing, tmp_path / "unused.jsonl"))


def test_a_remote_file_is_fetched_once_per_content_even_by_racing_readers(prefix, tmp_path):
    uri = storage.join(prefix, "data", "rows.jsonl")
    storage.write_text(uri, '{"text": "one"}\n')
    got: list[Path] = []
    readers = [
        threading.Thread(target=lambda: got.append(storage.local_copy(uri))) for _ in range(4)
    ]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    assert len(set(got)) == 1 and got[0].read_text() == '{"text": "one"}\n'
    assert not [p for p in got[0].parent.iterdir() if p.name.endswith(".incoming")]
    storage.write_text(uri, '{"text": "two, rewritten"}\n')
    said: list[str] = []
    again = storage.local_copy(uri, log=said.append)
    assert again != got[0] and again.read_text() == '{"text": "two, rewritten"}\n'
    # a fetch says when it starts (what, how much) and when it is done; a cached copy says nothing
    assert len(said) == 2 and said[0].startswith(f"[storage] fetching {uri} (1 file(s), ")
    assert said[1].startswith(f"[storage] fetched {uri} in ")
    storage.local_copy(uri, log=said.append)
    assert len(said) == 2
    with pytest.raises(FileNotFoundError, match="nowhere"):
        storage.local_copy(storage.join(prefix, "nowhere"))


def test_a_tiny_base_on_a_remote_root_is_built_once_and_named_by_its_uri(
    prefix, tmp_path, monkeypatch
):
    """The driver builds `tiny://test`, uploads it to `<root>/models/test` (marker last) and hands
    the workers that URI, never a path of its own; a second run reuses the upload; serving
    knows it by the same fingerprint."""
    from cluster.store.fingerprint import base_fingerprint
    from cluster.store.layout import TINY_MARKER, tiny_dir
    from serve.store import base_identity
    from train.model import resolve_base

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = job_config(tmp_path, "tiny://test", tmp_path / "unused.jsonl", **{"storage.root": prefix})
    resolved = resolve_base(cfg)
    uri = storage.join(prefix, "models", "test")
    assert resolved.model.base == uri
    listing = storage.files(uri)
    assert {TINY_MARKER, "config.json", "model.safetensors"} <= {f for f, _, _ in listing}
    assert resolve_base(cfg).model.base == uri and storage.files(uri) == listing  # not re-uploaded
    # serving knows the base by what it is: the bucket's copy and the driver's build are one base
    fingerprint = base_fingerprint(uri)
    assert base_identity("tiny://test", prefix) == fingerprint
    assert base_fingerprint(str(tiny_dir("test", prefix))) == fingerprint
