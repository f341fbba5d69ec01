"""Tracking and training details on a real Ray Train run: TensorBoard events, metrics.jsonl
appended across a resume, peak memory, overfitting said once, fp16 with a GradScaler, epochs
turned into steps, and the data report in the run folder; the same run logged to a real
`mlflow server` (SQLite store, on 127.0.0.1; conftest's `mlflow_server`) and to W&B in offline
mode, both read back. conftest.py sets WANDB_MODE=offline and a WANDB_API_KEY that must leak
nowhere."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import WANDB_KEY, job_config

from cluster.cli import main as cli
from cluster.config.job import JobConfig
from cluster.config.load import dump_config
from cluster.errors import ConfigError
from tests.helpers.toolbox import read_wandb_run

# 16 training rows memorized at lr 1e-2 (the in-process probe this was sized on: from step 35
# to 50 the training loss went 1.15 -> 1.06 -> 0.98 -> 0.95 while the eval loss went
# 2.709 -> 2.747 -> 2.764 -> 2.859)
TRAIN_ROWS = 16
EPOCHS = 25  # 16 rows pack into 8 sequences: 2 micro-batches of 4 per epoch -> 50 steps
STEPS = 50
MORE = 10  # steps the resume adds
EXPERIMENT = "lorafleet-test"


def _rows(path, n: int) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()[:n]]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _wandb_items(items) -> dict:
    """A W&B record's items by name (wandb-core writes a flat name as a nested_key of one)."""
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def _train(argv: list[str]) -> str:
    """`lorafleet train` in process; what it printed (a module fixture has no capsys)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return out.getvalue()


@dataclass
class Tracked:
    """One fp16 run by epochs, then resumed for MORE steps, with MLflow and W&B on: what each
    phase printed and left, for the tests below to read."""

    run_dir: Path
    base: Path
    out: str
    history: list[dict]  # metrics.jsonl after the first run
    tb_steps: list[int]  # TensorBoard's loss steps after the first run
    tb_losses: list[float]
    resumed_out: str
    resumed: list[dict]  # metrics.jsonl after the resume
    mlflow_url: str
    # the adapter versions each phase published, read from the store, and the MLflow run's
    # adapter tags after the first phase
    adapters: str  # the store's adapters root
    published: list[str]
    first_tags: dict[str, str]


@pytest.fixture(scope="module")
def tracked(mlflow_server, ray_local, tmp_path_factory, tiny_base, task_data) -> Tracked:
    from cluster.store import layout, versions

    tmp = tmp_path_factory.mktemp("track")
    train = _rows(task_data["train"], TRAIN_ROWS)
    data = _jsonl(tmp / "train.jsonl", train + train[:2])  # two exact duplicates
    held = _jsonl(tmp / "eval.jsonl", _rows(task_data["test"], 40) + train[5:6])
    cfg = job_config(
        tmp,
        tiny_base,
        data,
        name="track",
        **{
            "data.eval_path": str(held),
            "data.eval_ratio": 0.0,
            "training.max_steps": None,
            "training.epochs": EPOCHS,
            "training.precision": "fp16",
            "training.learning_rate": 1e-2,
            "training.log_every_steps": 5,
            "training.eval_every_steps": 5,
            "training.eval_max_batches": None,
            "training.overfit_patience": 2,
            "tracking.mlflow": {"tracking_uri": mlflow_server.url, "experiment": EXPERIMENT},
            "tracking.wandb": {"project": "lorafleet-test"},
        },
    )
    path = tmp / "track.yaml"
    path.write_text(dump_config(cfg))
    adapters = layout.adapters_root(cfg.storage.root)
    try:  # MLflow's client retries while the server starts: both start at once
        out = _train(["train", str(path)])
    finally:  # at once when it is up; its log, with the training's error, when it died
        mlflow_server.wait()
    [run_dir] = (Path(cfg.storage.root) / "runs" / "track").iterdir()
    first = versions.current(adapters, "track")
    history = _read_jsonl(run_dir / "metrics.jsonl")
    tb = _scalars(run_dir / "tensorboard", "loss")
    first_tags = _mlflow_run(mlflow_server.url).data.tags
    # a killed run may have appended a line after its last checkpoint: the resume drops it
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": STEPS + 1, "loss": 99.0}) + "\n")
    more = ["training.epochs=null", f"training.max_steps={STEPS + MORE}"]
    resumed_out = _train(["train", str(path), "--resume", *more])
    return Tracked(
        run_dir=run_dir,
        base=Path(tiny_base),
        out=out,
        history=history,
        tb_steps=[s for s, _ in tb],
        tb_losses=[v for _, v in tb],
        resumed_out=resumed_out,
        resumed=_read_jsonl(run_dir / "metrics.jsonl"),
        mlflow_url=mlflow_server.url,
        adapters=adapters,
        published=[first, versions.current(adapters, "track")],
        first_tags={k: v for k, v in first_tags.items() if k.startswith("lorafleet.adapter")},
    )


def _mlflow_run(url: str):
    """The one MLflow run under EXPERIMENT."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    return run


