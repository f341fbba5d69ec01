"""The adapter store: immutable versions and the `current` pointer (cluster/store/versions.py), and the
server's reader of it (serve/store.py), on a local disk and on an S3-compatible server on
loopback (moto, started by the session's `s3_bucket` fixture). Publishes here are real, in
threads and in killed processes; nothing of the store is stubbed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from asyncio import run
from pathlib import Path

import pytest

from cluster.errors import LorafleetError
from cluster.store import storage, versions
from serve.store import AdapterStore, local_copy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """`<storage.root>/adapters` on a local disk, and in the loopback bucket."""
    if request.param == "local":
        return str(tmp_path / "store" / "adapters")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/{request.node.name}/adapters"


def _adapter(dir_: Path, n: int, size: int = 4096) -> Path:
    """An adapter folder whose weights encode `n` (every byte n % 256): a reader can tell which
    publish it got, and whether the files are all from one."""
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "adapter_config.json").write_text(json.dumps({"r": 8, "publish": n}))
    (dir_ / "adapter_model.safetensors").write_bytes(bytes([n % 256]) * size)
    return dir_


def _meta(n: int, fingerprint="sha256:0123456789abcdef") -> dict:
    return {"base_model": "org/base", "base_fingerprint": fingerprint, "publish": n}


def _publish(root, tmp_path, n: int, name="support", **kw) -> str:
    return versions.publish(_adapter(tmp_path / f"src{n}", n), root, name, _meta(n), **kw)


def test_a_publish_writes_a_whole_version_then_moves_current_and_rollback_undoes_it(root, tmp_path):
    v1 = _publish(root, tmp_path, 1)
    v2 = _publish(root, tmp_path, 2)
    assert v1 < v2 and versions.current(root, "support") == v2
    metas = versions.versions(root, "support")
    assert [m["version"] for m in metas] == [v1, v2]
    assert metas[1]["publish"] == 2 and metas[1]["name"] == "support"
    assert metas[1]["published_at"] and metas[1]["base_fingerprint"].startswith("sha256:")
    # the store serves the current version; a pinned one too; the node cache keys on the version
    store = AdapterStore(root, ttl_s=3600)
    assert run(store.get("support")).version == v2
    assert run(store.get("support", v1)).version == v1
    assert run(store.get("support", "20200101-000000-000-0000")) is None
    cache = tmp_path / "cache"
    p1, p2 = (local_copy(root, f"support@{v}", str(cache)) for v in (v1, v2))
    assert Path(p1, "adapter_model.safetensors").read_bytes()[:1] == b"\x01"
    assert Path(p2, "adapter_model.safetensors").read_bytes()[:1] == b"\x02"

    assert versions.rollback(root, "support")["version"] == v1
    assert run(store.get("support", None)).version == v2  # listed a moment ago: ttl
    assert run(AdapterStore(root).get("support")).version == v1
    assert versions.promote(root, "support", v2)["version"] == v2
    with pytest.raises(LorafleetError, match="no version '20200101-000000-000-0000'"):
        versions.promote(root, "support", "20200101-000000-000-0000")

    # retention: the oldest go, never the current one (here promoted back to the oldest)
    v3, v4 = _publish(root, tmp_path, 3), _publish(root, tmp_path, 4)
    versions.promote(root, "support", v1)
    assert sorted(versions.prune(root, "support", keep=2)) == [v2]
    assert [m["version"] for m in versions.versions(root, "support")] == [v1, v3, v4]
    _publish(root, tmp_path, 5, keep=2)  # a publish prunes by storage.keep_versions
    assert len(versions.versions(root, "support")) == 2


def test_readers_during_republishes_see_the_old_or_the_new_version_never_a_mix(root, tmp_path):
    _publish(root, tmp_path, 0)
    stop, seen, errors = threading.Event(), [], []

    def reader():
        store = AdapterStore(root, ttl_s=0)
        while not stop.is_set():
            try:
                served = run(store.get("support"))
                path = Path(local_copy(root, served.lora_id, str(tmp_path / "cache")))
                n = json.loads((path / "adapter_config.json").read_text())["publish"]
                weights = (path / "adapter_model.safetensors").read_bytes()
                meta = json.loads((path / "lorafleet.json").read_text())
                if weights != bytes([n % 256]) * 4096 or meta["publish"] != n:
                    errors.append(f"{served.lora_id}: a mix of publishes")
                seen.append(n)
            except Exception as e:  # a missing file, a half-written pointer: all failures
                errors.append(repr(e))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for n in range(1, 13):
        _publish(root, tmp_path, n)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(seen)) >= 3, sorted(set(seen))  # the readers did watch the publishes land


STALLED_PUBLISH = """
import sys, time, shutil
import pyarrow.fs as pafs
from pathlib import Path
from cluster.store import versions

