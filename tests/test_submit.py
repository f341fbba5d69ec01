"""`lorafleet submit` against a head of the test's own (own ports, temp dir and token; stopped
by PID): no RAY_AUTH_MODE set by hand, secrets passed from the environment and not the YAML,
and Ctrl-C stops following the logs while the job runs on to the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from test_job_submit import ray_head  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow


def test_submit_passes_secrets_by_env_and_ctrl_c_stops_following_not_the_job(
    ray_head,  # noqa: F811
    tmp_path,
    tiny_base,
    task_data,
):
    address, head_env = ray_head
    env = {k: v for k, v in head_env.items() if k != "RAY_AUTH_MODE"}  # the user sets no mode
    env |= {"HF_TOKEN": "hf-test-secret", "MY_SETTING": "on"}
    store = tmp_path / "store"
    cmd = [
        sys.executable, "-m", "cluster.cli", "submit", "train", "configs/demo.yaml",
        "name=submitted2", f"storage.root={store}", f"model.base={tiny_base}",
        f"data.path={task_data['train']}", "data.max_length=64", "training.max_steps=40",
        "training.warmup_steps=1", "training.eval_every_steps=20", "training.batch_size=4",
        "ray.num_cpus=null", "--address", address, "--env", "MY_SETTING",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out, job_id = [], None
    deadline = time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        if line.startswith("[submit] job ") and job_id is None:
            job_id = line.split()[2]
        if "[train] step" in line:  # the job is training: stop following now
            break
    assert job_id, "".join(out)[-3000:]
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    text = "".join(out) + rest
    assert proc.returncode == 130, text[-3000:]
    assert f"stopped following; job {job_id} keeps running" in text
    # Train's placement-group cleaner prints tracebacks of its own when other Rays run on the
    # machine (Ray's noise, not this command's): the command itself printed none
    ours = [x for x in text.splitlines() if "PlacementGroupCleaner" not in x]
    assert not [x for x in ours if "Traceback" in x], text[-3000:]
    assert "HF_TOKEN" in text and "hf-test-secret" not in text  # named, never printed

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    os.environ.update({"RAY_AUTH_TOKEN": head_env["RAY_AUTH_TOKEN"], "RAY_AUTH_MODE": "token"})
    try:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(address)
        while str(client.get_job_status(job_id)).split(".")[-1] not in ("SUCCEEDED", "FAILED"):
            assert time.time() < deadline + 120, "job did not finish"
            time.sleep(1)
        info = client.get_job_info(job_id)
        assert str(info.status).endswith("SUCCEEDED"), client.get_job_logs(job_id)[-3000:]
        env_vars = info.runtime_env["env_vars"]
        assert env_vars["HF_TOKEN"] == "hf-test-secret" and env_vars["MY_SETTING"] == "on"
        assert "[done] submitted2" in client.get_job_logs(job_id)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert (store / "adapters" / "submitted2" / "adapter_model.safetensors").is_file()
    assert "hf-test-secret" not in (ROOT / "configs" / "demo.yaml").read_text()


def test_submit_refuses_an_env_name_that_is_not_set(tmp_path):
    from cluster.cli import main

    env_name = "LORAFLEET_TEST_SURELY_UNSET"
    assert env_name not in os.environ
    rc = main(
        [
            "submit",
            "train",
            "configs/demo.yaml",
            "--address",
            "http://127.0.0.1:9",
            "--env",
            env_name,
        ]
    )
    assert rc == 2
