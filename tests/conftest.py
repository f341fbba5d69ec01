"""Shared fixtures: one local Ray per session, a tiny base model, generated task data.

Everything here is real: Ray, bitsandbytes 4-bit, PEFT, transformers. Models are tiny
(2 layers, width 64) so a real 2-worker run takes seconds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# nothing here can reach the Hugging Face hub: say so, so a hub id fails at once, not after retries
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# W&B never goes online from the tests, and a key in the environment must never reach a log or
# a file (tests/test_tracking.py looks for this one): set here, before any test starts Ray, whose
# workers inherit this environment, whichever test file is imported first
os.environ["WANDB_MODE"] = "offline"
WANDB_KEY = os.environ.setdefault("WANDB_API_KEY", "lorafleet-test-key-never-logged-0123456789")


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lorafleet")


def once_per_session(tmp_path_factory, name: str, build):
    """`build(folder)` once per test session, not once per pytest-xdist worker: the first worker
    to get here builds it, under a file lock, in the folder the workers share; the others wait
    for it and read its JSON result. (`make test` runs two workers, and both need the same tiny
    base and reference run: built twice, they cost the two cores minutes.)"""
    from filelock import FileLock

    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build(tmp_path_factory.mktemp(name))
    folder = tmp_path_factory.getbasetemp().parent / f"shared-{name}"
    with FileLock(f"{folder}.lock"):
        done = folder / "result.json"
        if done.exists():
            return json.loads(done.read_text())
        folder.mkdir(exist_ok=True)
        result = build(folder)
        done.write_text(json.dumps(result))
        return result


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """tiny://test (2 layers, width 64) with a short copy pretraining, built the way users get it."""
    from train.tiny import ensure_tiny_base

    def build(folder: Path) -> str:
        return str(ensure_tiny_base("test", folder / "models" / "test", pretrain_steps=200))

    return Path(once_per_session(tmp_path_factory, "tiny-base", build))


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="session")
def task_data(session_dir) -> dict:
    from train.demo import write_task_data

    return write_task_data("last", session_dir / "data" / "last", n_train=600, n_test=50)


@pytest.fixture(scope="session")
def s3_bucket():
    """An S3-compatible server on loopback (moto), started here for the session, with bucket
    `fleet`. Its endpoint and test credentials are in the environment before Ray starts, so Ray's
    workers (Serve replicas among them) reach it the way cluster nodes reach a real bucket."""
    from tests.helpers.toolbox import start_s3_server

    server, env = start_s3_server("fleet")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield "s3://fleet"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite store, on 127.0.0.1) for the session, shared by the files
    that track to MLflow, each under an experiment of its own. Yielded while it starts (~12 s of
    a loaded CPU; MLflow's client retries meanwhile): `.wait()` returns at once when it is up,
    and fails with the server's log when it is not."""
    from tests.helpers.toolbox import MlflowServer, stop_processes

    server = MlflowServer.start(tmp_path_factory.mktemp("mlflow"))
    yield server
    stop_processes(groups=[server.proc.pid], timeout_s=10)


@pytest.fixture(scope="session")
def ray_local(s3_bucket):
    """One local Ray for the whole session, stopped at the end (only the one we started). It
    starts after the session's S3 server, so its workers inherit that server's endpoint."""
    import ray

    from cluster.ray_connect import ensure_ray

    started = not ray.is_initialized()
    # Serve's mode is fixed when Ray starts: http.mode's default, or the one
    # LORAFLEET_TEST_SERVE_MODE names (to run the serve tests in another mode)
    mode = os.environ.get("LORAFLEET_TEST_SERVE_MODE") or None
    ensure_ray(
        type("R", (), {"address": None, "num_cpus": 4})(), log=lambda *_: None, serve_mode=mode
    )
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def two_worker_run(ray_local, tmp_path_factory, tiny_base, task_data):
    """A real 2-worker QLoRA run on the 'last' task, published as adapter `t-last`, with
    generation eval (exact match, F1) on 8 held-out rows at its eval steps: the training tests
    inspect it, the evaluation tests score it and the serve tests serve it. It runs the defaults
    that the other runs turn off for speed: gradient checkpointing, and accumulation (2 micro-batches
    of 2 per step, the same 4 sequences per step as the others' batch_size 4)."""
    from cluster.config.job import JobConfig
    from train.trainer import train

    def build(folder: Path) -> dict:
        cfg = job_config(
            folder,
            tiny_base,
            task_data["train"],
            name="t-last",
            **{
                "scaling.num_workers": 2,
                "training.batch_size": 2,
                "training.grad_accum_steps": 2,
                "training.gradient_checkpointing": True,
                "training.max_steps": 30,
                "training.eval_every_steps": 10,
                "training.generation_eval_rows": 8,
            },
        )
        summary = train(cfg, log=lambda *_: None)
        return {"cfg": cfg.model_dump(mode="json"), "summary": summary}

    # built once for both xdist workers: the adapter and checkpoints are read-only after (the
    # evaluation tests add their report folders beside the run)
    run = once_per_session(tmp_path_factory, "two-worker-run", build)
    return JobConfig.model_validate(run["cfg"]), run["summary"]


# Ray Train's own control actors log their internal retries with tracebacks (a placement-group
# cleaner that cannot find its State API, a controller's health poll that timed out on a loaded
# machine and was retried): Ray's noise, tagged with the actor's name, not an error of ours
RAY_CONTROL_ACTORS = ("(PlacementGroupCleaner pid=", "(TrainController pid=")


def our_lines(text: str) -> list[str]:
    """The lines of a command's output that are not Ray's control actors' own logs."""
    return [x for x in text.splitlines() if not any(tag in x for tag in RAY_CONTROL_ACTORS)]


def vllm_greedy(
    base, adapter: str, prompts: list[str], tmp_path: Path, env=None, engine=None
) -> dict:
    """Real vLLM's greedy answers for the base and with the adapter (`tests/helpers/vllm_lora.py`
    in its own process; `engine`: engine arguments over its defaults): {"base": [...],
    "lora": [...]}."""
    import json
    import subprocess

    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    helper = ROOT / "tests" / "helpers" / "vllm_lora.py"
    proc = subprocess.run(
        [sys.executable, str(helper), str(base), adapter, str(path), json.dumps(engine or {})],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
        env=os.environ | (env or {}),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith('{"base"')))


