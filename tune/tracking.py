"""MLflow and W&B for a Tune search: the trials' own loops log to neither (tune/trials.py), the
search's driver does, through Tune callbacks.

MLflow: one run per trial, named `<search>/<trial id>` and tagged `lorafleet.trial_id`, with the
trial's whole config as params (its sampled values included: `training.learning_rate`, ...),
every report's numbers as metrics at their training step, and when the trial ends (finished,
stopped early by the scheduler, or failed) its `metrics.jsonl` as an artifact and its status. The
run is also tagged with the trial's run folder (`lorafleet.run_dir`, as a training run is), so
`--resume` continues a trial's run rather than starting a second one, and the published best
adapter's version lands on the best trial's run (train/tracking.py `tag_published`). A tracker
that fails costs one warning line and MLflow for the rest of the search, never the search.

W&B: Ray's `WandbLoggerCallback`, one run per trial.
"""

from __future__ import annotations

TRIAL_TAG = "lorafleet.trial_id"
SEARCH_TAG = "lorafleet.search"


def tune_callbacks(cfg, log) -> list:
    """The search's tracker callbacks for tracking.mlflow / tracking.wandb."""
    callbacks = []
    if cfg.tracking.mlflow is not None:
        callbacks.append(_mlflow_trials(cfg, log))
    if cfg.tracking.wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        w = cfg.tracking.wandb
        callbacks.append(WandbLoggerCallback(project=w.project, entity=w.entity))
    return callbacks


def _mlflow_trials(cfg, log):
    from ray.tune.logger import LoggerCallback  # here: `lorafleet validate` needs no Ray
    from ray.tune.result import AUTO_RESULT_KEYS, DONE, EXPERIMENT_TAG, SHOULD_CHECKPOINT, TRIAL_ID

    from train.tracking import MlflowRun, config_params, metric_values, one_line
    from tune.trials import sampled, trial_config, trial_name, trial_run_dir

    tune_keys = {*AUTO_RESULT_KEYS, DONE, EXPERIMENT_TAG, SHOULD_CHECKPOINT, TRIAL_ID}

    class MlflowTrials(LoggerCallback):
        """One MLflow run per trial (`MlflowRun`, as a training run), logged from the driver."""

        def __init__(self):
            self.runs: dict[str, MlflowRun] = {}
            self.off = False

        def _safely(self, what: str, fn, *args) -> None:
            if self.off:
                return
            try:
                fn(*args)
            except Exception as e:  # the server gone, a refusal: any of them, in one line
                self.off = True  # each call would wait out the client's retries again
                log(
                    f"[tune] warning: MLflow off for the rest of the search ({what}): {one_line(e)}"
                )

        def log_trial_start(self, trial):
            if trial.trial_id not in self.runs:
                self._safely(f"trial {trial.trial_id}", self._start, trial)

        def _start(self, trial):
            name = trial_name(cfg, trial.trial_id)
            params = config_params(trial_config(cfg, sampled(trial.config), name))
            self.runs[trial.trial_id] = MlflowRun(
                cfg.tracking.mlflow,
                trial_run_dir(cfg, trial.trial_id),
                f"{cfg.name}/{trial.trial_id}",
                params,
                tags={TRIAL_TAG: trial.trial_id, SEARCH_TAG: cfg.name},
            )

        def log_trial_result(self, iteration, trial, result):
            run, step = self.runs.get(trial.trial_id), result.get("step")
            if run is None or not isinstance(step, int | float):
                return
            values = {
                k: v
                for k, v in result.items()
                if k not in tune_keys and k != "step" and not isinstance(v, bool)
            }
            self._safely(f"trial {trial.trial_id}", run.log, metric_values(values), int(step))

        def log_trial_end(self, trial, failed=False):
            run = self.runs.pop(trial.trial_id, None)
            if run is not None:
                status = "FAILED" if failed else "FINISHED"
                self._safely(
                    f"trial {trial.trial_id}", run.close, trial_run_dir(cfg, trial.trial_id), status
                )

    return MlflowTrials()