@pytest.mark.slow
def test_fp16_epochs_run_tracks_tensorboard_memory_overfitting_and_resumes_without_repeats(
    tracked,
):
    run_dir, out, history = tracked.run_dir, tracked.out, tracked.history

    # the data report: printed and in the run folder
    assert f"training.epochs={EPOCHS}: 8 sequences" in out and f"{STEPS} steps" in out
    assert "warning: 1 of 41 eval examples also appear in the training data" in out
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["duplicates"] == 2 and report["shared_with_eval"] == 1

    losses = [h["loss"] for h in history if "loss" in h]
    assert [h["step"] for h in history] == list(range(0, STEPS + 1, 5))
    assert losses[-1] < losses[0] * 0.7, losses  # fp16 with its GradScaler trains
    assert all(h["peak_memory_mb"] > 50 for h in history[1:])  # a process's RSS, in MB
    flagged = [h for h in history if h.get("overfitting")]
    assert flagged, [(h["step"], h["loss"], h.get("eval_loss")) for h in history]
    assert "was overfitting from step" in out  # the final report says so

    # TensorBoard: the loss curve, step for step
    assert tracked.tb_steps == [h["step"] for h in history[1:]]
    assert tracked.tb_losses == pytest.approx(losses, rel=1e-5)
    assert len(_scalars(run_dir / "tensorboard", "peak_memory_mb")) == len(tracked.resumed) - 1

    # the resume dropped the line a "killed" run appended after its checkpoint, repeated nothing
    resumed = tracked.resumed
    assert [h["step"] for h in resumed] == list(range(0, STEPS + MORE + 1, 5))
    assert resumed[: len(history)] == history and 99.0 not in [h.get("loss") for h in resumed]
    tb = run_dir / "tensorboard"
    assert [s for s, _ in _scalars(tb, "loss")] == [h["step"] for h in resumed[1:]]
    # the data report of the resumed run is the resumed config's
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["plan"]["max_steps"] == STEPS + MORE and report["lengths"]["max"] <= 64


