"""`ray job submit --working-dir . -- lorafleet train ...` against a head of the test's own:
its own ports and temp dir, on loopback, stopped by PID at the end (never `ray stop`)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, current_adapter

from cluster.ray_connect import PREEMPTION_WATCHER_ENV
from tests.helpers.toolbox import free_port, stop_processes

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head():
    yield from _ray_head({})


def _ray_head(extra_env: dict):
    import shutil
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="lfray-", dir="/tmp")  # unix socket paths: < 108 bytes
    dash = free_port()
    env = os.environ | {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        # token auth, with a token of this test's own, for the head and every client
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        # Train's placement-group cleaner looks up "the" local Ray's State API; with other Rays
        # on the machine it must be told which dashboard is this head's
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}",
        "RAY_ADDRESS": "",
        **extra_env,
    }
    env.pop("RAY_ADDRESS")
    # the session's local Ray turned Train's preemption watcher off (cluster/ray_connect.py): a
    # cluster head keeps Ray's default
    env.pop(PREEMPTION_WATCHER_ENV, None)
    gcs_port = free_port()
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={gcs_port}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--temp-dir={temp_dir}",
        "--num-cpus=4",
        "--disable-usage-stats",
    ]
    try:
        for _ in range(2):
            started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            if started.returncode == 0:
                break
            # `ray start` gives its raylet a fixed 30 s to register; on a loaded 2-core machine it
            # once took longer ("The current node timed out during startup"): clean up, once more
            stop_processes(naming=[temp_dir], timeout_s=5)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        env["LORAFLEET_TEST_GCS"] = f"127.0.0.1:{gcs_port}"
        env["LORAFLEET_TEST_DASHBOARD"] = f"http://127.0.0.1:{dash}"
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_processes(naming=[temp_dir], timeout_s=5)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_trains_and_publishes(ray_head, tmp_path, tiny_base, task_data):
    address, env = ray_head
    store = tmp_path / "store"
    start = time.time()
    proc = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ".",
            "--",
            "lorafleet",
            "train",
            "configs/demo.yaml",
            "name=submitted",
            f"storage.root={store}",
            f"model.base={tiny_base}",
            f"data.path={task_data['train']}",
            "data.max_length=64",
            "training.max_steps=6",
            "training.warmup_steps=1",
            "training.eval_every_steps=3",
            "training.batch_size=4",
            "ray.num_cpus=null",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "succeeded" in out and "[done] submitted" in out
    assert Path(current_adapter(store, "submitted"), "adapter_model.safetensors").is_file()
    print(f"job submit round trip: {time.time() - start:.1f}s")


@pytest.fixture
def haproxy_head():
    """A head started the way cluster.yaml starts nodes: Serve's HAProxy mode in its environment."""
    yield from _ray_head({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"})


def _submit_serve(cfg: Path, env: dict, until: str | None = None) -> tuple[int | None, str]:
    """`lorafleet submit serve CFG` from the checkout; follows the job's logs to its end, or
    until a line contains `until`, then Ctrl-C (the job runs on): (exit code, what it printed)."""
    import signal

    cmd = [sys.executable, "-m", "cluster.cli", "submit", "serve", str(cfg)]
    cmd += ["--address", env["LORAFLEET_TEST_DASHBOARD"]]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out, deadline = [], time.time() + 300
    try:
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            if until and until in line:
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=60)
        return proc.returncode, "".join(out) + rest
    finally:
        if proc.poll() is None:
            proc.kill()


def test_submit_serve_follows_the_clusters_haproxy_binding(haproxy_head, tmp_path, tiny_base):
    """`lorafleet submit serve` to a head started the way cluster.yaml starts nodes (Serve's
    HAProxy mode, which binds the replicas' ports on all interfaces). The YAML says
    `http.mode: throughput` (loopback, no keys: fine on its own), so the job's `lorafleet serve`
    reads the mode from the cluster's processes and refuses before anything is deployed. With
    $LORAFLEET_API_KEYS in the caller's environment (passed to the job, never in the YAML) the
    same file deploys on the cluster and answers only with a key. The model is scaled to zero
    (`min_replicas: 0`): the ingress answers /v1/models without a vLLM engine."""
    import requests

    _, env = haproxy_head
    port = free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        f"models: [{{id: m, base: {tiny_base}, dtype: float32, max_model_len: 128,"
        " autoscaling: {min_replicas: 0, initial_replicas: 0, max_replicas: 1}}]\n"
        f"http: {{host: 127.0.0.1, port: {port}, mode: throughput}}\n"
        f"storage: {{root: {tmp_path / 'store'}}}\n"
        f"ray: {{address: '{env['LORAFLEET_TEST_GCS']}'}}\n"
    )
    no_keys = {k: v for k, v in env.items() if not k.startswith("LORAFLEET_") or "_TEST_" in k}
    no_keys.pop("RAY_SERVE_ENABLE_HA_PROXY")  # the client's own environment says nothing
    no_keys.pop("RAY_SERVE_THROUGHPUT_OPTIMIZED")
    code, out = _submit_serve(cfg, no_keys)
    assert code == 1 and "failed" in out, out[-3000:]
    assert "runs Serve in HAProxy mode" in out and "http.mode says 'throughput'" in out, out[-3000:]
    assert "$LORAFLEET_API_KEYS" in out and "[serve] deploying" not in out, out[-3000:]

    key = secrets.token_hex(8)
    code, out = _submit_serve(cfg, no_keys | {"LORAFLEET_API_KEYS": key}, until="[serve] ready at")
    assert code == 130 and "[serve] ready at" in out, out[-3000:]
    assert key not in out  # named, never printed
    url = f"http://127.0.0.1:{port}/v1/models"
    assert requests.get(url, timeout=30).status_code == 401
    r = requests.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["m"], r.text
