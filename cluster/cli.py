"""The `lorafleet` command.

    lorafleet demo                                   # the embedded default, end to end
    lorafleet train configs/demo.yaml training.max_steps=50
    lorafleet tune configs/tune-demo.yaml
    lorafleet eval configs/demo.yaml                 # base vs adapters: held-out + forgetting
    lorafleet validate configs/*.yaml
    lorafleet merge lorafleet-runs/adapters/demo-last --out merged/
    lorafleet adapters list | show NAME | promote NAME VERSION | rollback NAME  [--root ROOT]
    lorafleet release configs/serve-demo.yaml        # canary: ramp, promote or roll back
    lorafleet release status | abort | pause | resume configs/serve-demo.yaml [ADAPTER]
    lorafleet serve configs/serve-demo.yaml          # OpenAI-compatible HTTP on 127.0.0.1:8000
    lorafleet serve set-weights configs/serve-demo.yaml word-bot last-word=50 swap-words=50
    lorafleet serve eval configs/serve-demo.yaml tiny-demo:demo-last lorafleet-runs/demo/data/last/test.jsonl
    lorafleet submit train configs/demo.yaml --address http://127.0.0.1:8265 --env HF_TOKEN
    lorafleet doctor configs/demo.yaml ray.address=auto
    lorafleet plan configs/recipes/llama-3.1-8b.yaml --gpu L4-24GB   # peak memory per GPU
    lorafleet --version

Flags may stand anywhere among the words. Each command imports its package lazily, so
`lorafleet validate` stays fast and `cluster` depends on nothing of ours at import time.
Exit codes: 0 done; 1 the server failed or could not be reached, the demo's adapters did
not beat the base, a submitted job failed, or a doctor check failed; 2 a problem with what was asked (usage, config, data: any LorafleetError);
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from dataclasses import dataclass, field

from cluster.config import dump_config, load_config, schema_for
from cluster.errors import ConfigError, LorafleetError

SERVE_ACTIONS = ("set-weights", "eval")
# each adapters action and the words it takes after itself
ADAPTER_ACTIONS = {
    "list": (),
    "show": ("NAME",),
    "promote": ("NAME", "VERSION"),
    "rollback": ("NAME",),
}


@dataclass(frozen=True)
class Invocation:
    """What one command line asks for: the command and the arguments its function runs with."""

    command: str
    params: dict = field(default_factory=dict)


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
    from cluster.versions import local_version_dir
    from train.export import merge_adapter

    # `adapters/<name>` (its current version), `adapters/<name>@<version>`, or a PEFT folder
    merge_adapter(local_version_dir(adapter), out, dtype=dtype)
    return 0


def run_adapters(
    action: str, name: str | None, version: str | None, root: str | None, config: str | None
) -> int:
    from cluster import adapter_commands as ac

    root = ac.storage_root(root, config)
    if action == "list":
        return ac.list_adapters(root)
    if action == "show":
        return ac.show_adapter(root, name)
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
    (cluster/release_commands.py)."""
    from cluster import release_commands as rc
    from cluster.http_client import HttpError, ServerUnreachable
    from cluster.serve_config import ServeAppConfig

    cfg = load_config(config, overrides, ServeAppConfig)
    try:
        if action == "plan":
            from cluster.release_config import ReleaseConfig
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
    from cluster.servability import config_problems

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
    from cluster import layout, versions
    from cluster import release_commands as rc
    from cluster.release_config import ReleaseConfig
    from cluster.serve_config import ServeAppConfig

    cfg = load_config(serve_config, [], ServeAppConfig)
    if versions.current(layout.adapters_root(cfg.storage.root), adapter) == version:
        print(f"[release] {adapter}: {version} is its first version and already current")
        return 0
    spec = (cfg.release or ReleaseConfig(adapter=adapter)).model_dump(mode="json")
    return rc.start(cfg, spec | {"adapter": adapter, "version": version}, None, wait=True)


def run_serve(config: str, overrides: list[str]) -> int:
    from cluster.serve_config import ServeAppConfig

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
    from cluster.http_client import Client, HttpError, ServerUnreachable
    from cluster.serve_config import ServeAppConfig

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
    from cluster.serve_config import ServeAppConfig
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
    from cluster.submit import submit

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