def stall(*a, **k):  # the first file is copied, then the copy hangs until the process is killed
    real(*a, **k)
    print("copying", flush=True)
    time.sleep(600)

if sys.argv[1].startswith("s3://"):
    real = pafs.copy_files
    pafs.copy_files = stall
else:
    real = shutil.copy2
    shutil.copy2 = stall
versions.publish(Path(sys.argv[2]), sys.argv[1], "support", {"publish": 9})
"""


def test_a_publish_killed_mid_copy_leaves_the_previous_version_served(root, tmp_path):
    v1 = _publish(root, tmp_path, 1)
    v1_files = storage.files(versions.version_uri(root, "support", v1))
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLED_PUBLISH, root, str(_adapter(tmp_path / "src9", 9))],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout.readline().strip() == "copying"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert versions.current(root, "support") == v1
    assert [m["version"] for m in versions.versions(root, "support")] == [v1]
    assert run(AdapterStore(root).get("support")).version == v1
    # what the killed publish left is found, and pruned once past its grace period
    leftovers = set(versions.version_ids(root, "support")) - {v1}
    if storage.is_remote(root):
        assert len(leftovers) == 1  # files of an incomplete version: no lorafleet.json
    else:
        assert [p.name for p in Path(root, "support", "versions").glob(".*.incoming")]
    assert versions.prune(root, "support", keep=10, grace_s=0)
    assert versions.version_ids(root, "support") == [v1]
    # nothing of the killed publish is left, on either backend: every file (or object) under
    # versions/ is v1's, and the raw listing (hidden `.incoming` folders included) is v1 alone
    folder = storage.join(root, "support", "versions")
    assert storage.listdir(folder) == [v1]
    assert {f.split("/")[0] for f, _, _ in storage.files(folder)} == {v1}
    assert storage.files(storage.join(folder, v1)) == v1_files


def test_concurrent_publishes_of_one_name_all_land_and_current_names_the_latest(
    root, tmp_path, monkeypatch
):
    """Two publishes of one name, in threads, held by a barrier right before each moves the
    pointer and released together: their pointer moves overlap (each reads the pointer the other
    is about to replace). Both versions land and `current` names the later id, in every round,
    on a local disk (the lock) and on S3 (conditional writes: the loser re-reads and retries)."""
    real_set_current = versions.set_current
    barrier, first, released = threading.Barrier(2, timeout=60), threading.local(), []

    def set_current(*args, **kwargs):
        if not getattr(first, "done", False):  # a publish's own move, not its settle's
            first.done = True
            barrier.wait()
            released.append(time.monotonic())
        return real_set_current(*args, **kwargs)

    monkeypatch.setattr(versions, "set_current", set_current)
    published = []
    for n in range(6):
        ids, errors = [None, None], []

        def publish(i, n, ids, errors):
            first.done = False
            try:
                ids[i] = versions.publish(
                    _adapter(tmp_path / f"w{i}", n * 2 + i), root, "support", {"by": i}
                )
            except Exception as e:  # reported below: a thread's failure fails the test
                errors.append(repr(e))
                barrier.abort()

        released.clear()
        threads = [threading.Thread(target=publish, args=(i, n, ids, errors)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert errors == [] and None not in ids, errors
        assert abs(released[0] - released[1]) < 0.1, released  # the moves did overlap
        published += ids
        assert versions.current(root, "support") == max(ids), (n, ids)
    assert [m["version"] for m in versions.versions(root, "support")] == sorted(published)
    assert versions.current(root, "support") == max(published)


def test_lorafleet_names_are_not_adapter_names(tmp_path, capsys):
    """A job named like one of lorafleet's own folders is a config error naming the rule; the
    store neither publishes nor serves such a name, nor a path."""
    from cluster.cli import main as cli
    from cluster.config.base import RESERVED_NAMES

    cfg = tmp_path / "job.yaml"
    cfg.write_text("name: current\ndata: {path: x.jsonl}\n")
    assert cli.main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "name" in err and "'current' is reserved" in err, err
    root = str(tmp_path / "adapters")
    for bad in ("versions", "lorafleet-ui", "../x"):
        with pytest.raises(LorafleetError):
            versions.publish(_adapter(tmp_path / "src", 1), root, bad, {})
    assert "versions" in RESERVED_NAMES and versions.names(root) == []
    with pytest.raises(ValueError, match="invalid adapter id"):
        local_copy(root, "../x@20261202-003015-123-9f3a")


def test_a_base_is_known_by_what_it_is_not_where_it_lies(tmp_path, s3_bucket):
    """Fingerprints: any copy of a base (another folder, a bucket) is the same base; one changed
    weight makes another base; a hub id names itself with its revision."""
    import shutil

    from cluster.store.fingerprint import base_fingerprint

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"hidden_size": 64}')
    (base / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (base / "tokenizer.json").write_text("{}")
    fp = base_fingerprint(str(base))
    assert fp.startswith("sha256:")
    shutil.copytree(base, tmp_path / "moved")
    assert base_fingerprint(str(tmp_path / "moved")) == fp
    storage.upload_dir(base, f"{s3_bucket}/fp/base")
    assert base_fingerprint(f"{s3_bucket}/fp/base") == fp
    (tmp_path / "moved" / "model.safetensors").write_bytes(bytes(reversed(range(256))) * 64)
    assert base_fingerprint(str(tmp_path / "moved")) != fp
    assert base_fingerprint("org/model-7b") == "hub:org/model-7b@main"
    assert base_fingerprint("org/model-7b", "abc123") == "hub:org/model-7b@abc123"


def test_adapters_list_show_promote_rollback_from_the_command_line(tmp_path, capsys):
    from cluster.cli import main as cli

    store = tmp_path / "runs"
    root = str(store / "adapters")
    v1, v2 = _publish(root, tmp_path, 1), _publish(root, tmp_path, 2)
    _publish(root, tmp_path, 3, name="other")
    assert cli.main(["adapters", "list", "--root", str(store)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["NAME", "CURRENT", "VERSIONS"]
    assert f"support  {v2}  2" in out and "other" in out, out
    assert cli.main(["adapters", "promote", "support", v1, "--root", str(store)]) == 0
    assert f"current {v1} (was {v2})" in capsys.readouterr().out
    assert cli.main(["adapters", "show", "support", "--root", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"current {v1} (set by promote" in out, out
    assert any(x.split()[:2] == ["*", v1] for x in out.splitlines()), out
    assert cli.main(["adapters", "rollback", "support", "--root", str(store)]) == 0
    assert f"current {v2} (was {v1})" in capsys.readouterr().out
    assert cli.main(["adapters", "promote", "support", "nope", "--root", str(store)]) == 2
    assert "has no version 'nope'" in capsys.readouterr().err
    assert cli.main(["adapters", "show", "ghost", "--root", str(store)]) == 2
    assert "'ghost' is not in" in capsys.readouterr().err
    assert cli.main(["adapters", "promote", "support"]) == 2  # usage: a version is needed
    # what `lorafleet merge` takes: an adapter's folder (its current version) or name@version
    assert versions.local_version_dir(f"{root}/support") == versions.version_uri(
        root, "support", v2
    )
    assert versions.local_version_dir(f"{root}/support@{v1}") == versions.version_uri(
        root, "support", v1
    )
    with pytest.raises(LorafleetError, match="no complete version"):
        versions.local_version_dir(f"{root}/support@20200101-000000-000-0000")


def test_a_tiny_base_resolves_where_training_builds_it(tmp_path, monkeypatch):
    """`tiny://NAME` is one directory for training and serving (cluster.store.layout.tiny_dir)
    under a local root: `<root>/models/NAME`. Under a remote root training builds it in this
    machine's cache and uploads it to `<root>/models/NAME`, which is what serving reads (a
    bucket's case runs in tests/test_serve.py). A base never built is a one-line error naming
    the base, where it was looked for, and the command that builds it."""
    from cluster.store.layout import TINY_MARKER, tiny_dir
    from serve.store import resolve_base

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    local_root = str(tmp_path / "store")
    with pytest.raises(LorafleetError) as e:
        resolve_base("tiny://toy", local_root)
    msg = str(e.value)
    assert "\n" not in msg and "'tiny://toy' is not built" in msg, msg
    assert "`lorafleet demo`" in msg and "model.base: tiny://toy" in msg, msg
    built = tiny_dir("toy", local_root)
    built.mkdir(parents=True)
    (built / "config.json").write_text("{}")
    with pytest.raises(LorafleetError):  # no marker: a half-built base
        resolve_base("tiny://toy", local_root)
    (built / TINY_MARKER).write_text("{}")
    assert resolve_base("tiny://toy", local_root) == str(built)
    assert tiny_dir("toy", local_root) == tmp_path / "store" / "models" / "toy"
    assert tiny_dir("toy", "s3://fleet/somewhere").is_relative_to(tmp_path / "home")


def test_repeated_rollbacks_walk_back_never_forward_then_refuse(root, tmp_path):
    """v1 -> v2 -> v3 -> v4, then three rollbacks serve v3, v2, v1 (never a version a rollback
    left) and a fourth refuses, naming the way forward; `promote` is that way, and a rollback after
    it returns to the version served before it. A version pruned since is skipped."""
    v1, v2, v3, v4 = (_publish(root, tmp_path, n) for n in (1, 2, 3, 4))
    served = []
    for _ in range(3):
        p = versions.rollback(root, "support")
        served.append(p["version"])
        assert versions.current(root, "support") == p["version"]
        assert run(AdapterStore(root).get("support")).version == p["version"]
    assert served == [v3, v2, v1]
    p = versions.pointer(root, "support")
    assert p["history"] == [] and p["rolled_back"] == [v2, v3, v4], p
    assert p["by"] == f"rollback from {v2}"
    with pytest.raises(versions.NothingToRollBack, match=r"nothing to roll back to.*promote"):
        versions.rollback(root, "support")
    assert versions.current(root, "support") == v1  # a refused rollback moves nothing

    versions.promote(root, "support", v4)
    assert versions.pointer(root, "support")["history"] == [v1]
    assert versions.rollback(root, "support")["version"] == v1
    # v1 -> v4 (promote) -> v2 (promote), v4 pruned: a rollback skips it to v1, then refuses
    versions.promote(root, "support", v4)
    versions.promote(root, "support", v2)
    storage.delete_dir(versions.version_uri(root, "support", v4))
    p = versions.rollback(root, "support")
    assert (p["version"], p["history"]) == (v1, []), p
    with pytest.raises(versions.NothingToRollBack):
        versions.rollback(root, "support")


def test_a_pointer_an_older_rollback_wrote_does_not_roll_forward(tmp_path):
    """Pointers written before `rolled_back` existed: a rollback then put the version it left at
    the head of the history. Read today, that version is where it was rolled back from, not
    behind: the next rollback goes to the older version, and a publish's pointer stays readable."""
    root = str(tmp_path / "adapters")
    v1, v2, v3 = (_publish(root, tmp_path, n) for n in (1, 2, 3))
    pointer_file = Path(root, "support", "current")
    old = {"version": v2, "history": [v3, v1], "at": "2026-12-01T00:00:00+00:00"}
    pointer_file.write_text(json.dumps({**old, "by": f"rollback from {v3}"}))
    p = versions.pointer(root, "support")
    assert (p["version"], p["history"], p["rolled_back"]) == (v2, [v1], [v3]), p
    assert versions.rollback(root, "support")["version"] == v1
    pointer_file.write_text(
        json.dumps({**old, "version": v3, "history": [v2, v1], "by": "publish"})
    )
    assert versions.rollback(root, "support")["version"] == v2
    assert versions.rollback(root, "support")["version"] == v1


