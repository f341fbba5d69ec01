"""Real Ray Tune over real training on the tiny model: ASHA stops weak trials, outputs exist,
the best adapter is published and loads in PEFT, the best YAML validates and runs, and each trial
is one run on a real `mlflow server` (conftest's `mlflow_server`)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import current_adapter, job_config

from cluster.config.load import load_config
from cluster.errors import ConfigError

pytestmark = pytest.mark.slow

EXPERIMENT = "lorafleet-tune-test"


@pytest.fixture(scope="module")
def search(mlflow_server, ray_local, tmp_path_factory, tiny_base, task_data):
    from tune.tuner import tune_job

    # started before Ray (fixtures start in argument order), so it is up or nearly by now; its
    # log if it did not start, rather than a search that logged nothing
    mlflow_server.wait()
    tmp = tmp_path_factory.mktemp("tune")
    cfg = job_config(
        tmp,
        tiny_base,
        task_data["train"],
        name="search",
        **{
            "training.max_steps": 27,
            "training.eval_every_steps": 3,
            "training.keep_checkpoints": 1,
            "tune.num_samples": 1,
            "tune.max_concurrent_trials": 2,
            "tune.grace_period_steps": 3,
            "tune.reduction_factor": 3,
            "tune.search": "grid",
            # one good learning rate and five far too small ones: whichever order the trials
            # report in, ASHA has five weak trials to cut once the good one has reported
            "tune.space": {
                "training.learning_rate": {"grid": [3e-3, 1e-5, 2e-5, 4e-5, 8e-5, 1.6e-4]}
            },
            "tracking.mlflow": {"tracking_uri": mlflow_server.url, "experiment": EXPERIMENT},
        },
    )
    lines = []
    return cfg, tune_job(cfg, log=lines.append), lines


def test_asha_stops_at_least_half_of_six_trials_early(search):
    cfg, out, _ = search
    rows = out["rows"]
    assert len(rows) == 6 and not any(r["error"] for r in rows)
    stopped = [r for r in rows if r["stopped_early"]]
    assert len(stopped) >= 3, out["table"]
    assert all(r["steps"] < 27 for r in stopped)
    assert any(r["steps"] == 27 for r in rows)


def test_early_stopped_trials_stopped_at_an_asha_rung(search):
    """ASHA decides at its rungs: grace_period_steps, then x reduction_factor each rung below
    max_steps. A trial it stopped reported its last step at one of them, never between."""
    cfg, out, _ = search
    t = cfg.tune
    rungs, r = set(), t.grace_period_steps
    while r < cfg.training.max_steps:
        rungs.add(int(r))
        r *= t.reduction_factor
    assert rungs == {3, 9}
    stopped = [r for r in out["rows"] if r["stopped_early"]]
    assert stopped and all(r["steps"] in rungs for r in stopped), out["table"]
    assert any(r["steps"] == t.grace_period_steps for r in stopped), out["table"]


def test_each_trial_is_one_mlflow_run_with_its_sampled_values_and_reports(search):
    """One MLflow run per trial, logged by the search's driver: named and tagged by the trial,
    its config (the sampled learning rate included) as params, every report Tune got from it at
    its training step, FINISHED whether it ran to the end or ASHA stopped it; the best trial's
    run carries the version the search published (as the store has it)."""
    from mlflow.tracking import MlflowClient

    from cluster.store import layout, versions

    cfg, out, lines = search
    client = MlflowClient(tracking_uri=cfg.tracking.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = {
        r.data.tags["lorafleet.trial_id"]: r for r in client.search_runs([experiment.experiment_id])
    }
    rows = {r["trial"]: r for r in out["rows"]}
    assert len(runs) == len(rows) == 6 and runs.keys() == rows.keys()
    assert not [x for x in lines if "MLflow" in x]  # no warning: it was never turned off
    for trial, run in runs.items():
        row, run_dir = rows[trial], Path(cfg.storage.root, "runs", f"search-{trial}", "run")
        assert run.info.run_name == f"search/{trial}" and run.info.status == "FINISHED"
        assert run.data.tags["lorafleet.run_dir"] == str(run_dir)
        assert run.data.tags["lorafleet.search"] == "search"
        params = run.data.params
        lr = row["overrides"]["training.learning_rate"]
        assert float(params["training.learning_rate"]) == lr
        assert params["name"] == f"search-{trial}" and params["training.max_steps"] == "27"
        assert not [k for k in params if k.startswith(("tracking.", "_base", "training__"))]
        # Tune's history of the trial, point for point, with the trial's own metrics.jsonl values
        evals = client.get_metric_history(run.info.run_id, "eval_loss")
        evals = sorted((p.step, p.value) for p in evals)
        assert [s for s, _ in evals] == [s for s, _ in row["curve"]]
        assert [v for _, v in evals] == pytest.approx([v for _, v in row["curve"]])
        jsonl = (run_dir / "metrics.jsonl").read_text().splitlines()
        reports = {h["step"]: h for h in map(json.loads, jsonl)}
        loss = sorted((p.step, p.value) for p in client.get_metric_history(run.info.run_id, "loss"))
        assert [s for s, _ in loss] == [s for s, _ in row["curve"]]
        assert [v for _, v in loss] == pytest.approx([reports[s]["loss"] for s, _ in loss])
        if lr == 3e-3:  # the good learning rate ran to the end, and learned
            assert loss[-1][0] == 27 and loss[-1][1] < loss[0][1] * 0.9, loss
        # the trial's reports, none of Tune's own bookkeeping (time_this_iter_s, done, ...)
        assert set(run.data.metrics) <= {k for h in reports.values() for k in h} - {"step"}
        assert "metrics.jsonl" in {a.path for a in client.list_artifacts(run.info.run_id)}

    adapters = layout.adapters_root(cfg.storage.root)
    tagged = {t: r.data.tags.get("lorafleet.adapter_version") for t, r in runs.items()}
    assert tagged == {t: None for t in runs} | {
        out["best"]["trial"]: versions.current(adapters, "search")
    }


def _trial_evals(cfg) -> list[tuple[float, str, int]]:
    """(eval_loss, trial run dir, step) of every checkpointed eval every trial wrote to its own
    metrics.jsonl: read from the runs, not from Tune's results."""
    evals = []
    for metrics in Path(cfg.storage.root, "runs").glob(f"{cfg.name}-*/run/metrics.jsonl"):
        for line in metrics.read_text().splitlines():
            h = json.loads(line)
            if h["step"] > 0 and "eval_loss" in h:  # step 0 is the baseline, not a checkpoint
                evals.append((h["eval_loss"], str(metrics.parent), h["step"]))
    return evals


