"""The `lorafleet` command.

    lorafleet demo                                   # the embedded default, end to end
    lorafleet train configs/demo.yaml training.max_steps=50
    lorafleet tune configs/tune-demo.yaml
    lorafleet eval configs/demo.yaml                 # base vs adapters: held-out + forgetting
    lorafleet validate configs/*.yaml
    lorafleet merge lorafleet-runs/adapters/demo-last --out merged/
    lorafleet adapters list | show NAME | promote NAME VERSION | rollback NAME | reindex  [--root ROOT]
    lorafleet adapters import NAME ./peft-folder|s3://...|org/hub-id --base BASE    # checked, published
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
import os
import sys
from dataclasses import dataclass, field

from cluster.cli.commands import COMMANDS, Interrupted, package_version, ray_running
from cluster.errors import LorafleetError

SERVE_ACTIONS = ("set-weights", "eval")
# each adapters action and the words it takes after itself
ADAPTER_ACTIONS = {
    "list": (),
    "show": ("NAME",),
    "promote": ("NAME", "VERSION"),
    "rollback": ("NAME",),
    "reindex": (),
    "import": ("NAME", "SOURCE"),
}


@dataclass(frozen=True)
class Invocation:
    """What one command line asks for: the command and the arguments its function runs with."""

    command: str
    params: dict = field(default_factory=dict)


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
        "| reindex | import NAME PATH|s3://...|HUB_ID [--base BASE] [--candidate] "
        "[--root ROOT | --config CONFIG]",
    )
    ad.add_argument("action", choices=ADAPTER_ACTIONS)
    ad.add_argument("args", nargs="*", metavar="NAME [VERSION|SOURCE]")
    ad.add_argument(
        "--base",
        help="import: the base it will be served on (a folder, tiny://NAME, a hub id; default: "
        "the --config serve file's one model, else the base the adapter names)",
    )
    ad.add_argument(
        "--candidate",
        action="store_true",
        help="import: publish without moving `current` (for `lorafleet release`)",
    )
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
        if a.action == "import":
            params |= {"source": words["SOURCE"], "base": a.base, "candidate": a.candidate}
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
    ray_was_running = ray_running()
    try:
        return COMMANDS[inv.command](**inv.params)
    except LorafleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    finally:
        if not ray_was_running and ray_running():
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