def test_rollback_from_the_command_line_says_when_there_is_nothing_behind(tmp_path, capsys):
    from cluster.cli import main as cli

    store = tmp_path / "runs"
    root = str(store / "adapters")
    v1, v2 = _publish(root, tmp_path, 1), _publish(root, tmp_path, 2)
    assert cli.main(["adapters", "rollback", "support", "--root", str(store)]) == 0
    assert f"current {v1} (was {v2})" in capsys.readouterr().out
    assert cli.main(["adapters", "rollback", "support", "--root", str(store)]) == 2
    err = capsys.readouterr().err
    assert "nothing to roll back to" in err and "lorafleet adapters promote support" in err, err
    assert versions.current(root, "support") == v1


# names and versions no caller may use to reach outside the store: each entry point refuses them
HOSTILE_NAMES = [
    *("..", ".", "../decoy", "../../decoy", "../../../store/decoy", "good/../../decoy"),
    *("/etc", "/etc/passwd", "/", "//", "/tmp/x", "a/b", "good/versions", "a\\b", "\\", "..\\x"),
    *("", " ", "  ", " x", "x ", "x\t", "x\r", "x\n", "..\n", "good\n", "\n"),
    *("current", "Current", "versions", "VERSIONS", "adapters", "latest", "runs", "models"),
    *("lorafleet", "lorafleet-ui", "LoraFleet.x", ".hidden", ".lock", "-rf", "_x", "a..b"),
    *("x\0", "\0", "good\0/../../decoy", "\u2024\u2024", "\u2025", "\uff0e\uff0e", "\uff0e"),
    *("%2e%2e", "%2e%2e%2fdecoy", "..%2f", "~", "~/x", "x@20261202-003015-123-9f3a", "x:y"),
    *("\u00f6", "x\u200b", "\uff58", "C:\\x", "a" * 129, "a" * 5000, "x/", "x/."),
    *(None, 1, b"..", ["x"], Path("decoy")),
]
HOSTILE_VERSIONS = [
    *("..", ".", "", "../../decoy", "/etc", "versions", "current"),
    *("20261202-003015-123-9f3a\n", "20261202-003015-123-9f3a/..", "../20261202-003015-123-9f3a"),
    *("\u0662\u0660\u0662\u0666\u0661\u0662\u0660\u0662-003015-123-9f3a", "x" * 5000, None, 7),
]


