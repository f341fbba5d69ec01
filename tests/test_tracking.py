"""Tracking and training details on a real Ray Train run: TensorBoard events, metrics.jsonl
appended across a resume, peak memory, overfitting said once, fp16 with a GradScaler, epochs
turned into steps, and the data report in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import job_config

from cluster.cli import main as cli
from cluster.config.job import JobConfig
from cluster.config.load import dump_config
from cluster.errors import ConfigError

# 16 training rows memorized at lr 1e-2 (the in-process probe this was sized on: from step 35
# to 50 the training loss went 1.15 -> 1.06 -> 0.98 -> 0.95 while the eval loss went
# 2.709 -> 2.747 -> 2.764 -> 2.859)
TRAIN_ROWS = 16
EPOCHS = 25  # 16 rows pack into 8 sequences: 2 micro-batches of 4 per epoch -> 50 steps
STEPS = 50


def _rows(path, n: int) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()[:n]]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_fp16_epochs_run_tracks_tensorboard_memory_overfitting_and_resumes_without_repeats(
    ray_local, tmp_path, tiny_base, task_data, capsys
):
    train = _rows(task_data["train"], TRAIN_ROWS)
    data = _jsonl(tmp_path / "train.jsonl", train + train[:2])  # two exact duplicates
    held = _jsonl(tmp_path / "eval.jsonl", _rows(task_data["test"], 40) + train[5:6])
    cfg = job_config(
        tmp_path,
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
        },
    )
    path = tmp_path / "track.yaml"
    path.write_text(dump_config(cfg))
    assert cli.main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    [run_dir] = (Path(cfg.storage.root) / "runs" / "track").iterdir()

    # the data report: printed and in the run folder
    assert f"training.epochs={EPOCHS}: 8 sequences" in out and f"{STEPS} steps" in out
    assert "warning: 1 of 41 eval examples also appear in the training data" in out
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["duplicates"] == 2 and report["shared_with_eval"] == 1
    assert report["plan"]["max_steps"] == STEPS and report["lengths"]["max"] <= 64

    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if "loss" in h]
    assert [h["step"] for h in history] == list(range(0, STEPS + 1, 5))
    assert losses[-1] < losses[0] * 0.7, losses  # fp16 with its GradScaler trains
    assert all(h["peak_memory_mb"] > 50 for h in history[1:])  # a process's RSS, in MB
    flagged = [h for h in history if h.get("overfitting")]
    assert flagged, [(h["step"], h["loss"], h.get("eval_loss")) for h in history]
    assert "was overfitting from step" in out  # the final report says so

    # TensorBoard: the loss and memory curves, step for step
    tb = run_dir / "tensorboard"
    assert [s for s, _ in _scalars(tb, "loss")] == [h["step"] for h in history[1:]]
    assert [v for _, v in _scalars(tb, "loss")] == pytest.approx(losses, rel=1e-5)
    assert len(_scalars(tb, "peak_memory_mb")) == len(history) - 1

    # a killed run may have appended a line after its last checkpoint: the resume drops it
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": STEPS + 1, "loss": 99.0}) + "\n")
    more = ["training.epochs=null", f"training.max_steps={STEPS + 10}"]
    assert cli.main(["train", str(path), "--resume", *more]) == 0
    resumed = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in resumed] == list(range(0, STEPS + 11, 5))
    assert resumed[: len(history)] == history and 99.0 not in [h.get("loss") for h in resumed]
    assert [s for s, _ in _scalars(tb, "loss")] == [h["step"] for h in resumed[1:]]


def test_mlflow_or_wandb_configured_but_not_installed_is_a_config_error(tmp_path):
    from cluster.config.load import load_config

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
    """Nothing appends to an object: metrics.jsonl is rewritten there, and TensorBoard events are
    written locally and uploaded at checkpoints; a resume keeps the events from before it."""
    from cluster.config.load import load_config
    from cluster.store import storage
    from train.tracking import Tracker

    cfg = load_config(None, {"data": {"path": "d.jsonl"}})
    run_dir = f"{s3_bucket}/track-{tmp_path.name}/run"
    reports = [{"step": s, "loss": 3.0 - s / 10, "peak_memory_mb": 100.0} for s in (1, 2, 3)]
    first = Tracker(cfg, run_dir, True, 0, [])
    for r in reports:
        first.log(r)
    first.flush()  # the checkpoint at step 3; then the run is killed after one more report
    first.log({"step": 4, "loss": 9.0})
    resumed = Tracker(cfg, run_dir, True, 3, reports)
    resumed.log({"step": 4, "loss": 2.6})
    resumed.close()

    lines = storage.read_text(storage.join(run_dir, "metrics.jsonl")).splitlines()
    assert [json.loads(x)["loss"] for x in lines] == [2.9, 2.8, 2.7, 2.6]
    local = storage.download_dir(storage.join(run_dir, "tensorboard"), tmp_path / "tb")
    events = _scalars(local, "loss")
    assert [s for s, _ in events] == [1, 2, 3, 4]
    assert [v for _, v in events] == pytest.approx([2.9, 2.8, 2.7, 2.6])
