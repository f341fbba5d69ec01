"""The `lorafleet` command.

    lorafleet demo                                   # the embedded default, end to end
    lorafleet train configs/demo.yaml training.max_steps=50
    lorafleet tune configs/tune-demo.yaml
    lorafleet validate configs/*.yaml
    lorafleet merge lorafleet-runs/adapters/demo-last --out merged/
    lorafleet serve configs/serve-demo.yaml          # OpenAI-compatible HTTP on 127.0.0.1:8000
    lorafleet serve set-weights configs/serve-demo.yaml word-bot last-word=50 swap-words=50
    lorafleet serve eval configs/serve-demo.yaml tiny-demo:demo-last lorafleet-runs/demo/data/last/test.jsonl

Each command imports its package lazily, so `lorafleet validate` stays fast and `cluster`
depends on nothing of ours at import time.
"""

from __future__ import annotations

import argparse
import json
import sys

from cluster.config import ConfigError, dump_config, load_config, schema_for


def _cmd_validate(args) -> int:
    bad = 0
    for path in args.config:
        try:
            cfg = load_config(path, args.overrides, schema_for(path))
        except ConfigError as e:
            print(e, file=sys.stderr)
            bad += 1
            continue
        print(f"{path}: ok" if not args.print else dump_config(cfg))
    return 2 if bad else 0


def _cmd_train(args) -> int:
    from train.trainer import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume)
    last = summary["history"][-1] if summary["history"] else {}
    print(
        f"[done] {cfg.name}: {len(summary['history'])} reports, final loss {last.get('loss', float('nan')):.4f}"
        + (f", eval_loss {last['eval_loss']:.4f}" if "eval_loss" in last else "")
        + f", {summary['seconds']:.0f}s; adapter at {summary['adapter']}"
    )
    return 0


def _cmd_tune(args) -> int:
    from tune.tuner import tune_job

    tune_job(load_config(args.config, args.overrides), resume=args.resume)
    return 0


def _cmd_merge(args) -> int:
    from train.export import merge_adapter

    merge_adapter(args.adapter, args.out, dtype=args.dtype)
    return 0


def _cmd_serve(args) -> int:
    from cluster.config import ServeAppConfig

    words = list(args.args)
    if words and words[0] == "set-weights":
        if len(words) < 4:
            print(
                "usage: lorafleet serve set-weights CONFIG EXPERIMENT VARIANT=WEIGHT ...",
                file=sys.stderr,
            )
            return 2
        cfg = load_config(words[1], schema=ServeAppConfig)
        return _set_weights(cfg, words[2], words[3:], args.url)
    if words and words[0] == "eval":
        if len(words) != 4:
            print(
                "usage: lorafleet serve eval CONFIG MODEL DATA.jsonl [--limit N]", file=sys.stderr
            )
            return 2
        cfg = load_config(words[1], schema=ServeAppConfig)
        return _eval(cfg, words[2], words[3], args.url, args.limit)
    cfg = load_config(words[0] if words else "configs/serve-demo.yaml", words[1:], ServeAppConfig)
    from serve.app import run

    run(cfg, blocking=True)
    return 0


def _client_key(cfg) -> str | None:
    """The key a client command sends: the first of the server's keys, from the environment
    variable or else the key file the config names (never from YAML)."""
    return next(iter(cfg.http.api_keys(missing_file_ok=True)), None)


def _set_weights(cfg, experiment: str, pairs: list[str], url: str | None) -> int:
    """PUT /v1/experiments/<name> on the running app (the key from the environment or key file)."""
    import urllib.error
    import urllib.request

    weights = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            weights[name] = float(value) if sep else None
        except ValueError:
            weights[name] = None
        if weights[name] is None:
            print(f"error: expected VARIANT=WEIGHT (a number). Got {pair!r}", file=sys.stderr)
            return 2
    base = url or f"http://{cfg.http.host}:{cfg.http.port}"
    headers = {"Content-Type": "application/json"}
    key = _client_key(cfg)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        f"{base}/v1/experiments/{experiment}",
        data=json.dumps({"weights": weights}).encode(),
        headers=headers,
        method="PUT",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            print(json.dumps(json.loads(r.read()), indent=2))
            return 0
    except urllib.error.HTTPError as e:
        print(f"error: HTTP {e.code}: {e.read().decode()}", file=sys.stderr)
    except urllib.error.URLError as e:
        print(f"error: no lorafleet server at {base}: {e.reason}", file=sys.stderr)
    return 1


