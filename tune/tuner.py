"""Ray Tune over the real training step: `build_tuner(cfg) -> Tuner`, and `tune_job(cfg)` that
runs it, writes the results table (printed and CSV), the best config as YAML, a plot of every
trial's eval loss, and publishes the best trial's adapter.

    lorafleet tune configs/tune-demo.yaml

Each trial is the base config plus dotted overrides sampled from `tune.space`, validated by the
same schema, and runs `train.trainer.build_trainer` (Ray Train V2 under Tune, with
`TuneReportCallback`). Trials report at every eval, so the scheduler sees eval loss by step.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import time
from pathlib import Path

from cluster.config.job import JobConfig
from cluster.config.load import dump_config
from cluster.config.validation import with_overrides
from cluster.errors import ConfigError, LorafleetError
from cluster.store import storage
from tune.trials import (
    BASE,
    RUN_ID,
    param_name,
    sampled,
    trial_config,
    trial_name,
    trial_run_dir,
)

# how often, at most, Tune saves the search state that `--resume` continues from (seconds)
STATE_SAVE_S = 5


class NothingToPublish(LorafleetError):
    """The search ended without a trial checkpoint (every trial errored, or none reported)."""


def tune_root(cfg) -> str:
    return storage.join(storage.absolute(cfg.storage.root), "tune", cfg.name)


def param_space(cfg) -> dict:
    from ray import tune

    space = {}
    for key, dist in cfg.tune.space.items():
        kind, args = next(iter(dist.items()))
        if kind == "loguniform":
            space[param_name(key)] = tune.loguniform(*args)
        elif kind == "uniform":
            space[param_name(key)] = tune.uniform(*args)
        elif kind == "randint":
            space[param_name(key)] = tune.randint(*args)
        elif kind == "choice" and cfg.tune.search != "grid":
            space[param_name(key)] = tune.choice(args)
        else:  # grid, or choice under grid search: every value is run
            space[param_name(key)] = tune.grid_search(args)
    return space


def _trial_fn(params: dict) -> None:
    """One Tune trial: a full Ray Train run of the trial's config."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from train.trainer import build_trainer

    base = JobConfig.model_validate(params.pop(BASE))
    cfg = trial_config(base, params, trial_name(base, tune.get_context().get_trial_id()))
    keep_by = (cfg.tune.metric, cfg.tune.mode)
    trainer = build_trainer(
        cfg, run_id=RUN_ID, callbacks=[TuneReportCallback()], keep_by=keep_by, report_logs=True
    )
    trainer.fit()


def _scheduler(cfg):
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule

    t = cfg.tune
    common = {"time_attr": "step"}  # metric and mode come from TuneConfig
    if t.scheduler == "asha":
        return AsyncHyperBandScheduler(
            **common,
            max_t=cfg.training.max_steps,
            grace_period=t.grace_period_steps,
            reduction_factor=t.reduction_factor,
        )
    if t.scheduler == "hyperband":
        # asynchronous HyperBand: several ASHA brackets. The synchronous HyperBandScheduler
        # pauses and resumes trials through Tune checkpoints, which Train V2 trials do not give Tune.
        return AsyncHyperBandScheduler(
            **common,
            max_t=cfg.training.max_steps,
            grace_period=t.grace_period_steps,
            reduction_factor=t.reduction_factor,
            brackets=t.brackets,
        )
    if t.scheduler == "median":
        return MedianStoppingRule(
            **common, grace_period=t.grace_period_steps, min_samples_required=2
        )
    return FIFOScheduler()


def _search(cfg):
    t = cfg.tune
    if t.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=t.seed), max_concurrent=t.max_concurrent_trials)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=t.seed, max_concurrent=t.max_concurrent_trials)


