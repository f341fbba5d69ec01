"""Where a run's metrics go, on rank 0: `<run dir>/metrics.jsonl` (one line per report,
appended), TensorBoard events in `<run dir>/tensorboard/` (`training.tensorboard`, on by
default), and MLflow or W&B through Ray's integrations when `tracking.mlflow` /
`tracking.wandb` is set. Also what the metrics say about the run: peak memory, and whether it
is overfitting.

    tensorboard --logdir lorafleet-runs/runs/<name>      # every run of <name>, offline

On an s3:// or gs:// root, nothing can be appended to: metrics.jsonl is rewritten whole at every
report there (one small PUT), and TensorBoard writes into a local folder that is uploaded to
`<run dir>/tensorboard/` at every checkpoint and at the end.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster.store import storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


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


def _numbers(metrics: dict) -> dict[str, float]:
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
        self.mlflow = self.wandb = None
        if not enabled:
            return
        # the history a checkpoint restored, and nothing a killed run wrote after it: written
        # once here, appended to from now on
        storage.write_text(self.jsonl, "".join(self.lines))
        if cfg.training.tensorboard:
            self._open_tensorboard(step)
        self._open_ray_integrations(cfg)

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

    def _open_ray_integrations(self, cfg) -> None:
        params = _flat_params(cfg.model_dump(mode="json"))
        name = Path(self.run_dir.rstrip("/")).name
        if cfg.tracking.mlflow is not None:
            from ray.air.integrations.mlflow import setup_mlflow

            m = cfg.tracking.mlflow
            self.mlflow = setup_mlflow(
                params,
                tracking_uri=m.tracking_uri,
                experiment_name=m.experiment,
                run_name=f"{cfg.name}/{name}",
                create_experiment_if_not_exists=True,
            )
        if cfg.tracking.wandb is not None:
            from ray.air.integrations.wandb import setup_wandb

            w = cfg.tracking.wandb
            self.wandb = setup_wandb(
                params, project=w.project, entity=w.entity, name=f"{cfg.name}/{name}"
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
        step, values = metrics["step"], _numbers(metrics)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def flush(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        if self.tb_local:
            storage.upload_dir(self.tb_local, storage.join(self.run_dir, TENSORBOARD_DIR))

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()


def _flat_params(tree: dict, prefix: str = "") -> dict:
    """The config as dotted keys (MLflow params and W&B config are flat)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out |= _flat_params(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def tune_callbacks(cfg) -> list:
    """Tune's logger callbacks for tracking.mlflow / tracking.wandb: one MLflow or W&B run per
    trial, fed every result the trial reports (the trials' own loops leave them off)."""
    callbacks = []
    if cfg.tracking.mlflow is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        m = cfg.tracking.mlflow
        callbacks.append(
            MLflowLoggerCallback(tracking_uri=m.tracking_uri, experiment_name=m.experiment)
        )
    if cfg.tracking.wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        w = cfg.tracking.wandb
        callbacks.append(WandbLoggerCallback(project=w.project, entity=w.entity))
    return callbacks
