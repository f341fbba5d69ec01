"""Where a run's metrics go, on rank 0: `<run dir>/metrics.jsonl` (one line per report,
appended), TensorBoard events in `<run dir>/tensorboard/` (`training.tensorboard`, on by
default), and MLflow or W&B when `tracking.mlflow` / `tracking.wandb` is set. Also what the
metrics say about the run: peak memory, and whether it is overfitting.

    tensorboard --logdir lorafleet-runs/runs/<name>      # every run of <name>, offline

One lorafleet run is one MLflow run and one W&B run, a resume included: the MLflow run is found
again by its `lorafleet.run_dir` tag, the W&B run by an id made of the job's name and the run
folder's. MLflow gets the config as flat params, every report's numbers as metrics at their step,
and at the end `metrics.jsonl` and `data_report.json` as artifacts; once the driver has published
the adapter, the run is tagged with its name, version and URI (`tag_published`). W&B's local files
(its offline runs, for `wandb sync`) go to `<run dir>/wandb/`. A Tune search logs each trial's
MLflow run from its driver instead (tune/tracking.py), with the same `MlflowRun`.

On an s3:// or gs:// root, nothing can be appended to: metrics.jsonl is rewritten whole at every
report there (one small PUT), and TensorBoard and W&B write into local folders that are uploaded
to `<run dir>/tensorboard/` and `<run dir>/wandb/` at every checkpoint and at the end.
"""

from __future__ import annotations

import json
import math
import re
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster.store import storage

METRICS_FILE = "metrics.jsonl"
DATA_REPORT_FILE = "data_report.json"  # written by the driver (train/trainer.py) before the loop
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
RUN_DIR_TAG = "lorafleet.run_dir"  # the MLflow tag a resumed run is found by
# the MLflow tags a run gets once its adapter is published (tag_published)
ADAPTER_TAG, VERSION_TAG, ADAPTER_URI_TAG = (
    "lorafleet.adapter",
    "lorafleet.adapter_version",
    "lorafleet.adapter_uri",
)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA's peak allocated memory on a GPU; else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


# ---------------------------------------------------------------------------------------------
# Overfitting: eval loss up while training loss down, for `patience` evals in a row


@dataclass
class OverfitWatch:
    """Fed (step, training loss, eval loss) at each eval; says once when the last `patience`
    evals each saw the eval loss rise while the training loss fell."""

    patience: int | None
    points: list[tuple[int, float, float]] = field(default_factory=list)
    flagged_at: int | None = None

    @classmethod
    def from_history(cls, patience: int | None, history: list[dict]) -> OverfitWatch:
        """The watch as it stood at the end of `history` (a resumed run's restored reports)."""
        watch = cls(patience)
        for h in history:
            if "loss" in h and "eval_loss" in h:
                watch.points.append((h["step"], h["loss"], h["eval_loss"]))
            if h.get("overfitting") and watch.flagged_at is None:
                watch.flagged_at = h["step"]
        return watch

    def streak(self) -> int:
        """Evals in a row, up to the latest, whose eval loss rose while the training loss fell."""
        n = 0
        for (_, loss0, eval0), (_, loss1, eval1) in zip(
            self.points[-2::-1], self.points[::-1], strict=False
        ):
            if not (eval1 > eval0 and loss1 < loss0):
                break
            n += 1
        return n

    def add(self, step: int, loss: float, eval_loss: float) -> str | None:
        """Record an eval; the message to log when this eval is the one that finds the run
        overfitting (once per run), else None."""
        self.points.append((step, loss, eval_loss))
        if not self.patience or self.flagged_at is not None or self.streak() < self.patience:
            return None
        self.flagged_at = step
        seen = self.points[-self.patience - 1 :]
        evals = " -> ".join(f"{e:.4f}" for _, _, e in seen)
        best_step, _, best = min(self.points, key=lambda p: p[2])
        return (
            f"[train] overfitting: eval_loss rose {self.patience} evals in a row ({evals}, steps "
            f"{seen[0][0]}-{step}) while the training loss fell ({seen[0][1]:.4f} -> "
            f"{loss:.4f}); the best eval_loss was {best:.4f} at step {best_step}. Fewer steps or "
            "epochs, more data, or training.early_stopping_patience would stop here"
        )


