"""Ray Train: `build_trainer(cfg) -> TorchTrainer`, and `train(cfg)` that runs it and publishes
the adapter as a new version of `<storage.root>/adapters/<name>/`.

    lorafleet train configs/demo.yaml training.max_steps=50
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from cluster.config.job import FULL_WEIGHTS
from cluster.errors import LorafleetError
from cluster.store import layout, storage
from train.checkpoint import ADAPTER_DIR, CHECKPOINT_META
from train.export import check_adapter
from train.loop import train_loop_per_worker
from train.tracking import tag_published
from train.zero import load_override


class TrainingError(LorafleetError):
    """A training run that failed on its workers: the first worker's error, in one line."""


def runs_root(cfg) -> str:
    return storage.join(layout.runs_root(cfg.storage.root), cfg.name)


def new_run_id(now: float) -> str:
    return time.strftime("run-%Y%m%d-%H%M%S", time.localtime(now))


def latest_run_id(cfg) -> str | None:
    runs = [r for r in storage.listdir(runs_root(cfg)) if r.startswith("run-")]
    return runs[-1] if runs else None


def build_trainer(
    cfg,
    run_id: str,
    callbacks: list | None = None,
    keep_by: tuple[str, str] = ("eval_loss", "min"),
    report_logs: bool = False,
):
    """A TorchTrainer for this config; nothing runs until `.fit()`. A run with the same run_id
    (same storage path and name) resumes where it stopped: that is how a crashed driver resumes.
    Pure: the caller names the run (`new_run_id(time.time())` for a new one). `report_logs`: a
    Ray Train report at every log step (Tune's schedulers need them), not only at checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from train.internals import lean_torch_trainer

    s = cfg.scaling
    resources = dict(s.resources_per_worker)
    if s.use_gpu:
        resources.setdefault("GPU", 1)
    fs, path = storage.filesystem(runs_root(cfg))
    return lean_torch_trainer()(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "run_dir": storage.join(runs_root(cfg), run_id),
            "report_logs": report_logs,
            # scaling.deepspeed.config, read here so workers on other nodes need not see the file
            "deepspeed": load_override(cfg),
        },
        # DeepSpeed too runs over this process group (train/zero.py)
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_id,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.training.keep_checkpoints,
                # the metric that picks what is kept: eval loss, or a Tune trial's tune.metric,
                # so the checkpoint the search publishes is never the one deleted
                checkpoint_score_attribute=keep_by[0],
                checkpoint_score_order=keep_by[1],
            ),
            failure_config=FailureConfig(max_failures=cfg.training.max_failures),
            callbacks=callbacks or [],
        ),
    )


def pick_checkpoint(result, export: str):
    if export == "last" or not result.best_checkpoints:
        return result.checkpoint
    return min(result.best_checkpoints, key=lambda cm: cm[1].get("eval_loss", float("inf")))[0]


def prompt_format(cfg) -> dict:
    """How training turned rows into tokens (`cluster.text.prompt_format.record`): what serving
    reproduces for this adapter. With several sources, the format of the heaviest one (the
    first of equals) is the adapter's; every source's format is listed beside it."""
    from cluster.text.prompt_format import record
    from train.model import load_tokenizer

    sources = cfg.data.source_list()
    main = max(sources, key=lambda s: s.weight)  # max keeps the first of equal weights
    extra = {"source_formats": [s.format for s in sources]} if len(sources) > 1 else {}
    return record(main.format, load_tokenizer(cfg), cfg.data.train_on_prompt, **extra)


def version_meta(cfg, step: int, metrics: dict, source: dict) -> dict:
    """What a published version records beside its weights: the base (where it was read from,
    and its fingerprint: what it is), metrics, the config, its source and the prompt format."""
    from cluster.store.fingerprint import base_fingerprint
    from train.model import base_path

    return {
        "base_model": cfg.model.base,
        "base_fingerprint": base_fingerprint(base_path(cfg), cfg.model.revision),
        "step": step,
        "eval_loss": metrics.get("eval_loss"),
        "metrics": metrics,
        "source": source,
        "prompt_format": prompt_format(cfg),
        "config": cfg.model_dump(mode="json"),
    }


def publish_adapter(
    checkpoint, cfg, source: dict | None = None, log=print, make_current: bool = True
) -> str:
    """Publish the chosen checkpoint's adapter, after checking it, as a new version of
    `<storage.root>/adapters/<name>` (`cluster.store.versions`: written whole, then made current).
    Returns the version's URI."""
    from cluster.store import versions

    root = layout.adapters_root(cfg.storage.root)
    with tempfile.TemporaryDirectory(prefix="lorafleet-publish-") as tmp:
        ckpt_dir = Path(checkpoint.to_directory(str(Path(tmp) / "ckpt")))
        meta = json.loads((ckpt_dir / CHECKPOINT_META).read_text())
        adapter = ckpt_dir / ADAPTER_DIR
        check_adapter(adapter, expect_trained=meta["step"] > 0)
        if cfg.adapter.method in FULL_WEIGHTS:  # a whole model, served as a base
            return _publish_model(adapter, cfg, meta, source, log)
        out = Path(tmp) / "out"
        out.mkdir()
        for f in layout.ADAPTER_FILES:
            (out / f).write_bytes((adapter / f).read_bytes())
        metrics = {k: v for k, v in meta.items() if k.startswith("eval_") or k == "loss"}
        info = version_meta(cfg, meta["step"], metrics, source or {"kind": "train"})
        keep = cfg.storage.keep_versions
        version = versions.publish(out, root, cfg.name, info, keep, make_current)
    dest = versions.version_uri(root, cfg.name, version)
    now = versions.current(root, cfg.name)
    log(
        f"[publish] adapter {cfg.name} version {version} (step {meta['step']}, eval_loss "
        f"{meta.get('eval_loss')}) -> {dest}; "
        + ("now current" if now == version else f"current stays {now} (a release decides)")
    )
    return dest


