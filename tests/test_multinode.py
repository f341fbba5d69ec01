"""A real 2-node Ray cluster on this machine: a head and a second raylet, each with its own CPUs,
ports and temp dir, on 127.0.0.1, stopped by PID at the end (never `ray stop`). A 2-worker
QLoRA job submitted the way users submit it puts one worker on each node (STRICT_SPREAD), reads
its data and its base from the S3 server, and writes checkpoints and the adapter there."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, current_adapter

from cluster.ray_connect import PREEMPTION_WATCHER_ENV
from cluster.store import storage
from tests.helpers.toolbox import ask_in_subprocess, free_port, stop_processes

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


# each node's window of worker ports: 200 ports between Ray's default window (10002-19999, the
# session's local Rays) and the OS's ephemeral range (32768 up, where free_port() and every
# other node port come from; a window there once took a port the same node had been given)
WORKER_PORT_WINDOWS = range(20000, 32768 - 200, 200)


def _node_ports(low: int) -> list[str]:
    """Every port one node opens, its own: free ports now, and a worker-port window of its own."""
    flags = [
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
    ]
    return [f"{f}={free_port()}" for f in flags] + [
        f"--min-worker-port={low}",
        f"--max-worker-port={low + 199}",
    ]


def _ray_start(args: list[str], env: dict, groups: list[int]) -> None:
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its daemons stay in this group: stopped by its id at the end
    )
    groups.append(proc.pid)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]


@pytest.fixture
def two_nodes(s3_bucket, tmp_path):
    """(dashboard URL, env for clients): a head and one more raylet, 2 CPUs each."""
    temp_dirs = [tempfile.mkdtemp(prefix=f"lfmn{i}-", dir="/tmp") for i in range(2)]
    gcs, dash = free_port(), free_port()
    env = os.environ | {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}",
        # a session that started a local Ray (cluster.ray_connect) set this to 0: Ray's
        # single-machine switch, which refuses a second node
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
        # this test's own per-node cache of remote files, shared by both raylets (one machine)
        "LORAFLEET_CACHE": str(tmp_path / "node-cache"),
    }
    env.pop("RAY_ADDRESS", None)
    # ... and this one to 0 (a local Ray has no node to drain): a cluster keeps Ray's default
    env.pop(PREEMPTION_WATCHER_ENV, None)
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]
    groups: list[int] = []
    windows = random.sample(WORKER_PORT_WINDOWS, 2)  # one for each node, never the same
    try:
        head = [
            "--head",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={temp_dirs[0]}",
        ]
        _ray_start(head + common + _node_ports(windows[0]), env, groups)
        second = [f"--address=127.0.0.1:{gcs}", f"--temp-dir={temp_dirs[1]}"]
        _ray_start(second + common + _node_ports(windows[1]), env, groups)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        # Ray's daemons may leave the group: also every process naming our temp dirs
        stop_processes(groups=groups, naming=temp_dirs, timeout_s=10)
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


STATE_QUERY = """
import json, sys
from ray.util.state import list_actors, list_nodes
addr = sys.argv[1]
nodes = [n.node_id for n in list_nodes(address=addr) if n.state == "ALIVE"]
workers = list_actors(address=addr, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
print(json.dumps({"nodes": nodes, "workers": [w.node_id for w in workers]}))
"""


def _submit_train(address: str, env: dict, overrides: list[str]) -> str:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--"]
    cmd += ["lorafleet", "train", "configs/demo.yaml", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-4000:]
    return out


def test_strict_spread_trains_on_two_nodes_from_and_to_s3(
    two_nodes, s3_bucket, tmp_path, task_data
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    address, env = two_nodes
    root = f"{s3_bucket}/mn-{uuid.uuid4().hex[:8]}"
    data_uri = storage.join(root, "data", "train.jsonl")
    storage.write_text(data_uri, Path(task_data["train"]).read_text())
    start = time.time()
    out = _submit_train(
        address,
        env,
        [
            "name=mn",
            "model.base=tiny://test",  # built by the driver, uploaded to <root>/models/test
            f"storage.root={root}",
            f"data.path={data_uri}",
            "data.max_length=64",
            "training.max_steps=10",
            "training.warmup_steps=1",
            "training.eval_every_steps=5",
            "training.log_every_steps=5",
            "training.eval_max_batches=2",
            "training.batch_size=4",
            "scaling.num_workers=2",
            "scaling.placement_strategy=STRICT_SPREAD",
            "ray.num_cpus=null",
        ],
    )
    print(f"2-node job: {time.time() - start:.1f}s")
    placed = ask_in_subprocess(STATE_QUERY, address, env=env, timeout_s=60)
    assert len(placed["nodes"]) == 2, placed
    assert sorted(placed["workers"]) == sorted(placed["nodes"]), placed  # one worker per node

    base_uri = storage.join(root, "models", "test")
    assert f"[model] {base_uri}" in out, out[-3000:]
    cache = Path(env["LORAFLEET_CACHE"])
    copies = [p.name for p in cache.glob("*/*") if p.parent.name != "fingerprints"]
    assert sorted(copies) == ["test", "train.jsonl"]
    run_dir = storage.join(root, "runs", "mn")
    (run,) = storage.listdir(run_dir)
    assert [c for c in storage.listdir(storage.join(run_dir, run)) if c.startswith("checkpoint_")]

    adapter = storage.download_dir(current_adapter(root, "mn"), tmp_path / "adapter")
    assert json.loads((adapter / "lorafleet.json").read_text())["base_model"] == base_uri
    base_dir = storage.download_dir(base_uri, tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ids = torch.tensor([tok("upper: cat dog")["input_ids"]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
        after = tuned(input_ids=ids).logits
    assert torch.isfinite(after).all()
    assert (after - before).abs().max() > 1e-4