def say(line: str) -> None:
    """The default `log`: print, looked up when called. Tune pickles its callbacks (the progress
    one holds `log`), and pickle stores a builtin by name, refusing `print` once something has
    put another function at `builtins.print` (Ray does: tqdm_ray in a driver that shows a
    worker's progress bar, Train's and Serve's log redirection): the search then failed before
    its first trial, now and then ("Can't pickle <built-in function print>: it's not the same
    object as builtins.print"; which of Ray's patches it was is not known)."""
    print(line)


def _progress_callback(cfg, log):
    """A Tune callback printing one line per change: running, finished, stopped early, best."""
    from ray.tune import Callback  # here, not at the top: `lorafleet validate` needs no Ray

    class Progress(Callback):
        def __init__(self):
            self.best = None
            self.last_step: dict[str, int] = {}
            self.done: dict[str, str] = {}
            self.said = ""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.last_step[trial.trial_id] = result.get("step", 0)
            value = result.get(cfg.tune.metric)
            if value is not None and (
                self.best is None
                or (value < self.best[0] if cfg.tune.mode == "min" else value > self.best[0])
            ):
                self.best = (value, trial.trial_id)
            self._say(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            stopped = self.last_step.get(trial.trial_id, 0) < cfg.training.max_steps
            self.done[trial.trial_id] = "stopped" if stopped else "finished"
            self._say(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done[trial.trial_id] = "errored"
            self._say(trials)

        def _say(self, trials):
            running = sum(t.status == "RUNNING" and t.trial_id not in self.done for t in trials)
            counts = {
                k: list(self.done.values()).count(k) for k in ("finished", "stopped", "errored")
            }
            best = (
                f"; best {cfg.tune.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else ""
            )
            line = (
                f"[tune] {running} running, {counts['finished']} finished, {counts['stopped']} stopped early, "
                f"{counts['errored']} errored of {cfg.tune.num_samples * _grid_size(cfg)}{best}"
            )
            if line != self.said:  # one line per change, not per report
                log(line)
                self.said = line

    return Progress()


def _grid_size(cfg) -> int:
    n = 1
    for dist in cfg.tune.space.values():
        kind, args = next(iter(dist.items()))
        if kind == "grid" or (kind == "choice" and cfg.tune.search == "grid"):
            n *= len(args)
    return n


def search_path(cfg) -> str:
    return storage.join(tune_root(cfg), "search")


def can_resume(cfg) -> bool:
    """Whether storage holds an earlier search of this name that `--resume` can continue."""
    from ray import tune

    fs, _ = storage.filesystem(tune_root(cfg))
    return tune.Tuner.can_restore(search_path(cfg), storage_filesystem=fs)


def build_tuner(cfg, restore: bool = False, log=say):
    """A Tuner for this config's search; nothing runs until `.fit()`. With restore=True, the
    earlier search of the same name (see `can_resume`) continues, its finished trials kept."""
    from ray import tune

    # the trial function only drives a Ray Train run (whose workers reserve their own resources);
    # Tune refuses an empty request, so it takes a sliver of a CPU
    trainable = tune.with_resources(_trial_fn, {"CPU": 0.1})
    fs, path = storage.filesystem(tune_root(cfg))
    if restore:
        return tune.Tuner.restore(
            search_path(cfg), trainable=trainable, resume_errored=True, storage_filesystem=fs
        )
    from tune.tracking import tune_callbacks

    space = param_space(cfg) | {BASE: cfg.model_dump(mode="json")}
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            num_samples=cfg.tune.num_samples,
            # concurrency is capped by the search algorithm (_search), where Tune honours it
            scheduler=_scheduler(cfg),
            search_alg=_search(cfg),
        ),
        run_config=tune.RunConfig(
            name="search",
            storage_path=path,
            storage_filesystem=fs,
            verbose=0,
            callbacks=[_progress_callback(cfg, log), *tune_callbacks(cfg, log)],
        ),
    )