def _publish_model(trained_dir: Path, cfg, meta: dict, source: dict | None, log) -> str:
    """publish_adapter for full / partial: the base with the trained weights, as a whole model
    (train/export.py publish_full_model). Returns the version's URI."""
    from train.export import publish_full_model

    metrics = {k: v for k, v in meta.items() if k.startswith("eval_") or k == "loss"}
    info = version_meta(cfg, meta["step"], metrics, source or {"kind": "train"})
    version, dest = publish_full_model(trained_dir, cfg, info)
    log(
        f"[publish] model {cfg.name} version {version} ({cfg.adapter.method} fine-tune, step "
        f"{meta['step']}, eval_loss {meta.get('eval_loss')}) -> {dest}; serve it with "
        f"models: [{{id: {cfg.name}, base: {dest}}}]"
    )
    return dest


def absolute_paths(cfg):
    """Relative local paths resolved against the driver's directory: Ray workers run elsewhere."""
    from cluster.config.validation import with_overrides

    over = {"storage.root": storage.absolute(cfg.storage.root)}
    if cfg.data.sources:
        over["data.sources"] = [
            s.model_dump() | ({"path": str(Path(s.path).resolve())} if _local_file(s.path) else {})
            for s in cfg.data.sources
        ]
    for key, value in (
        ("data.path", cfg.data.path),
        ("data.eval_path", cfg.data.eval_path),
        ("model.base", cfg.model.base),
        ("training.resume_from", cfg.training.resume_from),
    ):
        if value and not storage.is_remote(value) and Path(value).exists():
            over[key] = str(Path(value).resolve())
    return with_overrides(cfg, over)


def _local_file(path: str | None) -> bool:
    return bool(path) and not storage.is_remote(path) and Path(path).exists()


def prepare_run(cfg, log=print):
    """`plan_run`'s config: the one the workers get."""
    return plan_run(cfg, log=log)[0]


def plan_run(cfg, log=print):
    """What every Ray job of ours does first, on the driver: build a tiny:// base, make paths
    absolute, check every data row (a bad row fails in seconds, by file and row, before any
    worker starts), print the data report, turn training.epochs into steps, connect to Ray.
    Returns (the config the workers get, the data report)."""
    from cluster.errors import ConfigError
    from cluster.ray_connect import ensure_ray
    from cluster.store.servability import config_warning
    from train.data import prepare
    from train.model import load_tokenizer, resolve_base

    missing = cfg.tracking.missing_packages()  # a config built in Python skips load_config's check
    if missing:
        raise ConfigError(missing)
    cfg = absolute_paths(resolve_base(cfg))
    warning = config_warning(cfg)  # an adapter vLLM cannot serve: said before any training
    if warning:
        log(f"[train] {warning}")
    checked = prepare(cfg.data, load_tokenizer(cfg), log=log)
    for line in checked.report.lines():
        log(line)
    cfg = _steps_from_epochs(cfg, checked.report, log)
    ensure_ray(cfg.ray, log=log)
    return cfg, checked.report


