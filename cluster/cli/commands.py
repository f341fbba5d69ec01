"""What each `lorafleet` command does: one function per command, taking the parameters
`cluster.cli.main.parse` found and returning the exit code, and the Ctrl-C handling of the long
ones. Each imports the package it dispatches to (train, tune, serve) lazily, inside itself."""

from __future__ import annotations

import json
import sys
import threading

from cluster.config.load import dump_config, load_config, schema_for
from cluster.errors import ConfigError, LorafleetError


class Interrupted(Exception):
    """Ctrl-C during a long command; the message says what stopped and how to continue it."""


# ---------------------------------------------------------------------------------------------
# The commands: each takes the parameters `parse` found and returns the exit code


def run_validate(configs: list[str], overrides: list[str], print_config: bool) -> int:
    bad = 0
    for path in configs:
        try:
            cfg = load_config(path, overrides, schema_for(path))
        except ConfigError as e:
            print(e, file=sys.stderr)
            bad += 1
            continue
        print(f"{path}: ok" if not print_config else dump_config(cfg))
    return 2 if bad else 0


def run_train(config: str, overrides: list[str], resume: bool, release: str | None = None) -> int:
    cfg = load_config(config, overrides)  # a config error needs no torch
    check_release_target(cfg, release)
    from train.trainer import train

    summary = _interruptible(
        lambda: train(cfg, resume=resume, make_current=not release),
        f"lorafleet train {config} stopped; rerun it with --resume to continue from its last "
        "checkpoint",
    )
    last = summary["history"][-1] if summary["history"] else {}
    print(
        f"[done] {cfg.name}: {len(summary['history'])} reports, final loss {last.get('loss', float('nan')):.4f}"
        + (f", eval_loss {last['eval_loss']:.4f}" if "eval_loss" in last else "")
        + f", {summary['seconds']:.0f}s; adapter at {summary['adapter']}"
    )
    if summary.get("overfitting"):
        h = summary["overfitting"]
        print(
            f"[done] {cfg.name} was overfitting from step {h['step']} (eval_loss "
            f"{h.get('eval_loss', float('nan')):.4f} rising while the training loss fell); "
            f"training.export={cfg.training.export} chose the published checkpoint"
        )
    return start_release_after(release, cfg.name, summary["version"])


def run_tune(config: str, overrides: list[str], resume: bool, release: str | None = None) -> int:
    cfg = load_config(config, overrides)
    check_release_target(cfg, release)
    from tune.tuner import tune_job

    out = _interruptible(
        lambda: tune_job(cfg, resume=resume, make_current=not release),
        f"lorafleet tune {config} stopped; rerun it with --resume to continue the search",
    )
    return start_release_after(release, cfg.name, out["version"])


def run_eval(config: str, overrides: list[str]) -> int:
    """Base vs each adapter on held-out rows and general text (train/evaluate.py). No Ray:
    vLLM and HF generate run in this process, and vLLM wants this (the main) thread."""
    cfg = load_config(config, overrides)
    from train.evaluate import evaluate

    try:
        evaluate(cfg)
    except KeyboardInterrupt:
        raise Interrupted(f"lorafleet eval {config} stopped; nothing was written") from None
    return 0


def run_merge(adapter: str, out: str, dtype: str) -> int:
    from cluster.store.versions import local_version_dir
    from train.export import merge_adapter

    # `adapters/<name>` (its current version), `adapters/<name>@<version>`, or a PEFT folder
    merge_adapter(local_version_dir(adapter), out, dtype=dtype)
    return 0


def run_adapters(
    action: str,
    name: str | None,
    version: str | None,
    root: str | None,
    config: str | None,
    source: str | None = None,
    base: str | None = None,
    candidate: bool = False,
) -> int:
    from cluster.cli import adapters as ac

    if action == "import":
        return ac.import_adapter(name, source, root, config, base, candidate)
    root = ac.storage_root(root, config)
    if action == "list":
        return ac.list_adapters(root)
    if action == "show":
        return ac.show_adapter(root, name)
    if action == "reindex":
        return ac.reindex(root)
    return ac.move(root, name, version if action == "promote" else None)