def _ray_running() -> bool:
    """Whether this process is connected to Ray, without importing Ray to find out."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


# ---------------------------------------------------------------------------------------------
# The command line


def build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `lorafleet` parser (for --help) and each command's own parser, by name."""
    p = argparse.ArgumentParser(prog="lorafleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"lorafleet {package_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check config files (all problems at once)")
    v.add_argument("config", nargs="+", metavar="CONFIG|KEY=VALUE")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--print", action="store_true", help="print the full config with defaults")

    t = sub.add_parser("train", help="fine-tune an adapter with QLoRA on Ray Train")
    t.add_argument("config", nargs="?")
    t.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. training.learning_rate=1e-4",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue this name's latest run from its last checkpoint",
    )

    tu = sub.add_parser(
        "tune", help="search hyperparameters (tune.space) with Ray Tune; publish the best adapter"
    )
    tu.add_argument("config", nargs="?")
    tu.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    tu.add_argument(
        "--resume", action="store_true", help="continue an interrupted search of the same name"
    )
    for parser in (t, tu):
        parser.add_argument(
            "--release",
            metavar="SERVE_CONFIG",
            help="then canary-release the published version on that running server "
            "(its `release:` ramp and gates)",
        )

    m = sub.add_parser(
        "merge", help="merge an adapter into its (dequantized) base; writes safetensors"
    )
    m.add_argument("adapter")
    m.add_argument("--out", required=True)
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    s = sub.add_parser(
        "serve",
        help="serve adapters and A/B experiments over OpenAI-compatible HTTP (Ray Serve + vLLM)",
        description="lorafleet serve [CONFIG] [KEY=VALUE ...]  |  "
        "lorafleet serve set-weights CONFIG EXPERIMENT VARIANT=WEIGHT ... [--url URL]  |  "
        "lorafleet serve eval CONFIG MODEL DATA.jsonl [--url URL] [--limit N]",
    )
    s.add_argument("words", nargs="*", metavar="ARG")
    s.add_argument("--url", help="set-weights, eval: the server (default: http.host:http.port)")
    s.add_argument("--limit", type=int, help="eval: score the first N rows only")

    d = sub.add_parser(
        "demo", help="the embedded default: tiny base, two tasks, base vs adapter table"
    )
    d.add_argument("config", nargs="?", default="configs/demo.yaml")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    d.add_argument("--json", action="store_true", help="also print the report as JSON")

    parsers = {
        "validate": v,
        "train": t,
        "tune": tu,
        "merge": m,
        "serve": s,
        "demo": d,
    }
    return p, parsers | _eval_parsers(sub) | _cluster_parsers(sub) | _store_parsers(sub)


def _eval_parsers(sub) -> dict[str, argparse.ArgumentParser]:
    """`eval`: base vs adapters on held-out rows; every setting is an `eval.*` override."""
    ev = sub.add_parser(
        "eval",
        help="base vs each adapter on held-out rows (loss, perplexity, exact match, F1, "
        "ROUGE-L, BLEU) and a forgetting check; table, JSON and chart",
    )
    ev.add_argument("config", nargs="?")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. eval.limit=50")
    return {"eval": ev}


def _store_parsers(sub) -> dict[str, argparse.ArgumentParser]:
    """`adapters`: the command that reads and moves the adapter store's versions."""
    ad = sub.add_parser(
        "adapters",
        help="list adapter versions; promote one or roll back (served within seconds)",
        description="lorafleet adapters list | show NAME | promote NAME VERSION | rollback NAME "
        "[--root ROOT | --config CONFIG]",
    )
    ad.add_argument("action", choices=ADAPTER_ACTIONS)
    ad.add_argument("args", nargs="*", metavar="NAME [VERSION]")
    ad.add_argument(
        "--root", help="storage root (default: $LORAFLEET_STORAGE_ROOT, else lorafleet-runs)"
    )
    ad.add_argument("--config", help="take storage.root from this job or serve config")
    r = sub.add_parser(
        "release",
        help="canary-release an adapter version on a running server: ramp, promote or roll back",
        description="lorafleet release [start] CONFIG [KEY=VALUE ...] [--no-follow]  |  "
        "lorafleet release status CONFIG [ADAPTER] [--follow]  |  "
        "lorafleet release abort|pause|resume CONFIG ADAPTER  |  "
        "lorafleet release plan CONFIG [KEY=VALUE ...] [--rewards-per-s R]",
    )
    r.add_argument("words", nargs="*", metavar="ARG")
    r.add_argument("--url", help="the server (default: http.host:http.port)")
    r.add_argument("--no-follow", action="store_true", help="start: return once it has started")
    r.add_argument("--follow", action="store_true", help="status: follow it until it ends")
    r.add_argument("--rewards-per-s", type=float, help="plan: the feedback rate, to show minutes")
    return {"adapters": ad, "release": r}


def _cluster_parsers(sub) -> dict[str, argparse.ArgumentParser]:
    """`submit` and `doctor`: the commands that talk to a cluster rather than run a job here."""
    sb = sub.add_parser(
        "submit",
        help="run train, tune or serve on a Ray cluster as a Ray job; follow its logs",
        description="lorafleet submit train|tune|serve CONFIG [KEY=VALUE ...] [--address URL] "
        "[--env NAME ...] [--no-follow]",
    )
    sb.add_argument("what", choices=["train", "tune", "serve"])
    sb.add_argument("words", nargs="*", metavar="CONFIG|KEY=VALUE")
    sb.add_argument(
        "--address", help="the cluster's job server (default: $RAY_ADDRESS, else :8265 here)"
    )
    sb.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this environment variable to the job (repeatable)",
    )
    sb.add_argument("--no-follow", action="store_true", help="print the job id and return at once")

    dr = sub.add_parser(
        "doctor", help="preflight checks of the cluster a config points to (or a local Ray)"
    )
    dr.add_argument("words", nargs="*", metavar="CONFIG|KEY=VALUE")
    pl = sub.add_parser(
        "plan",
        help="estimated peak memory per GPU (or CPU worker) of a job, and whether it fits",
        description="lorafleet plan CONFIG [KEY=VALUE ...] [--gpu NAME | --gpu-gib N]",
    )
    pl.add_argument("words", nargs="*", metavar="CONFIG|KEY=VALUE")
    pl.add_argument("--gpu", help="check this GPU only, e.g. A100-80GB, L4-24GB (default: all)")
    pl.add_argument("--gpu-gib", type=float, help="check a GPU of this many GiB")
    return {"submit": sb, "doctor": dr, "plan": pl}