def summarize(cfg, grid) -> list[dict]:
    """One row per trial: overrides, final and best metric, steps run, stopped early?"""
    rows = []
    better = min if cfg.tune.mode == "min" else max
    for result in grid:
        df = result.metrics_dataframe
        history = [] if df is None or df.empty else df.to_dict("records")
        evals = [
            h
            for h in history
            if isinstance(h.get(cfg.tune.metric), int | float)
            and not math.isnan(h[cfg.tune.metric])
        ]
        params = sampled(result.config or {})
        steps = int(max((h.get("step", 0) for h in history), default=0))
        best = better(evals, key=lambda h: h[cfg.tune.metric]) if evals else None
        rows.append(
            {
                "trial": (result.metrics or {}).get("trial_id") or Path(result.path or "?").name,
                "overrides": params,
                "final": evals[-1][cfg.tune.metric] if evals else None,
                "best": best[cfg.tune.metric] if best else None,
                "best_checkpoint": best.get("checkpoint_path") if best else None,
                "steps": steps,
                "stopped_early": bool(evals)
                and steps < cfg.training.max_steps
                and not any(h.get("early_stopped") for h in history),
                "error": _one_line(result.error) if result.error else "",
                "curve": [(h["step"], h[cfg.tune.metric]) for h in evals],
            }
        )
    return rows