def _snapshot(box: str) -> list:
    """Every file under `box`, with its size, mtime and content hash (or the object listing)."""
    import hashlib

    if storage.is_remote(box):
        return storage.files(box)
    out = []
    for p in sorted(Path(box).rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out.append((str(p), st.st_size, st.st_mtime_ns, digest))
    return out


def test_the_store_refuses_hostile_names_and_versions_whoever_calls_it(root, tmp_path):
    """Hostile names and versions, fed to every entry point of cluster/store/versions.py directly (no
    HTTP): each raises VersionError, or answers None where None means "not found", and nothing
    outside the root is read or written. A decoy adapter beside the root (a sibling folder or
    prefix) is what an escaping name would find; one inside it is what a reserved name would."""
    box = root.rsplit("/", 1)[0]  # <box>/adapters is the root; <box>/decoy is outside it
    good = _publish(root, tmp_path, 1, name="good")
    decoy = versions.publish(_adapter(tmp_path / "d", 7), box, "decoy", {"decoy": True})
    for inside in ("current", "versions", "latest"):  # a reserved name that holds an adapter
        versions.publish(_adapter(tmp_path / "d", 7), root, "x", {})
        src, dst = storage.join(root, "x"), storage.join(root, inside)
        if storage.is_remote(root):
            storage.upload_dir(storage.local_copy(src), dst)
        else:
            Path(src).rename(dst)
        storage.delete_dir(src)
    abs_decoy = storage.join(box, "decoy") if not storage.is_remote(root) else "/fleet/decoy"
    assert versions.read_meta(box, "decoy", decoy)["decoy"] is True  # the decoy is reachable
    before = _snapshot(box)
    src = _adapter(tmp_path / "src-hostile", 2)
    refused = []

    def refuses(call, *args):
        try:
            result = call(*args)
        except versions.VersionError as e:
            refused.append(str(e))
            return True
        return pytest.fail(f"{call.__name__}{args[1:]!r} answered {result!r}")

    for name in [*HOSTILE_NAMES, abs_decoy, abs_decoy + "/"]:
        for version in (good, decoy):
            assert versions.pointer(root, name) is None, name
            assert versions.current(root, name) is None, name
            assert versions.read_meta(root, name, version) is None, name
            refuses(versions.version_uri, root, name, version)
            refuses(versions.set_current, root, name, version, "test")
            refuses(versions.promote, root, name, version)
        refuses(versions.version_ids, root, name)
        refuses(versions.versions, root, name)
        refuses(versions.rollback, root, name)
        refuses(versions.prune, root, name, 0)
        refuses(versions.publish, src, root, name, {})
    for version in HOSTILE_VERSIONS:
        assert versions.read_meta(root, "good", version) is None, version
        refuses(versions.version_uri, root, "good", version)
        refuses(versions.set_current, root, "good", version, "test")
        refuses(versions.promote, root, "good", version)
        if isinstance(version, str) and "/" not in version and not storage.is_remote(root):
            refuses(versions.local_version_dir, f"{root}/good@{version}")
    assert _snapshot(box) == before  # nothing written, inside the root or out
    assert all("invalid" in m or "reserved" in m for m in refused), set(refused) - {""}
    assert versions.current(root, "good") == good and versions.names(root) == ["good"]


# --- adapters lorafleet did not train (cluster/store/importing.py) -----------------------------


def _plain_peft(base: Path, out: Path, seed: int = 0) -> dict:
    """An adapter made with PEFT alone, outside lorafleet: LoRA on the base, two plain torch
    optimizer steps (B starts at zero), save_pretrained. Its tensors, by name."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return load_file(out / "adapter_model.safetensors")


def test_a_plain_peft_adapter_is_imported_listed_with_provenance_and_loads_back(
    tmp_path, tiny_base, capsys
):
    """`lorafleet adapters import`: a folder PEFT wrote is checked, published as a version that
    records where it came from, listed, and its weights are the same tensors; the server's store
    reader serves it as the current version, fitted to the tiny base by fingerprint."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    from cluster.cli import main as cli
    from cluster.store.fingerprint import base_fingerprint

    folder = tmp_path / "plain"
    tensors = _plain_peft(tiny_base, folder)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in tensors.items())
    (folder / "notes.txt").write_text("not an adapter file")  # left behind, not published
    store = tmp_path / "runs"
    argv = ["adapters", "import", "plain-bot", str(folder), "--root", str(store)]
    assert cli.main([*argv, "--base", str(tiny_base)]) == 0
    said = capsys.readouterr().out
    root = str(store / "adapters")
    version = versions.current(root, "plain-bot")
    assert f"imported {folder} as version {version}" in said, said
    meta = versions.read_meta(root, "plain-bot", version)
    assert meta["base_fingerprint"] == base_fingerprint(str(tiny_base))
    src = meta["source"]
    assert src["kind"] == "import" and src["from"] == str(folder) and src["by"] == "cli"
    assert src["peft_type"] == "LORA" and src["r"] == 4
    weights = Path(versions.version_uri(root, "plain-bot", version), "adapter_model.safetensors")
    assert (
        src["sha256"]["adapter_model.safetensors"]
        == hashlib.sha256(weights.read_bytes()).hexdigest()
    )
    assert sorted(p.name for p in weights.parent.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorafleet.json",
    ]
    back = load_file(weights)
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert cli.main(["adapters", "list", "--root", str(store)]) == 0
    row = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("plain-bot"))
    assert version in row and f"import {folder}" in row, row
    served = run(AdapterStore(root).get("plain-bot"))
    assert served.version == version and served.fingerprint == base_fingerprint(str(tiny_base))
    # --candidate: a second version, published without moving `current` (a release moves it)
    assert cli.main([*argv, "--candidate"]) == 0  # no --base: the base the adapter names
    assert versions.current(root, "plain-bot") == version
    assert len(versions.versions(root, "plain-bot")) == 2