# ---------------------------------------------------------------------------------------------
# Sinks


def metric_values(metrics: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and k != "step" and math.isfinite(float(v))
    }


class Tracker:
    """Rank 0's metric sinks for one run. `log` one report, `flush` at checkpoints, `close` at
    the end. Other ranks get a Tracker that does nothing."""

    def __init__(self, cfg, run_dir: str, enabled: bool, step: int, history: list[dict]):
        self.enabled = enabled
        self.run_dir = run_dir
        self.remote = storage.is_remote(run_dir)
        self.jsonl = storage.join(run_dir, METRICS_FILE)
        self.lines = [json.dumps(h) + "\n" for h in history]
        self.writer = self.tb_local = None
        self.mlflow = self.wandb = self.wandb_local = None
        if not enabled:
            return
        # the history a checkpoint restored, and nothing a killed run wrote after it: written
        # once here, appended to from now on
        storage.write_text(self.jsonl, "".join(self.lines))
        if cfg.training.tensorboard:
            self._open_tensorboard(step)
        self._open_trackers(cfg)

    def _open_tensorboard(self, step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is a dependency; say so rather than fail a run
            print(f"[track] TensorBoard off: {e} (pip install tensorboard)", flush=True)
            return
        tb_uri = storage.join(self.run_dir, TENSORBOARD_DIR)
        if self.remote:
            self.tb_local = tempfile.mkdtemp(prefix="lorafleet-tb-")
            if storage.exists(tb_uri):  # a resumed run keeps the events written before
                storage.download_dir(tb_uri, self.tb_local)
        # purge_step: events a killed run wrote after the checkpoint are hidden, not doubled
        self.writer = SummaryWriter(self.tb_local or tb_uri, purge_step=step + 1 if step else None)

    def _open_trackers(self, cfg) -> None:
        params = config_params(cfg)
        name = Path(self.run_dir.rstrip("/")).name
        if cfg.tracking.mlflow is not None:
            self.mlflow = MlflowRun(cfg.tracking.mlflow, self.run_dir, f"{cfg.name}/{name}", params)
        if cfg.tracking.wandb is not None:
            from ray.air.integrations.wandb import setup_wandb

            w = cfg.tracking.wandb
            if self.remote:  # its run folder uploaded to <run dir>/wandb/ (flush, close)
                self.wandb_local = tempfile.mkdtemp(prefix="lorafleet-wandb-")
            self.wandb = setup_wandb(
                params,
                project=w.project,
                entity=w.entity,
                name=f"{cfg.name}/{name}",
                group=cfg.name,
                # one W&B run per lorafleet run, a resume included (Ray's defaults, no id under
                # Ray Train and resume="auto", find a crashed run only by a file in the folder
                # of the node it ran on)
                id=wandb_run_id(cfg.name, name),
                resume="allow",
                reinit="finish_previous",  # what Ray's reinit=True means, without the warning
                dir=self.wandb_local or self.run_dir,
            )

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(metrics) + "\n"
        self.lines.append(line)
        if self.remote:
            storage.write_text(self.jsonl, "".join(self.lines))
        else:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(line)
        step, values = metrics["step"], metric_values(metrics)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.mlflow is not None:
            self.mlflow.log(values, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def flush(self) -> None:
        """At checkpoints: TensorBoard's events on disk, and on a remote root TensorBoard's and
        W&B's local folders uploaded (what a killed run leaves there)."""
        if self.writer is not None:
            self.writer.flush()
            if self.tb_local:
                storage.upload_dir(self.tb_local, storage.join(self.run_dir, TENSORBOARD_DIR))
        if self.wandb_local:  # this session's run folder (offline-run-* or run-*), no links
            for run in (Path(self.wandb_local) / WANDB_DIR).glob("*run-*"):
                if run.is_dir() and not run.is_symlink():
                    storage.upload_dir(str(run), storage.join(self.run_dir, WANDB_DIR, run.name))

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.mlflow is not None:
            self.mlflow.close(self.run_dir)
            self.mlflow = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
            self.flush()  # W&B's finished files, on a remote root


def wandb_run_id(job: str, run: str) -> str:
    """The W&B run id of a lorafleet run: the job's name and the run folder's, in the characters
    W&B allows, at most 64."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{job}-{run}")[:64]


class MlflowRun:
    """The MLflow run of one lorafleet run, through MlflowClient (no active run kept in the worker
    process): created with the config as params and tagged with the run folder, or found again by
    that tag when the run resumes. A resume may change the config (more steps): params cannot
    change in MLflow, so the new values go to tags named `resumed.<param>`."""

    def __init__(
        self, section, run_dir: str, run_name: str, params: dict, tags: dict | None = None
    ):
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        self.client = MlflowClient(tracking_uri=section.tracking_uri)
        experiment_id = self._experiment_id(section.experiment)
        params = {k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in params.items()}
        run = _find_run(self.client, experiment_id, run_dir)
        if run is not None:
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            had = run.data.params
            new = [Param(k, v) for k, v in params.items() if k not in had]
            changed = [RunTag(f"resumed.{k}", v) for k, v in params.items() if had.get(k, v) != v]
            self.client.log_batch(self.run_id, params=new, tags=changed)
            print(f"[track] MLflow: resuming run {self.run_id} ({run_name})", flush=True)
        else:
            tags = {**(tags or {}), RUN_DIR_TAG: run_dir}
            run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another run created it just now
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, run_dir: str, status: str = "FINISHED") -> None:
        """The run folder's metrics.jsonl and data report as artifacts; the run FINISHED (or
        `status`)."""
        for name in (METRICS_FILE, DATA_REPORT_FILE):
            uri = storage.join(run_dir, name)
            if storage.exists(uri):
                self.client.log_text(self.run_id, storage.read_text(uri), name)
        self.client.set_terminated(self.run_id, status)


def _find_run(client, experiment_id: str, run_dir: str):
    """The MLflow run tagged with this run folder, or None."""
    if "'" in run_dir:  # the filter's quote; such a run folder is never found (a new run starts)
        return None
    found = client.search_runs(
        [experiment_id], f"tags.`{RUN_DIR_TAG}` = '{run_dir}'", max_results=1
    )
    return found[0] if found else None


def tag_published(cfg, run_dir: str, adapter_uri: str, log=print) -> None:
    """After a publish, on the driver: the adapter's name, version and URI as tags on the MLflow
    run of `run_dir` (found by its `lorafleet.run_dir` tag), when tracking.mlflow is set. The
    adapter is published by then: a tracker that fails here costs one warning line, not the job."""
    if cfg.tracking.mlflow is None:
        return
    m = cfg.tracking.mlflow
    version = adapter_uri.rstrip("/").rsplit("/", 1)[-1]
    tags = {ADAPTER_TAG: cfg.name, VERSION_TAG: version, ADAPTER_URI_TAG: adapter_uri}
    try:
        from mlflow import MlflowClient
        from mlflow.entities import RunTag

        client = MlflowClient(tracking_uri=m.tracking_uri)
        experiment = client.get_experiment_by_name(m.experiment)
        run = experiment and _find_run(client, experiment.experiment_id, run_dir)
        if run:
            client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            return
        why = f"no run tagged {RUN_DIR_TAG}={run_dir} in experiment {m.experiment!r}"
    except Exception as e:  # the server down, a permission: any of them, in one line
        why = one_line(e)
    log(f"[track] warning: MLflow run not tagged with {cfg.name} version {version}: {why}")


def one_line(error: BaseException) -> str:
    """An exception as `Type: first line` (a tracker's errors run to pages of HTTP detail)."""
    first = next((x.strip() for x in str(error).splitlines() if x.strip()), "")
    return f"{type(error).__name__}: {first}"[:300]


def config_params(cfg) -> dict:
    """The config as a run's flat params; where to log is not a hyperparameter (and a tracking
    URI is no place for a secret), so the `tracking.*` keys are left out."""
    return {
        k: v
        for k, v in _flat_params(cfg.model_dump(mode="json")).items()
        if not k.startswith("tracking.")
    }


def _flat_params(tree: dict, prefix: str = "") -> dict:
    """The config as dotted keys (MLflow params and W&B config are flat)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out |= _flat_params(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
