"""Real Ray Tune over real training on the tiny model: ASHA stops weak trials, outputs exist,
the best adapter is published and loads in PEFT, the best YAML validates and runs."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest
from conftest import job_config

from cluster.config import ConfigError, load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def search(ray_local, tmp_path_factory, tiny_base, task_data):
    from tune.tuner import tune_job

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


def test_best_trial_is_no_worse_than_the_median(search):
    _, out, _ = search
    finals = [r["best"] for r in out["rows"]]
    assert out["best"]["best"] <= statistics.median(finals)


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
