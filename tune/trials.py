"""What one Tune trial is: its config (the base config plus the values sampled for it) and the
run folder its Ray Train run writes, known alike to the trial itself (tune/tuner.py `_trial_fn`)
and to the driver's callbacks (tune/tracking.py)."""

from __future__ import annotations

from cluster.config.job import JobConfig
from cluster.config.validation import with_overrides
from cluster.store import storage

SEP = "__"  # dotted keys become Tune parameter names without dots
BASE = "_base"  # the param space's key for the base config (not a hyperparameter)
RUN_ID = "run"  # each trial is one Ray Train run, `<storage.root>/runs/<name>-<trial id>/run`


def param_name(key: str) -> str:
    return key.replace(".", SEP)


def dotted_key(param: str) -> str:
    return param.replace(SEP, ".")


def sampled(config: dict) -> dict:
    """A trial's sampled values by dotted key, from Tune's trial config."""
    return {dotted_key(k): v for k, v in config.items() if k != BASE}


def trial_name(base: JobConfig, trial_id: str) -> str:
    return f"{base.name}-{trial_id}"


def trial_config(base: JobConfig, params: dict, trial_name: str) -> JobConfig:
    """Base config + this trial's overrides; a trial reports (and checkpoints) at every eval."""
    over = {dotted_key(k): v for k, v in params.items()}
    over |= {
        "name": trial_name,
        "training.log_every_steps": base.training.eval_every_steps,
        "tune.space": {},
        # the search's driver logs each trial to MLflow / W&B (tune/tracking.py), not the trial
        "tracking": {"mlflow": None, "wandb": None},
    }
    return with_overrides(base, over)


def trial_run_dir(base: JobConfig, trial_id: str) -> str:
    """The trial's run folder (the `lorafleet.run_dir` of its MLflow run)."""
    from train.trainer import runs_root

    name = trial_name(base, trial_id)
    return storage.join(runs_root(base.model_copy(update={"name": name})), RUN_ID)