def _steps_from_epochs(cfg, report, log):
    """training.epochs -> training.max_steps, computed once here from the packed sequences, so
    the loop, the LR schedule, warmup and Tune's scheduler all see plain steps."""
    from cluster.config.validation import with_overrides
    from cluster.errors import ConfigError
    from train.data import steps_for_epochs

    t, world = cfg.training, cfg.scaling.num_workers
    if t.epochs is None:
        report.plan = {"max_steps": t.max_steps, "epochs": None}
        return cfg
    steps, per_epoch = steps_for_epochs(
        report.sequences, t.epochs, t.batch_size, world, t.grad_accum_steps
    )
    report.plan = {"max_steps": steps, "epochs": t.epochs, "micro_batches_per_epoch": per_epoch}
    log(
        f"[data] training.epochs={t.epochs:g}: {report.sequences} sequences / (batch_size "
        f"{t.batch_size} x {world} worker(s)) = {per_epoch} micro-batches per epoch; with "
        f"grad_accum_steps={t.grad_accum_steps}: {steps} steps (warmup {t.warmup_steps})"
    )
    if t.warmup_steps > steps:
        raise ConfigError(
            [
                f"training.warmup_steps: expected at most the {steps} steps that "
                f"training.epochs={t.epochs:g} makes. Got {t.warmup_steps} instead"
            ]
        )
    return with_overrides(cfg, {"training.epochs": None, "training.max_steps": steps})


def fit_trainer(trainer):
    """`trainer.fit()`, with a worker's failure as one TrainingError line instead of Ray's
    wrapped traceback."""
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
        if result.error:
            raise result.error
    except TrainingFailedError as e:
        raise TrainingError(summarize_failure(e)) from e
    return result


def summarize_failure(error: Exception) -> str:
    """`training failed: worker 0: ValueError: <first line>` for a worker's error; the first line
    of Ray's own message for anything else (a controller error)."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        cause = failures[rank]
        cause = getattr(cause, "cause", None) or cause  # a RayTaskError carries the user's error
        first = (str(cause).strip().splitlines() or [""])[0]
        return f"training failed: worker {rank}: {type(cause).__name__}: {first}"
    lines = [x for x in str(error).strip().splitlines() if x.strip()]
    return "training failed: " + " ".join(lines[:2])


def train(cfg, resume: bool = False, log=print, make_current: bool = True) -> dict:
    """Run a whole job: resolve the base, fit on Ray, publish the adapter. Returns a summary."""
    cfg, data_report = plan_run(cfg, log=log)
    t0 = time.time()
    run_id = (latest_run_id(cfg) if resume else None) or new_run_id(t0)
    log(f"[train] {cfg.name}: run {run_id} in {runs_root(cfg)}")
    report_uri = storage.join(runs_root(cfg), run_id, "data_report.json")
    storage.write_text(report_uri, json.dumps(data_report.to_dict(), indent=2))
    result = fit_trainer(build_trainer(cfg, run_id))
    checkpoint = pick_checkpoint(result, cfg.training.export)
    if checkpoint is None:
        raise TrainingError("training finished without a checkpoint; nothing to publish")
    source = {"kind": "train", "run": run_id}
    dest = publish_adapter(checkpoint, cfg, source, log=log, make_current=make_current)
    tag_published(cfg, storage.join(runs_root(cfg), run_id), dest, log=log)
    history_uri = storage.join(runs_root(cfg), run_id, "metrics.jsonl")
    history = [json.loads(x) for x in storage.read_text(history_uri).splitlines() if x.strip()]
    return {
        "adapter": dest,
        "version": dest.rstrip("/").rsplit("/", 1)[-1],
        "run_dir": storage.join(runs_root(cfg), run_id),
        "history": history,
        "metrics": result.metrics,
        "seconds": time.time() - t0,
        "base": cfg.model.base,
        "data_report": report_uri,
        # the first report that found the run overfitting (train/tracking.py), or None
        "overfitting": next((h for h in history if h.get("overfitting")), None),
    }