def _split_words(p, words: list[str], default: str | None) -> tuple[str, list[str]]:
    """CONFIG and KEY=VALUE overrides from the positional words, in any order."""
    configs = [w for w in words if "=" not in w]
    overrides = [w for w in words if "=" in w]
    if len(configs) > 1:
        p.error(f"expected one CONFIG and KEY=VALUE overrides. Got {configs!r}")
    if not configs and default is None:
        p.error("expected a CONFIG file")
    return (configs[0] if configs else default), overrides


def _weights(p, pairs: list[str]) -> dict[str, float]:
    weights = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            sep = ""
        if not (sep and name):
            p.error(f"expected VARIANT=WEIGHT (a number). Got {pair!r}")
    return weights


def _serve_invocation(p, a) -> Invocation:
    words = a.words
    action = words[0] if words and words[0] in SERVE_ACTIONS else None
    if action is None:
        if a.url is not None or a.limit is not None:
            p.error("--url and --limit are for `serve set-weights` and `serve eval`")
        config, overrides = _split_words(p, words, "configs/serve-demo.yaml")
        return Invocation("serve", {"config": config, "overrides": overrides})
    if action == "set-weights":
        if a.limit is not None:
            p.error("--limit is for `serve eval`")
        if len(words) < 4:
            p.error("usage: lorafleet serve set-weights CONFIG EXPERIMENT VARIANT=WEIGHT ...")
        params = {"config": words[1], "experiment": words[2], "weights": _weights(p, words[3:])}
        return Invocation("serve set-weights", params | {"url": a.url})
    if len(words) != 4:
        p.error("usage: lorafleet serve eval CONFIG MODEL DATA.jsonl [--url URL] [--limit N]")
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit must be at least 1. Got {a.limit}")
    params = {"config": words[1], "model": words[2], "data": words[3]}
    return Invocation("serve eval", params | {"url": a.url, "limit": a.limit})


RELEASE_ACTIONS = ("start", "status", "abort", "pause", "resume", "plan")