def _eval(cfg, model: str, data: str, url: str | None, limit: int | None) -> int:
    """Exact match of a served model on held-out rows, through the running server."""

    import requests

    from serve.eval import exact_match, read_rows

    if limit is not None and limit < 1:
        print(f"error: --limit must be at least 1. Got {limit}", file=sys.stderr)
        return 2
    try:
        rows = read_rows(data, limit)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = url or f"http://{cfg.http.host}:{cfg.http.port}"
    try:
        res = exact_match(
            base, model, rows, key=_client_key(cfg), log=lambda m: print(m, file=sys.stderr)
        )
    except requests.ConnectionError:
        print(f"error: no lorafleet server at {base}", file=sys.stderr)
        return 1
    except (RuntimeError, requests.RequestException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    split = "".join(
        f"; variant {v}: {r['exact_match']:.1%} on {r['rows']}" for v, r in res["variants"].items()
    )
    print(f"{model}: exact match {res['exact_match']:.1%} on {res['rows']} rows of {data}{split}")
    return 0


def _cmd_demo(args) -> int:
    from train.demo import run_demo

    report = run_demo(args.config, args.overrides)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafleet", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check config files (all problems at once)")
    v.add_argument("config", nargs="+")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--print", action="store_true", help="print the full config with defaults")
    v.set_defaults(fn=_cmd_validate)

    t = sub.add_parser("train", help="fine-tune an adapter with QLoRA on Ray Train")
    t.add_argument("config")
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
    t.set_defaults(fn=_cmd_train)

    tu = sub.add_parser(
        "tune", help="search hyperparameters (tune.space) with Ray Tune; publish the best adapter"
    )
    tu.add_argument("config")
    tu.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    tu.add_argument(
        "--resume", action="store_true", help="continue an interrupted search of the same name"
    )
    tu.set_defaults(fn=_cmd_tune)

    m = sub.add_parser(
        "merge", help="merge an adapter into its (dequantized) base; writes safetensors"
    )
    m.add_argument("adapter")
    m.add_argument("--out", required=True)
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.set_defaults(fn=_cmd_merge)

    s = sub.add_parser(
        "serve",
        help="serve adapters and A/B experiments over OpenAI-compatible HTTP (Ray Serve + vLLM)",
        description="lorafleet serve [CONFIG] [KEY=VALUE ...]  |  "
        "lorafleet serve set-weights CONFIG EXPERIMENT VARIANT=WEIGHT ...  |  "
        "lorafleet serve eval CONFIG MODEL DATA.jsonl",
    )
    s.add_argument("args", nargs="*", metavar="ARG")
    s.add_argument("--url", help="set-weights, eval: the server (default: http.host:http.port)")
    s.add_argument("--limit", type=int, help="eval: score the first N rows only")
    s.set_defaults(fn=_cmd_serve, overrides=[])

    d = sub.add_parser(
        "demo", help="the embedded default: tiny base, two tasks, base vs adapter table"
    )
    d.add_argument("config", nargs="?", default="configs/demo.yaml")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    d.add_argument("--json", action="store_true", help="also print the report as JSON")
    d.set_defaults(fn=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # a flag among the KEY=VALUE overrides (`train x.yaml --resume a.b=1`) ends argparse's
    # positional list; the overrides after it come back here
    if extra and (
        not hasattr(args, "overrides") or any("=" not in x or x.startswith("-") for x in extra)
    ):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from train.data import DataError
        from train.export import AdapterError

        if isinstance(e, DataError | AdapterError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