def test_the_published_adapter_is_the_best_trials_checkpoint(search):
    from safetensors.torch import load_file

    from cluster.store.layout import ADAPTER_META, ADAPTER_WEIGHTS
    from train.checkpoint import ADAPTER_DIR

    cfg, out, _ = search
    loss, run_dir, step = min(_trial_evals(cfg))
    meta = json.loads((Path(out["adapter"]) / ADAPTER_META).read_text())
    assert meta["step"] == step and meta["eval_loss"] == pytest.approx(loss)
    assert meta["config"]["training"]["learning_rate"] == 3e-3
    published = load_file(str(Path(out["adapter"]) / ADAPTER_WEIGHTS))
    best = load_file(str(Path(run_dir, f"checkpoint_{step:06d}", ADAPTER_DIR, ADAPTER_WEIGHTS)))
    assert published.keys() == best.keys()
    assert all(torch.equal(published[k], best[k]) for k in best)


def test_outputs_exist_and_the_best_yaml_validates_and_runs(search, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.trainer import train

    cfg, out, lines = search
    with open(out["csv"]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and {"training.learning_rate", "stopped_early"} <= set(table[0])
    png = Path(out["plot"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert any(line.startswith("[tune]") and "best eval_loss" in line for line in lines)
    assert "| trial |" in out["table"]

    best = load_config(out["best_yaml"])
    assert best.training.learning_rate == pytest.approx(
        out["best"]["overrides"]["training.learning_rate"]
    )
    assert best.training.learning_rate == 3e-3

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(best.model.base), out["adapter"]
    )
    assert any("lora_A" in n for n, _ in model.named_parameters())

    again = load_config(
        out["best_yaml"],
        [
            f"storage.root={tmp_path}",
            "training.max_steps=3",
            "training.eval_every_steps=3",
            "name=rerun",
        ],
    )
    assert Path(train(again, log=lambda *_: None)["adapter"], "adapter_model.safetensors").is_file()


def test_tune_resume_continues_the_search_instead_of_starting_over(search, tmp_path, capsys):
    """`lorafleet tune CONFIG --resume` on the search above (finished): it restores the same
    trials from storage, trains none of them again, and publishes the best one anew."""
    from cluster.cli.main import main
    from cluster.config.load import dump_config
    from cluster.store.layout import ADAPTER_META

    cfg, out, _ = search
    meta = Path(out["adapter"]) / ADAPTER_META
    before = json.loads(meta.read_text())
    runs = {p: p.stat().st_mtime_ns for p in Path(cfg.storage.root, "runs").rglob("metrics.jsonl")}
    assert len(runs) == 6
    path = tmp_path / "tune.yaml"
    path.write_text(dump_config(cfg))
    capsys.readouterr()
    assert main(["tune", str(path), "--resume"]) == 0
    said = capsys.readouterr().out
    assert f"[tune] resuming {Path(cfg.storage.root, 'tune', cfg.name, 'search')}" in said
    for row in out["rows"]:  # the results table lists the same six trials
        assert f"| {row['trial']} |" in said, said
    assert {p: p.stat().st_mtime_ns for p in runs} == runs  # no trial trained again
    after = json.loads(Path(current_adapter(cfg.storage.root, cfg.name), ADAPTER_META).read_text())
    assert after["version"] > before["version"]  # published anew: a later version, now current
    assert after["source"] == {**before["source"], "kind": "tune"}
    assert (after["step"], after["eval_loss"]) == (before["step"], before["eval_loss"])


def test_a_search_without_any_checkpoint_is_a_one_line_error(
    ray_local, tmp_path, tiny_base, task_data, capsys
):
    """Every trial fails before its first checkpoint (its data file is not there): the CLI says
    so in one line and exits 2, with the trials' error, instead of a traceback."""
    from cluster.cli.main import main
    from cluster.config.load import dump_config

    gone = tmp_path / "gone.jsonl"
    cfg = job_config(
        tmp_path,
        tiny_base,
        task_data["train"],
        name="nothing",
        **{
            "tune.num_samples": 1,
            "tune.scheduler": "fifo",
            "tune.search": "grid",
            "tune.space": {"data.path": {"grid": [str(gone)]}},
        },
    )
    path = tmp_path / "tune.yaml"
    path.write_text(dump_config(cfg))
    assert main(["tune", str(path)]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, errors
    assert errors[0].startswith(
        "error: no trial of nothing reported a checkpoint, so there is nothing to publish: "
        "1 of 1 trials errored; the first: "
    )
    assert f"{gone}: data file not found" in errors[0]


@pytest.mark.parametrize(
    "space, message",
    [
        (
            {"training.learnin_rate": {"loguniform": [1e-4, 1e-2]}},
            "Did you mean 'training.learning_rate'?",
        ),
        ({"adapter.r": {"choice": []}}, "tune.space.adapter.r: choice needs at least one value"),
        ({"adapter.dropout": {"uniform": [0.3, 0.1]}}, "low < high. Got low=0.3, high=0.1"),
        ({"adapter.r": {"normal": [1, 2]}}, "expected exactly one of ['loguniform'"),
        ({"adapter.r": {"choice": [8, 0]}}, "value 0 makes an invalid trial: adapter.r"),
    ],
)
def test_bad_space_is_a_config_error_naming_the_key(space, message, tmp_path, tiny_base, task_data):
    with pytest.raises(ConfigError) as e:
        job_config(tmp_path, tiny_base, task_data["train"], **{"tune.space": space})
    assert message in str(e.value)


def test_metric_and_mode_are_checked_against_what_training_reports(tmp_path, tiny_base, task_data):
    with pytest.raises(ConfigError, match=r"tune.metric: training reports .* Got 'accuracy'"):
        job_config(tmp_path, tiny_base, task_data["train"], **{"tune.metric": "accuracy"})
    with pytest.raises(ConfigError, match="tune.mode: eval_loss is better when smaller"):
        job_config(tmp_path, tiny_base, task_data["train"], **{"tune.mode": "max"})


def test_a_search_on_a_bucket_publishes_the_best_checkpoint_by_tune_metric(
    ray_local, s3_bucket, tmp_path, tiny_base, task_data
):
    """storage.root on the S3 server on loopback: trials checkpoint there, and the publish step
    reads the best trial's checkpoint back from the bucket. tune.metric is the training loss,
    not the eval loss that plain training keeps checkpoints by, and each trial keeps only one
    checkpoint: the one kept must be the one the search publishes. Optuna proposes the trials
    and HyperBand (2 brackets) may stop one: what is published is still the best trial's best."""
    from cluster.store import storage
    from tune.tuner import tune_job

    cfg = job_config(
        tmp_path,
        tiny_base,
        task_data["train"],
        name="bucket-search",
        **{
            "storage.root": f"{s3_bucket}/tune-test",
            "training.max_steps": 6,
            "training.eval_every_steps": 3,
            "training.keep_checkpoints": 1,
            "tune.metric": "loss",
            # the searcher and scheduler that the other searches here do not run
            "tune.scheduler": "hyperband",
            "tune.grace_period_steps": 3,
            "tune.reduction_factor": 2,
            "tune.brackets": 2,
            "tune.search": "optuna",
            "tune.num_samples": 2,
            "tune.space": {"training.learning_rate": {"choice": [3e-3, 1e-5]}},
        },
    )
    out = tune_job(cfg, log=lambda *_: None)
    assert (
        out["adapter"] == f"{s3_bucket}/tune-test/adapters/bucket-search/versions/{out['version']}"
    )
    assert out["adapter"] == current_adapter(f"{s3_bucket}/tune-test", "bucket-search")
    meta = json.loads(storage.read_text(storage.join(out["adapter"], "lorafleet.json")))
    best = out["best"]
    # the published checkpoint is the best trial's lowest-loss one, read back from the bucket
    curve = dict(best["curve"])
    assert meta["step"] == min(curve, key=curve.get)
    assert (
        meta["config"]["training"]["learning_rate"] == best["overrides"]["training.learning_rate"]
    )
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert storage.exists(storage.join(out["adapter"], f))
    assert storage.exists(out["best_yaml"]) and storage.exists(out["csv"])


def _trial_steps(runs: Path) -> dict[str, int]:
    """Each trial's last reported step, from its run's metrics file."""
    out = {}
    for f in runs.glob("*/run/metrics.jsonl"):
        steps = [json.loads(x)["step"] for x in f.read_text().splitlines() if x.strip()]
        out[f.parent.parent.name] = max(steps, default=0)
    return out


def test_a_search_interrupted_mid_way_continues_with_resume(
    ray_local, tmp_path, tiny_base, task_data
):
    """Ctrl-C during `lorafleet tune` once Tune has recorded its first trial as finished and the
    second is past a checkpoint, then `lorafleet tune --resume`: the finished trial is not
    trained again, the interrupted one continues from its checkpoint, and the search ends with
    every trial done. Both commands join the session's Ray, as jobs on a cluster do."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    from cluster.config.load import dump_config
    from cluster.ray_connect import state_api_address
    from tune.tuner import STATE_SAVE_S

    cfg = job_config(
        tmp_path,
        tiny_base,
        task_data["train"],
        name="cut",
        **{
            "training.max_steps": 16,
            "training.eval_every_steps": 4,
            "training.keep_checkpoints": 1,
            # median stopping needs 2 other trials' results before it stops one, so with 2
            # trials it stops none: its state is saved and restored with the search's
            "tune.scheduler": "median",
            "tune.grace_period_steps": 4,
            "tune.search": "random",
            "tune.num_samples": 1,
            "tune.max_concurrent_trials": 1,
            # two trials: one finished before the Ctrl-C, one interrupted past a checkpoint
            "tune.space": {"training.learning_rate": {"grid": [3e-3, 1e-3]}},
            "ray.address": ray_local.get_runtime_context().gcs_address,
        },
    )
    path = tmp_path / "tune.yaml"
    path.write_text(dump_config(cfg))
    runs = Path(cfg.storage.root, "runs")
    cmd = [sys.executable, "-m", "cluster.cli", "tune", str(path)]
    env = os.environ | {"RAY_API_SERVER_ADDRESS": state_api_address()}

    def launch(*extra: str, log: Path) -> subprocess.Popen:
        with log.open("w") as out:
            return subprocess.Popen([*cmd, *extra], cwd=ROOT, env=env, stdout=out, stderr=out)

    def finish(proc: subprocess.Popen, timeout: float) -> int:
        try:
            return proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()

    def ready() -> bool:
        """Tune saw one trial finish over STATE_SAVE_S ago (so its saved state says so), and the
        next trial is mid-way, with a checkpoint that Ray Train has registered."""
        nonlocal finished_at
        said = (tmp_path / "first.log").read_text()
        if finished_at is None and re.search(r"\[tune\] \d+ running, 1 finished", said):
            finished_at = time.time()
        running = {n: s for n, s in _trial_steps(runs).items() if s < 16}
        return (
            finished_at is not None
            and time.time() - finished_at > STATE_SAVE_S + 1
            and len(running) == 1
            # Ray Train has registered a checkpoint of the running trial (what a resume reads)
            and (runs / next(iter(running)) / "run" / "checkpoint_manager_snapshot.json").is_file()
        )

    finished_at = None
    first = launch(log=tmp_path / "first.log")
    try:
        deadline = time.time() + 300
        while not ready():
            assert first.poll() is None and time.time() < deadline, (
                f"search ended (rc {first.poll()}) before Ctrl-C:\n"
                + (tmp_path / "first.log").read_text()[-4000:]
            )
            time.sleep(0.2)
        at_interrupt = _trial_steps(runs)
        first.send_signal(signal.SIGINT)
    finally:
        finish(first, timeout=180)
    said = (tmp_path / "first.log").read_text()
    assert first.returncode == 130, said[-3000:]
    assert f"lorafleet tune {path} stopped; rerun it with --resume" in said, said[-3000:]
    finished = {
        n: (runs / n / "run" / "metrics.jsonl").stat().st_mtime_ns
        for n, s in at_interrupt.items()
        if s == 16
    }
    assert len(finished) == 1, at_interrupt

    second = launch("--resume", log=tmp_path / "resume.log")
    finish(second, timeout=400)
    text = (tmp_path / "resume.log").read_text()
    assert second.returncode == 0, text[-3000:]
    assert "[tune] resuming" in text, text[-3000:]
    final = _trial_steps(runs)
    assert len(final) == 2 and set(final.values()) == {16}, final
    # the finished trial was left alone; the interrupted one went on from a checkpoint
    assert {
        n: (runs / n / "run" / "metrics.jsonl").stat().st_mtime_ns for n in finished
    } == finished
    assert re.search(r"resumed from a checkpoint at step (4|8|12)", text), text[-3000:]


def test_the_progress_callback_pickles_after_ray_replaced_print(monkeypatch):
    """Tune pickles its callbacks when the search starts. Ray puts its own functions at
    `builtins.print` in places (tqdm_ray, Train's and Serve's log redirection), after which a
    callback holding the original `print` cannot be pickled (the search failed before its first
    trial, once in CI and once in a fresh-clone run). The default `log` must survive that."""
    import builtins
    import inspect
    from types import SimpleNamespace

    from ray import cloudpickle

    from tune.tuner import _progress_callback, tune_job

    monkeypatch.setattr(builtins, "print", lambda *a, **k: None)  # what Ray's patches do
    default_log = inspect.signature(tune_job).parameters["log"].default
    cfg = SimpleNamespace(tune=SimpleNamespace(metric="eval_loss", mode="min"))
    back = cloudpickle.loads(cloudpickle.dumps(_progress_callback(cfg, default_log)))
    assert back.said == ""