def run_release(
    action: str,
    config: str,
    overrides: list[str],
    adapter: str | None,
    url: str | None,
    follow: bool,
    rewards_per_s: float | None = None,
) -> int:
    """Start, follow, pause, resume or abort a canary release on the running app, or plan one
    (cluster/cli/releases.py)."""
    from cluster.cli import releases as rc
    from cluster.cli.http_client import HttpError, ServerUnreachable
    from cluster.config.serve import ServeAppConfig

    cfg = load_config(config, overrides, ServeAppConfig)
    try:
        if action == "plan":
            from cluster.config.release import ReleaseConfig
            from serve.sequential import information_needed

            spec = cfg.release or ReleaseConfig(adapter="any")
            return rc.plan(spec, rewards_per_s, information_needed)
        if action == "start":
            if cfg.release is None:
                raise ConfigError(
                    ["release: missing; add a `release:` section (adapter, steps, gates)"],
                    config,
                )
            return rc.start(cfg, cfg.release.model_dump(mode="json"), url, follow)
        if action == "status":
            return rc.status(cfg, adapter, url, follow)
        if action in ("pause", "resume"):
            return rc.pause_or_resume(cfg, action, adapter, url)
        return rc.abort(cfg, adapter, url)
    except (ServerUnreachable, HttpError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def check_release_target(cfg, release: str | None) -> None:
    """--release canaries an adapter on vLLM: refused, before training, for a config whose
    output vLLM cannot serve as an adapter (a whole model, DoRA, bias, a non-LoRA method)."""
    from cluster.store.servability import config_problems

    if not release:
        return
    if cfg.adapter.method in ("full", "partial"):
        problems = [f"adapter.method is {cfg.adapter.method!r}: it publishes a whole model"]
    else:
        problems = config_problems(cfg)
    if problems:
        raise ConfigError(
            [f"--release: a canary release serves an adapter through vLLM; {p}" for p in problems]
        )


def start_release_after(serve_config: str | None, adapter: str, version: str) -> int:
    """`lorafleet train|tune --release SERVE_CONFIG`: release the version just published, with the
    serve file's ramp and gates (its `release:` section, or the defaults)."""
    if not serve_config:
        return 0
    from cluster.cli import releases as rc
    from cluster.config.release import ReleaseConfig
    from cluster.config.serve import ServeAppConfig
    from cluster.store import layout, versions

    cfg = load_config(serve_config, [], ServeAppConfig)
    if versions.current(layout.adapters_root(cfg.storage.root), adapter) == version:
        print(f"[release] {adapter}: {version} is its first version and already current")
        return 0
    spec = (cfg.release or ReleaseConfig(adapter=adapter)).model_dump(mode="json")
    return rc.start(cfg, spec | {"adapter": adapter, "version": version}, None, wait=True)


def run_serve(config: str, overrides: list[str]) -> int:
    from cluster.config.serve import ServeAppConfig

    cfg = load_config(config, overrides, ServeAppConfig)
    from serve.app import run

    run(cfg, blocking=True)
    return 0


def run_demo(config: str, overrides: list[str], json_report: bool) -> int:
    from train.demo import run_demo as demo

    report = _interruptible(
        lambda: demo(config, overrides), "lorafleet demo stopped; rerun it to start again"
    )
    if json_report:
        print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


def _base_url(cfg, url: str | None) -> str:
    return url or f"http://{cfg.http.host}:{cfg.http.port}"


def run_set_weights(config: str, experiment: str, weights: dict, url: str | None) -> int:
    """PUT /v1/experiments/<name> on the running app."""
    from cluster.cli.http_client import Client, HttpError, ServerUnreachable
    from cluster.config.serve import ServeAppConfig

    cfg = load_config(config, schema=ServeAppConfig)
    client = Client(_base_url(cfg, url), key=cfg.http.client_key(admin=True))
    try:
        r = client.put(f"/v1/experiments/{experiment}", {"weights": weights})
    except (ServerUnreachable, HttpError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(r.json(), indent=2))
    return 0


def run_serve_eval(config: str, model: str, data: str, url: str | None, limit: int | None) -> int:
    """Exact match of a served model on held-out rows, through the running server."""
    from cluster.config.serve import ServeAppConfig
    from serve.eval import exact_match, read_rows

    cfg = load_config(config, schema=ServeAppConfig)
    try:
        rows = read_rows(data, limit)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        res = exact_match(
            _base_url(cfg, url),
            model,
            rows,
            key=cfg.http.client_key(),
            log=lambda m: print(m, file=sys.stderr),
        )
    except LorafleetError as e:  # no server there, or it failed a row
        print(f"error: {e}", file=sys.stderr)
        return 1
    split = "".join(
        f"; variant {v}: {r['exact_match']:.1%} on {r['rows']}" for v, r in res["variants"].items()
    )
    print(
        f"{model}: exact match {res['exact_match']:.1%} on {res['rows']} rows of {data}{split}; "
        f"token F1 {res['f1']:.3f}, ROUGE-L {res['rouge_l']:.3f}, BLEU {res['bleu']:.1f}"
    )
    return 0


def run_submit(
    command: str,
    config: str,
    overrides: list[str],
    address: str | None,
    env: list[str],
    follow: bool,
) -> int:
    from cluster.cli.submit import submit

    return submit(command, config, overrides, address, env, follow=follow)


def run_doctor(config: str | None, overrides: list[str]) -> int:
    from cluster.doctor import ClusterOnly
    from cluster.doctor import run_doctor as doctor
    from cluster.ray_connect import ensure_ray

    cfg = load_config(config, overrides, schema_for(config) if config else ClusterOnly)
    return doctor(cfg, ensure_ray(cfg.ray))


def run_plan(config: str, overrides: list[str], gpu: str | None, gpu_gib: float | None) -> int:
    """The estimated peak memory per worker and whether it fits (train/memory_plan.py)."""
    cfg = load_config(config, overrides)
    from train.memory_plan import plan_text

    print(plan_text(cfg, gpu, gpu_gib))
    return 0


def package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lorafleet")
    except metadata.PackageNotFoundError:
        return "unknown (not installed; run pip install -e .)"


COMMANDS = {
    "validate": run_validate,
    "train": run_train,
    "tune": run_tune,
    "eval": run_eval,
    "merge": run_merge,
    "serve": run_serve,
    "serve set-weights": run_set_weights,
    "serve eval": run_serve_eval,
    "demo": run_demo,
    "adapters": run_adapters,
    "release": run_release,
    "submit": run_submit,
    "doctor": run_doctor,
    "plan": run_plan,
}


# ---------------------------------------------------------------------------------------------
# Ctrl-C


def _interruptible(job, message: str):
    """Run a Ray job so that Ctrl-C (or SIGTERM) stops it with `message`. Ray Train and Tune
    replace the main thread's SIGINT handler with their own graceful abort (Train's ends in exit
    0 or a traceback; Tune's returns the partial search as if it had finished, and ours would
    publish from it). From a second thread they leave signals alone, so the job runs there and
    the main thread, which keeps the signals, waits for it."""
    import logging
    import signal

    if threading.current_thread() is not threading.main_thread():
        return job()  # signals are the main thread's business; it is not ours here
    box: dict = {}

    def target():
        try:
            box["value"] = job()
        except BaseException as e:  # handed to the main thread, raised there
            box["error"] = e

    def stop(signum, frame):
        raise KeyboardInterrupt

    # ray.init warns, off the main thread, that it cannot set its SIGTERM handler: this one is it
    quiet = _DropMessage("SIGTERM handler is not set")
    logging.getLogger("ray._private.worker").addFilter(quiet)
    previous = signal.signal(signal.SIGTERM, stop)
    worker = threading.Thread(target=target, name="lorafleet-job", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.5)
    except KeyboardInterrupt:
        raise Interrupted(message) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        logging.getLogger("ray._private.worker").removeFilter(quiet)
    if "error" in box:
        raise box["error"]
    return box["value"]


class _DropMessage:
    def __init__(self, text: str):
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


def ray_running() -> bool:
    """Whether this process is connected to Ray, without importing Ray to find out."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()
