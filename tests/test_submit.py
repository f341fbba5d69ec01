"""`lorafleet submit` against a head of the test's own (own ports, temp dir and token; stopped
by PID): no RAY_AUTH_MODE set by hand, secrets passed from the environment and not the YAML,
and Ctrl-C stops following the logs while the job runs on to the end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, current_adapter, our_lines
from test_job_submit import ray_head  # noqa: F401 (the fixture)

from tests.helpers.toolbox import ask_in_subprocess

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
    # a search (`submit tune`; `ray job submit ... lorafleet train` is test_job_submit's): two
    # trials at once, like the shipped tune config's, and the best one published
    cmd = [
        sys.executable, "-m", "cluster.cli", "submit", "tune", "configs/tune-demo.yaml",
        "name=submitted2", f"storage.root={store}", f"model.base={tiny_base}",
        f"data.path={task_data['train']}", "data.max_length=64", "training.max_steps=12",
        "training.warmup_steps=1", "training.eval_every_steps=6", "training.batch_size=4",
        "tune.num_samples=2", "tune.grace_period_steps=6", "ray.num_cpus=null",
        "--address", address, "--env", "MY_SETTING",
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
        if re.match(r"\[tune\] \d running", line):  # the job is searching: stop following now
            break
    assert job_id, "".join(out)[-3000:]
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    text = "".join(out) + rest
    assert proc.returncode == 130, text[-3000:]
    assert f"stopped following; job {job_id} keeps running" in text
    # Train's placement-group cleaner prints tracebacks of its own when other Rays run on the
    # machine (Ray's noise, not this command's): the command itself printed none
    ours = our_lines(text)
    assert not [x for x in ours if "Traceback" in x], text[-3000:]
    assert "HF_TOKEN" in text and "hf-test-secret" not in text  # named, never printed

    # asked from a process of its own: this one's Ray client keeps the token of the session's
    # own Ray, which this head refuses
    probe = (
        "import json, sys, time\n"
        "from ray.job_submission import JobSubmissionClient\n"
        "c = JobSubmissionClient(sys.argv[1])\n"
        "while str(c.get_job_status(sys.argv[2])).split('.')[-1] not in ('SUCCEEDED', 'FAILED'):\n"
        "    time.sleep(1)\n"
        "i = c.get_job_info(sys.argv[2])\n"
        "print(json.dumps({'status': str(i.status), 'env': i.runtime_env['env_vars'],"
        " 'logs': c.get_job_logs(sys.argv[2])[-5000:]}))\n"
    )
    info = ask_in_subprocess(probe, address, job_id, env=head_env, timeout_s=420)
    assert info["status"].endswith("SUCCEEDED"), info["logs"]
    assert info["env"]["HF_TOKEN"] == "hf-test-secret" and info["env"]["MY_SETTING"] == "on"
    assert "[tune] best trial" in info["logs"], info["logs"]
    assert re.search(
        r"\[tune\] 0 running, \d finished, \d stopped early, 0 errored of 2", info["logs"]
    )
    assert Path(current_adapter(store, "submitted2"), "adapter_model.safetensors").is_file()
    assert "hf-test-secret" not in (ROOT / "configs" / "demo.yaml").read_text()


def test_submit_refuses_an_env_name_that_is_not_set(tmp_path, capsys):
    """A name passed with --env that is not set here is refused before any Ray is asked, with
    the name in the message: exit 2 alone would also be any config error, or no Ray at the
    address (nothing listens on port 9 here)."""
    from cluster.cli.main import main

    env_name = "LORAFLEET_TEST_SURELY_UNSET"
    assert env_name not in os.environ
    argv = ["submit", "train", "configs/demo.yaml", "--address", "http://127.0.0.1:9"]
    rc = main([*argv, "--env", env_name, "--env", "HOME"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"--env {env_name}: not set in this environment" in err, err
    assert "HOME" not in err and "no Ray job server" not in err, err
    # the same command with the name set gets past that check, to the address (no Ray there)
    os.environ[env_name] = "1"
    try:
        assert main([*argv, "--env", env_name]) == 2
    finally:
        del os.environ[env_name]
    err = capsys.readouterr().err
    assert "no Ray job server at http://127.0.0.1:9" in err and env_name not in err, err