def _one_line(error: BaseException) -> str:
    """A trial's error in one line: Ray wraps the worker's exception in its traceback, whose
    last `SomeError: message` line is the one that says what went wrong."""
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    said = [x for x in lines if re.match(r"^[\w.]*(Error|Exception)\b.*: ", x)]
    return (said[-1] if said else lines[0] if lines else type(error).__name__)[:300]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def results_table(cfg, rows) -> str:
    keys = list(cfg.tune.space)
    head = [
        "trial",
        *keys,
        f"final {cfg.tune.metric}",
        f"best {cfg.tune.metric}",
        "steps",
        "stopped early",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(
        rows,
        key=lambda r: (
            r["best"] is None,
            r["best"] if cfg.tune.mode == "min" else -(r["best"] or 0),
        ),
    ):
        cells = [
            r["trial"],
            *(_fmt(r["overrides"].get(k)) for k in keys),
            _fmt(r["final"]),
            _fmt(r["best"]),
            str(r["steps"]),
            "yes" if r["stopped_early"] else ("error" if r["error"] else "no"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(cfg, rows) -> str:
    buf = io.StringIO()
    keys = list(cfg.tune.space)
    w = csv.writer(buf)
    w.writerow(["trial", *keys, "final_metric", "best_metric", "steps", "stopped_early", "error"])
    for r in rows:
        w.writerow(
            [
                r["trial"],
                *(r["overrides"].get(k) for k in keys),
                r["final"],
                r["best"],
                r["steps"],
                r["stopped_early"],
                r["error"],
            ]
        )
    uri = storage.join(tune_root(cfg), "results.csv")
    storage.write_text(uri, buf.getvalue())
    return uri


def plot_curves(cfg, rows, out_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for r in rows:
        if not r["curve"]:
            continue
        steps, values = zip(*r["curve"], strict=True)
        label = (
            r["trial"]
            + " "
            + ", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in r["overrides"].items())
        )
        (line,) = ax.plot(steps, values, marker="o", markersize=3, label=label)
        if r["stopped_early"]:
            ax.plot(
                steps[-1], values[-1], marker="x", markersize=11, mew=2.5, color=line.get_color()
            )
    ax.plot([], [], "kx", markersize=9, mew=2.5, label="stopped early")
    ax.set_xlabel("training step")
    ax.set_ylabel(cfg.tune.metric)
    ax.set_title(f"lorafleet tune {cfg.name}: {cfg.tune.scheduler}, {cfg.tune.search} search")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def best_checkpoint(cfg, best: dict):
    """The best trial's best checkpoint by tune.metric, on the filesystem the trials wrote to (a
    bucket path has no scheme once Ray has it, so the path alone would be read as local)."""
    from pyarrow.fs import FileType
    from ray.train import Checkpoint

    fs, _ = storage.filesystem(tune_root(cfg))
    path = best["best_checkpoint"]
    if fs.get_file_info(path).type == FileType.NotFound:
        raise NothingToPublish(
            f"the best trial {best['trial']}'s checkpoint {path} is gone; its trial kept "
            f"training.keep_checkpoints={cfg.training.keep_checkpoints} by {cfg.tune.metric}"
        )
    return Checkpoint(path, filesystem=fs)


def tune_job(cfg, resume: bool = False, log=say, make_current: bool = True) -> dict:
    """Run the search, write its outputs, publish the best adapter. Returns a summary."""
    import tempfile

    from train.tracking import tag_published
    from train.trainer import prepare_run, publish_adapter

    if not cfg.tune.space:
        raise ConfigError(["tune.space: expected at least one key to search. Got {} instead"])
    cfg = prepare_run(cfg, log=log)
    t0 = time.time()
    # Tune saves the search's state at most every 10 s by default; Ctrl-C (see cluster/cli/main.py)
    # leaves without a last save, so a trial finished in those 10 s would run again on --resume
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(STATE_SAVE_S))
    restore = resume and can_resume(cfg)
    if restore:
        log(f"[tune] resuming {search_path(cfg)}")
    elif resume:
        log(f"[tune] no earlier search at {search_path(cfg)}; starting a new one")
    grid = build_tuner(cfg, restore=restore, log=log).fit()
    rows = summarize(cfg, grid)
    table = results_table(cfg, rows)
    log(table)
    out = {"table": table, "rows": rows, "seconds": time.time() - t0, "csv": write_csv(cfg, rows)}
    scored = [r for r in rows if r["best"] is not None and r["best_checkpoint"]]
    if not scored:
        errored = [r for r in rows if r["error"]]
        raise NothingToPublish(
            f"no trial of {cfg.name} reported a checkpoint, so there is nothing to publish: "
            f"{len(errored)} of {len(rows)} trials errored"
            + (f"; the first: {errored[0]['error']}" if errored else "")
        )
    best = (min if cfg.tune.mode == "min" else max)(scored, key=lambda r: r["best"])
    best_cfg = with_overrides(cfg, {**best["overrides"], "tune.space": {}})
    out["best_yaml"] = storage.join(tune_root(cfg), "best.yaml")
    storage.write_text(
        out["best_yaml"],
        f"# best trial {best['trial']} of `lorafleet tune` {cfg.name}: "
        f"{cfg.tune.metric} {best['best']:.4f}\n" + dump_config(best_cfg),
    )
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_curves(cfg, rows, Path(tmp) / "curves.png")
        out["plot"] = storage.join(tune_root(cfg), "curves.png")
        if storage.is_remote(out["plot"]):
            storage.upload_dir(tmp, tune_root(cfg) + "/plot")
            out["plot"] = tune_root(cfg) + "/plot/curves.png"
        else:
            Path(out["plot"]).write_bytes(png.read_bytes())
    source = {"kind": "tune", "trial": best["trial"], "search": search_path(cfg)}
    best_ckpt = best_checkpoint(cfg, best)
    out["adapter"] = publish_adapter(best_ckpt, best_cfg, source, log, make_current)
    # the published version on the best trial's MLflow run (tune/tracking.py made one per trial)
    tag_published(best_cfg, trial_run_dir(cfg, best["trial"]), out["adapter"], log)
    out["version"] = out["adapter"].rstrip("/").rsplit("/", 1)[-1]
    out["best"] = best
    log(
        f"[tune] best trial {best['trial']} {best['overrides']}: {cfg.tune.metric} {best['best']:.4f}; "
        f"results {out['csv']}, config {out['best_yaml']}, plot {out['plot']}"
    )
    return out
