"""`lorafleet doctor`: one line per check against the session's Ray, storage on the S3 server
on loopback, and a failing check that turns the exit code non-zero."""

from __future__ import annotations

import pytest

from cluster.config.load import load_config

pytestmark = pytest.mark.slow


def _doctor(ray, overrides):
    from cluster.doctor import run_doctor

    lines = []
    rc = run_doctor(load_config("configs/demo.yaml", overrides), ray, log=lines.append)
    return rc, lines


def _line(lines, name):
    (hit,) = [line for line in lines if line.split()[1:2] == name.split()[:1] and name in line]
    return hit


def test_doctor_passes_on_a_healthy_local_cluster_with_s3_storage(ray_local, s3_bucket, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    rc, lines = _doctor(ray_local, [f"storage.root={s3_bucket}/doctor", f"data.path={data}"])
    assert rc == 0, "\n".join(lines)
    assert all(line.split()[0] in ("PASS", "WARN") for line in lines[:-1])
    # every node wrote to and read back from the bucket; no GPU here, said plainly
    assert "storage" in " ".join(lines) and "written, read back and deleted" in " ".join(lines)
    assert any("no GPU" in line for line in lines)
    versions = next(line for line in lines if line.split()[1] == "versions")
    for pkg in ("ray 2.60.0", "torch", "transformers", "peft", "vllm", "lorafleet"):
        assert pkg in versions
    assert "127.0.0.1" in next(line for line in lines if line.split()[1] == "ports")


def test_doctor_fails_on_unwritable_storage_and_missing_data(ray_local, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc, lines = _doctor(
        ray_local, [f"storage.root={blocker}/runs", f"data.path={tmp_path}/missing.jsonl"]
    )
    assert rc == 1
    failed = [line for line in lines if line.startswith("FAIL")]
    assert any("storage" in line and str(blocker) in line for line in failed), lines
    assert any("data.path" in line and "no such file" in line for line in failed), lines
    assert lines[-1].endswith("2 failed")


def test_lorafleet_doctor_without_a_config_checks_the_cluster_and_storage(
    ray_local, tmp_path, capsys
):
    from cluster.cli.main import main

    assert main(["doctor", f"storage.root={tmp_path}/runs"]) == 0
    out = capsys.readouterr().out
    assert "written, read back and deleted" in out and out.rstrip().endswith("0 failed")
    assert "data.path" not in out  # no job config, no data to check