def _other_base(tmp_path: Path) -> Path:
    """A Llama-shaped base of another width than the tiny one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    out = tmp_path / "other-base"
    LlamaForCausalLM(conf).save_pretrained(out)
    return out


def test_a_folder_that_cannot_be_served_is_refused_naming_what_is_wrong(
    tmp_path, tiny_base, capsys
):
    """Missing config, NaN weights, pickle-only weights, the wrong base, a DoRA adapter, a name
    that leaves the store, a hub id that cannot be fetched offline: each refused with its reason
    (exit 2), nothing published."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from cluster.cli import main as cli

    good = tmp_path / "good"
    tensors = _plain_peft(tiny_base, good)
    cases = {}

    def case(name: str) -> Path:
        cases[name] = tmp_path / name
        shutil.copytree(good, cases[name])
        return cases[name]

    (case("no-config") / "adapter_config.json").unlink()
    nan = {k: v.clone() for k, v in tensors.items()}
    key = sorted(nan)[0]
    nan[key][0, 0] = float("nan")
    save_file(nan, case("nan") / "adapter_model.safetensors")
    pickle = case("pickle")
    (pickle / "adapter_model.safetensors").unlink()
    torch.save(tensors, pickle / "adapter_model.bin")
    dora = case("dora")
    conf = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
    other = _other_base(tmp_path)
    store = tmp_path / "runs"
    expect = {
        "no-config": "no adapter_config.json: not a PEFT adapter folder",
        "nan": f"NaN or infinite values in 1 tensor(s): ['{key}']",
        "pickle": "only adapter_model.bin (a pickle), and lorafleet loads no pickle from storage",
        "dora": "vLLM cannot serve it: it is a DoRA adapter (use_dora: true)",
    }
    for name, says in expect.items():
        code = cli.main(["adapters", "import", "x", str(cases[name]), "--root", str(store)])
        err = capsys.readouterr().err
        assert code == 2 and says in err, (name, err)
    code = cli.main(
        ["adapters", "import", "x", str(good), "--root", str(store), "--base", str(other)]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"it was trained on base {str(tiny_base)!r}" in err, err
    assert "its matrices do not fit base" in err and "lora_A" in err, err
    for name, source, says in [
        ("../evil", str(good), "invalid adapter name '../evil'"),
        ("x", "org/not-here", "cannot fetch it from the hub"),  # HF_HUB_OFFLINE in the tests
        ("x", str(tmp_path / "nowhere"), "not a folder here, an s3:// or gs:// URI, or a hub id"),
    ]:
        code = cli.main(["adapters", "import", name, source, "--root", str(store)])
        err = capsys.readouterr().err
        assert code == 2 and says in err, (source, err)
    assert versions.names(str(store / "adapters")) == []


def test_an_adapter_in_a_bucket_is_imported_from_its_uri(tmp_path, tiny_base, s3_bucket, capsys):
    """`lorafleet adapters import NAME s3://...`: fetched through the node cache, checked, and
    published into a store in the bucket, recording the URI it came from."""
    from cluster.cli import main as cli

    folder = tmp_path / "plain"
    _plain_peft(tiny_base, folder)
    uri = f"{s3_bucket}/import-src/plain"
    storage.upload_dir(folder, uri)
    store = f"{s3_bucket}/import-store"
    argv = ["adapters", "import", "from-bucket", uri, "--root", store, "--base", str(tiny_base)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    root = f"{store}/adapters"
    meta = versions.read_meta(root, "from-bucket", versions.current(root, "from-bucket"))
    assert meta["source"]["from"] == uri and meta["source"]["kind"] == "import"