@pytest.mark.slow
def test_mlflow_server_holds_one_run_with_params_loss_history_and_artifacts(tracked, tmp_path):
    """What a user opening the MLflow UI expects: the run under the configured experiment, its
    hyperparameters, a loss curve point for every report that fell, the run folder's files, the
    adapter version it published; the resume continued the same MLflow run rather than starting a
    second one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked.mlflow_url)
    run = _mlflow_run(tracked.mlflow_url)
    assert run.info.run_name == f"track/{tracked.run_dir.name}"
    assert run.info.status == "FINISHED"
    assert run.data.tags["lorafleet.run_dir"] == str(tracked.run_dir)

    params = run.data.params
    expected = {
        "model.base": str(tracked.base),
        "quantization.mode": "4bit",
        "adapter.method": "lora",
        "adapter.r": "8",
        "adapter.alpha": "16.0",
        "training.learning_rate": "0.01",
        "training.batch_size": "4",
        "training.precision": "fp16",
        "training.max_steps": str(STEPS),  # the epochs, turned into steps
        "data.max_length": "64",
    }
    assert {k: params.get(k) for k in expected} == expected
    assert not [k for k in params if k.startswith("tracking.")]  # where to log is no param
    # params cannot change in MLflow: what the resume changed is a tag
    assert run.data.tags["resumed.training.max_steps"] == str(STEPS + MORE)

    # every report's loss at its step, both runs' reports in one curve, and it fell
    resumed = tracked.resumed
    points = client.get_metric_history(run.info.run_id, "loss")
    steps = sorted(p.step for p in points)
    assert (
        steps == [h["step"] for h in resumed if "loss" in h] == list(range(5, STEPS + MORE + 1, 5))
    )
    by_step = {p.step: p.value for p in points}
    assert [by_step[s] for s in steps] == pytest.approx([h["loss"] for h in resumed[1:]])
    assert by_step[steps[-1]] < by_step[steps[0]] * 0.7
    evals = client.get_metric_history(run.info.run_id, "eval_loss")
    assert sorted(p.step for p in evals) == [h["step"] for h in resumed]
    assert {"learning_rate", "grad_norm", "peak_memory_mb"} <= set(run.data.metrics)

    # the run folder's metrics.jsonl (as it ended) and data report, as artifacts
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"metrics.jsonl", "data_report.json"}
    got = Path(client.download_artifacts(run.info.run_id, "metrics.jsonl", str(tmp_path)))
    assert got.read_text() == (tracked.run_dir / "metrics.jsonl").read_text()

    # the API key in the environment is nowhere in what MLflow holds
    assert WANDB_KEY not in json.dumps([params, run.data.tags])

    # the adapter each phase published, as the store has it, tagged on the run once published:
    # the first version after the first phase, the resume's new version after the resume
    from cluster.store import versions

    first, last = tracked.published
    assert first and last and first != last
    assert versions.version_ids(tracked.adapters, "track")[-2:] == [first, last]
    assert (
        versions.read_meta(tracked.adapters, "track", last)["source"]["run"] == tracked.run_dir.name
    )
    for version, tags in ((first, tracked.first_tags), (last, run.data.tags)):
        assert {k: tags.get(k) for k in ("lorafleet.adapter", "lorafleet.adapter_version")} == {
            "lorafleet.adapter": "track",
            "lorafleet.adapter_version": version,
        }
        assert tags["lorafleet.adapter_uri"] == versions.version_uri(
            tracked.adapters, "track", version
        )


@pytest.mark.slow
def test_wandb_offline_runs_land_in_the_run_folder_with_every_report_and_no_key(tracked):
    """WANDB_MODE=offline: no account, no network. Each session of the run (the first and the
    resume) leaves an offline run under <run dir>/wandb/ with the same run id, which `wandb sync`
    would upload as one run; their history records hold every report at its step."""
    from train.tracking import wandb_run_id

    run_id = wandb_run_id("track", tracked.run_dir.name)
    folders = sorted((tracked.run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders), folders

    history, config = [], {}
    for folder in folders:
        [log] = folder.glob(f"run-{run_id}.wandb")
        for record in read_wandb_run(log):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append(_wandb_items(record.history.item))
            elif kind == "run":
                assert record.run.run_id == run_id
                assert record.run.display_name == f"track/{tracked.run_dir.name}"
                config |= _wandb_items(record.run.config.update)
    resumed = tracked.resumed
    assert [h["_step"] for h in history] == [h["step"] for h in resumed]
    losses = [(h["_step"], h["loss"]) for h in history if "loss" in h]
    assert losses == [(h["step"], pytest.approx(h["loss"])) for h in resumed if "loss" in h]
    assert config["training.learning_rate"] == 0.01 and config["adapter.r"] == 8

    # what the docs tell a user to run once online: wandb sees both as runs to upload
    done = subprocess.run(
        [str(Path(sys.executable).with_name("wandb")), "sync", "--dry-run", *map(str, folders)],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"WANDB_API_KEY": ""},
    )
    assert done.returncode == 0 and "Would sync 2 run(s)" in done.stdout + done.stderr, done

    # the key from the environment is in no file of the run folder and in no printed line
    leaked = [
        p
        for p in tracked.run_dir.rglob("*")
        if p.is_file() and WANDB_KEY.encode() in p.read_bytes()
    ]
    assert not leaked and WANDB_KEY not in tracked.out + tracked.resumed_out


def test_an_mlflow_server_gone_by_the_publish_costs_one_warning_line(monkeypatch):
    """The adapter is published by the time its run is tagged: a tracker that fails there (no
    server on the port any more) is one warning line, not a failed job."""
    from cluster.config.load import load_config
    from tests.helpers.toolbox import free_port
    from train.tracking import tag_published

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # not minutes of retries
    uri = f"http://127.0.0.1:{free_port()}"
    raw = {
        "name": "gone",
        "data": {"path": "d.jsonl"},
        "tracking": {"mlflow": {"tracking_uri": uri}},
    }
    said: list[str] = []
    tag_published(load_config(None, raw), "/runs/gone/run-1", "/a/gone/versions/v-1", said.append)
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith("[track] warning: MLflow run not tagged with gone version v-1: ")


def test_mlflow_or_wandb_configured_but_not_installed_is_a_config_error(tmp_path, monkeypatch):
    from cluster.config.load import load_config

    # both are installed here (the dev extra): a None in sys.modules makes a package unfindable
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "wandb", None)

    raw = {"data": {"path": "d.jsonl"}, "tracking": {"mlflow": {"experiment": "x"}}}
    with pytest.raises(ConfigError) as e:
        load_config(None, raw)
    assert "tracking.mlflow: needs the 'mlflow' package" in str(e.value)
    assert "pip install mlflow" in str(e.value)
    with pytest.raises(ConfigError, match="pip install wandb"):
        load_config(None, {"data": {"path": "d.jsonl"}, "tracking": {"wandb": {"project": "p"}}})
    # a config read back from storage (merge, a Tune trial, eval) loads where mlflow is absent
    assert JobConfig.model_validate(raw).tracking.mlflow.experiment == "x"
    # not configured: no error, and the run still tracks to metrics.jsonl and TensorBoard
    assert load_config(None, {"data": {"path": "d.jsonl"}}).training.tensorboard is True


def test_a_password_in_the_mlflow_uri_is_refused_without_being_shown():
    from cluster.config.load import load_config

    uri = "https://me:hunter2@mlflow.example:5000"
    raw = {"data": {"path": "d.jsonl"}, "tracking": {"mlflow": {"tracking_uri": uri}}}
    with pytest.raises(ConfigError) as e:
        load_config(None, raw)
    assert "tracking.mlflow.tracking_uri: expected no password" in str(e.value)
    assert "MLFLOW_TRACKING_PASSWORD" in str(e.value) and "hunter2" not in str(e.value)
    ok = {"data": {"path": "d.jsonl"}, "tracking": {"mlflow": {"tracking_uri": "http://h:5000"}}}
    assert load_config(None, ok).tracking.mlflow.tracking_uri == "http://h:5000"


def test_max_steps_and_epochs_together_are_refused(tmp_path):
    from cluster.config.load import load_config

    raw = {"data": {"path": "d.jsonl"}, "training": {"max_steps": 5, "epochs": 2}}
    with pytest.raises(ConfigError, match="expected one of training.max_steps and training.epochs"):
        load_config(None, raw)


def test_fp16_under_deepspeed_is_refused_with_the_reason(tmp_path):
    from cluster.config.load import load_config

    raw = {
        "data": {"path": "d.jsonl"},
        "training": {"precision": "fp16"},
        "scaling": {"strategy": "deepspeed"},
    }
    with pytest.raises(ConfigError, match="fp16 needs a loss scaler"):
        load_config(None, raw)


def test_on_an_s3_root_metrics_and_tensorboard_land_in_the_bucket_and_a_resume_drops_the_tail(
    s3_bucket, tmp_path
):
    """Nothing appends to an object: metrics.jsonl is rewritten there, and TensorBoard events and
    W&B's offline run are written locally and uploaded at checkpoints; a resume keeps the events
    and the W&B run folder from before it."""
    from cluster.config.load import load_config
    from cluster.store import storage
    from train.tracking import Tracker

    raw = {"data": {"path": "d.jsonl"}, "tracking": {"wandb": {"project": "lorafleet-test"}}}
    cfg = load_config(None, raw)
    run_dir = f"{s3_bucket}/track-{tmp_path.name}/run"
    reports = [{"step": s, "loss": 3.0 - s / 10, "peak_memory_mb": 100.0} for s in (1, 2, 3)]
    first = Tracker(cfg, run_dir, True, 0, [])
    for r in reports:
        first.log(r)
    first.flush()  # the checkpoint at step 3; then the run is killed after one more report
    first.log({"step": 4, "loss": 9.0})
    wandb_uri = storage.join(run_dir, "wandb")
    killed = storage.listdir(wandb_uri)  # the killed session's W&B folder, as of its checkpoint
    resumed = Tracker(cfg, run_dir, True, 3, reports)
    resumed.log({"step": 4, "loss": 2.6})
    resumed.close()

    lines = storage.read_text(storage.join(run_dir, "metrics.jsonl")).splitlines()
    assert [json.loads(x)["loss"] for x in lines] == [2.9, 2.8, 2.7, 2.6]
    local = storage.download_dir(storage.join(run_dir, "tensorboard"), tmp_path / "tb")
    events = _scalars(local, "loss")
    assert [s for s, _ in events] == [1, 2, 3, 4]
    assert [v for _, v in events] == pytest.approx([2.9, 2.8, 2.7, 2.6])

    # W&B: the killed session's folder kept, the resumed session's beside it, finished
    assert len(killed) == 1 and killed[0].startswith("offline-run-"), killed
    folders = storage.listdir(wandb_uri)
    [new] = [f for f in folders if f not in killed]
    assert len(folders) == 2 and new.startswith("offline-run-"), folders
    local = storage.download_dir(storage.join(wandb_uri, new), tmp_path / "wandb")
    [log] = local.glob("run-*.wandb")
    history = [_wandb_items(r.history.item) for r in read_wandb_run(log) if r.HasField("history")]
    assert [(h["_step"], h["loss"]) for h in history] == [(4, 2.6)]
    assert [r for r in read_wandb_run(log) if r.HasField("exit")]  # finished, not cut off