def _release_invocation(p, a) -> Invocation:
    words = list(a.words)
    action = words.pop(0) if words and words[0] in RELEASE_ACTIONS else "start"
    if action == "start":
        config, overrides = _split_words(p, words, None)
        params = {"config": config, "overrides": overrides, "adapter": None}
        return Invocation(
            "release", params | {"action": action, "url": a.url, "follow": not a.no_follow}
        )
    if action == "plan":  # sizes the ramp from the config alone: no server
        config, overrides = _split_words(p, words, None)
        params = {"config": config, "overrides": overrides, "adapter": None, "url": None}
        return Invocation(
            "release",
            params | {"action": action, "follow": False, "rewards_per_s": a.rewards_per_s},
        )
    if not 1 <= len(words) <= 2 or (action != "status" and len(words) != 2):
        p.error(
            f"usage: lorafleet release {action} CONFIG {'[ADAPTER]' if action == 'status' else 'ADAPTER'}"
        )
    params = {"config": words[0], "overrides": [], "adapter": words[1] if len(words) > 1 else None}
    return Invocation("release", params | {"action": action, "url": a.url, "follow": a.follow})


def parse(argv: list[str] | None = None) -> Invocation:
    """The command a command line asks for, and what it would run with; nothing runs. Flags may
    stand anywhere among the words (argparse's intermixed parsing): `set-weights C E a=1 --url U
    b=2` sets both weights. A usage error exits 2 with argparse's message."""
    argv = sys.argv[1:] if argv is None else list(argv)
    top, parsers = build_parsers()
    if not argv or argv[0] not in parsers:
        # --help, no command or an unknown one: argparse says which and exits
        top.parse_args(argv)
        top.error("expected a command first")
    command = argv[0]
    p = parsers[command]
    a = p.parse_intermixed_args(argv[1:])
    if command == "serve":
        return _serve_invocation(p, a)
    if command == "validate":
        configs = [w for w in a.config if "=" not in w]
        if not configs:
            p.error("expected at least one CONFIG file")
        overrides = a.overrides + [w for w in a.config if "=" in w]
        return Invocation(
            "validate", {"configs": configs, "overrides": overrides, "print_config": a.print}
        )
    if command == "submit":
        config, overrides = _split_words(p, a.words, None)
        params = {"command": a.what, "config": config, "overrides": overrides}
        return Invocation(
            "submit", params | {"address": a.address, "env": a.env, "follow": not a.no_follow}
        )
    if command == "plan":
        config, overrides = _split_words(p, a.words, None)
        params = {"config": config, "overrides": overrides}
        return Invocation("plan", params | {"gpu": a.gpu, "gpu_gib": a.gpu_gib})
    if command == "doctor":
        config, overrides = _split_words(p, a.words, "")
        return Invocation("doctor", {"config": config or None, "overrides": overrides})
    if command == "release":
        return _release_invocation(p, a)
    if command == "adapters":
        want = ADAPTER_ACTIONS[a.action]
        if len(a.args) != len(want):
            p.error(f"usage: lorafleet adapters {' '.join((a.action, *want))} [--root ROOT]")
        words = dict(zip(want, a.args, strict=True))
        params = {"action": a.action, "name": words.get("NAME"), "version": words.get("VERSION")}
        return Invocation("adapters", params | {"root": a.root, "config": a.config})
    if command == "merge":
        return Invocation("merge", {"adapter": a.adapter, "out": a.out, "dtype": a.dtype})
    words = ([a.config] if a.config else []) + a.overrides
    config, overrides = _split_words(p, words, "configs/demo.yaml" if command == "demo" else None)
    params = {"config": config, "overrides": overrides}
    if command == "demo":
        return Invocation("demo", params | {"json_report": a.json})
    if command == "eval":
        return Invocation("eval", params)
    return Invocation(command, params | {"resume": a.resume, "release": a.release})


def main(argv: list[str] | None = None) -> int:
    try:
        inv = parse(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code
    ray_was_running = _ray_running()
    try:
        return COMMANDS[inv.command](**inv.params)
    except LorafleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    finally:
        if not ray_was_running and _ray_running():
            # the local Ray this command started goes with it, every process of it (a cluster
            # it joined stays up)
            from cluster.ray_connect import stop_local_ray

            stop_local_ray()


def entry() -> None:
    """The `lorafleet` command: main(), then a hard exit after Ctrl-C. The interrupted job's
    thread may still be inside Ray while the interpreter tears down, and Ray aborts the process
    when that thread touches the core worker main() already shut down (seen: exit 134 instead
    of 130 after a Ctrl-C in `lorafleet tune`). By then the message is printed and the local Ray
    stopped, so nothing is lost by leaving at once."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    entry()