def current_adapter(storage_root, name: str) -> str:
    """The folder (or URI) of adapter `name`'s current version under `storage_root`."""
    from cluster.store import layout, versions

    root = layout.adapters_root(str(storage_root))
    version = versions.current(root, name)
    assert version, f"adapter {name!r} has no current version in {root}"
    return versions.version_uri(root, name, version)


def job_config(tmp_path: Path, base: Path, data: Path, **overrides):
    """A small, fast job on the tiny base; overrides are dotted keys."""
    raw = {
        "name": "t",
        "model": {"base": str(base)},
        "quantization": {"mode": "4bit", "compute_dtype": "float32"},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data), "format": "completion", "max_length": 64, "eval_ratio": 0.1},
        "training": {
            "max_steps": 20,
            "batch_size": 4,
            "learning_rate": 5e-3,
            "lr_scheduler": "constant",
            "warmup_steps": 0,
            "max_grad_norm": None,
            "log_every_steps": 5,
            "eval_every_steps": 10,
            "eval_max_batches": 4,
            "gradient_checkpointing": False,
        },
        "scaling": {"num_workers": 1},
        "storage": {"root": str(tmp_path / "store")},
    }
    from cluster.config.load import load_config
    from cluster.config.overrides import deep_merge, set_dotted

    nested: dict = {}
    for k, v in overrides.items():
        set_dotted(nested, k, v)
    return load_config(None, deep_merge(raw, nested))


# the files that take longest, longest first: `make test` runs files on 2 pytest-xdist workers
# (`--dist loadfile`), each worker taking the next file in this order when it is nearly done with
# its own, so the long ones start first and the short ones even out the end. pytest-xdist would
# reorder files by their number of tests instead (longest files with few tests, like the demo's,
# came last and one worker ran on alone): pyproject's addopts turn that off (--no-loadscope-reorder)
LONGEST_FIRST = [  # seconds per file in a full run on an idle 2-core machine, 4 December
    "test_serve.py",  # 750
    "test_tune.py",  # 445 (415 since its interrupted search runs two trials)
    "test_ui.py",  # 325
    "test_train.py",  # 255
    "test_faults.py",  # 250
    "test_methods.py",  # 175
    "test_multinode.py",  # 150
    "test_demo.py",  # 140
    "test_deepspeed.py",  # 135
    "test_job_submit.py",  # 120 (since it also deploys with lorafleet submit serve)
    "test_eval.py",  # 85
    "test_tracking.py",  # 70
    "test_golden.py",  # 60
    "test_submit.py",  # 55
    "test_cli.py",  # 50
    "test_multitask.py",  # 47
    "test_release.py",  # 21
    "test_store_index.py",  # 22
    "test_store.py",  # 16
    "test_release_sim.py",  # 10
]


def pytest_collection_modifyitems(config, items):
    """Long files first (a stable sort: order within a file is kept); `gpu` tests are skipped,
    with the reason, where CUDA is not available (CI, laptops)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; bench/gpu_check.sh runs it on a GPU node")
    for item in gpu_items:
        item.add_marker(skip)
