"""ASHA against running every trial to completion, for several scheduler settings in one run.

    .venv/bin/python -m bench.tune_asha            # the FIFO anchor, then every setting in SETTINGS
    .venv/bin/python -m bench.tune_asha --only fifo asha-g5-rf3

The same space, seed and trials (12, 2 at a time, 90 steps, eval every 5) as `bench.run
tune_asha`. Compute is counted in trial steps (every trial's last reported step, summed), so
machine load does not change it. Targets: compute ratio (FIFO steps / setting's steps) >= 3 and
best eval loss within 2% of FIFO's best. Each setting is also replayed on the FIFO run's own
curves (ASHA's rung rule applied to the finished trials in the order Tune started them): what
the setting would do if every trial reported the same numbers again, which separates the
setting from the run-to-run noise of a real search. The table, the curves and the replay go to
bench/results/tune_asha.{txt,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/tune_asha.py` too

from bench.common import ROOT, demo_cfg  # noqa: E402

MAX_STEPS = 90
COMPUTE_TARGET = 3.0
LOSS_TARGET = 1.02

# label -> tune.* overrides. The first is the setting `bench.run tune_asha` measures today.
SETTINGS = {
    # chosen from the replay of many settings on the FIFO curves (see replay()):
    # the two fastest (the only ones that replay at >= 3x less compute) ...
    "asha-g10-rf9": {
        "tune.scheduler": "asha",
        "tune.grace_period_steps": 10,
        "tune.reduction_factor": 9,
    },
    "hyperband-g5-rf2-b2": {
        "tune.scheduler": "hyperband",
        "tune.grace_period_steps": 5,
        "tune.reduction_factor": 2,
        "tune.brackets": 2,
    },
    # ... the fastest that keeps the best trial ...
    "asha-g5-rf2": {
        "tune.scheduler": "asha",
        "tune.grace_period_steps": 5,
        "tune.reduction_factor": 2,
    },
    # ... and the setting `bench.run tune_asha` measures today
    "asha-g5-rf3": {
        "tune.scheduler": "asha",
        "tune.grace_period_steps": 5,
        "tune.reduction_factor": 3,
    },
}


def base_config(tmp: Path):
    return demo_cfg(
        tmp,
        **{
            "training.max_steps": MAX_STEPS,
            "training.eval_every_steps": 5,
            "training.eval_max_batches": 4,
            "training.keep_checkpoints": 1,
            "scaling.resources_per_worker": {"CPU": 1},
            "tune.num_samples": 12,
            "tune.max_concurrent_trials": 2,
            "tune.search": "random",
            "tune.seed": 7,
            "tune.space": {
                "training.learning_rate": {"loguniform": [1e-5, 3e-3]},
                "adapter.r": {"choice": [4, 8, 16]},
            },
        },
    )


def _trial_key(overrides: dict) -> str:
    return f"lr={overrides['training.learning_rate']:.3g} r={overrides['adapter.r']}"


def run_search(base, label: str, over: dict) -> dict:
    """One real search; its trials in the order Tune started them, with their curves."""
    from cluster.config.validation import with_overrides
    from tune.tuner import tune_job

    cfg = with_overrides(base, {"name": f"bench-{label}", **over})
    # hyperband assigns trials to brackets with numpy's global generator: seed it, so every
    # run of the bench gives the same trials the same brackets
    np.random.seed(0)
    out = tune_job(cfg, log=lambda *_: None)
    trials = [
        {
            "trial": r["trial"],
            "key": _trial_key(r["overrides"]),
            "steps": r["steps"],
            "best": r["best"],
            "curve": r["curve"],
        }
        for r in sorted(out["rows"], key=lambda r: str(r["trial"]))
    ]
    return {
        "label": label,
        "overrides": over,
        "steps": sum(t["steps"] for t in trials),
        "best": out["best"]["best"],
        "best_trial": _trial_key(out["best"]["overrides"]),
        "seconds": out["seconds"],
        "trials": trials,
    }


def replay(anchor: dict, over: dict, concurrent: int = 2, start_cost_steps: int = 30) -> dict:
    """ASHA's rung rule (ray.tune.schedulers.async_hyperband._Bracket.on_result) applied to the
    anchor's finished curves: trials start in the anchor's order, `concurrent` at a time, each
    costing `start_cost_steps` of wall time to start (a controller and a worker group) and one
    per step; a trial stops at the first rung where its loss is worse than the (1 - 1/rf)
    quantile of the losses recorded there before it. With several brackets, trial i goes to
    bracket i % brackets (Ray draws it at random)."""
    g = over.get("tune.grace_period_steps", 5)
    rf = over.get("tune.reduction_factor", 3)
    n = over.get("tune.brackets", 3 if over.get("tune.scheduler") == "hyperband" else 1)
    milestones = [
        [g * rf ** (k + s) for k in range(int(np.log(MAX_STEPS / g) / np.log(rf) - s + 1))]
        for s in range(n)
    ]
    trials = anchor["trials"]
    stopped: dict[int, int] = {}
    for _ in range(len(trials) + 1):  # stop times move start times: iterate until they settle
        events = _timeline(trials, stopped, concurrent, start_cost_steps)
        decided = _decide(events, milestones, rf)
        if decided == stopped:
            break
        stopped = decided
    last = [stopped.get(i, MAX_STEPS) for i in range(len(trials))]
    best = min(loss for i, t in enumerate(trials) for step, loss in t["curve"] if step <= last[i])
    return {"steps": sum(last), "best": best}


def _timeline(trials, stopped, concurrent, start_cost) -> list[tuple]:
    free = [0.0] * concurrent
    events = []
    for i, t in enumerate(trials):
        slot = min(range(concurrent), key=lambda j: free[j])
        start = free[slot] + start_cost
        free[slot] = start + stopped.get(i, MAX_STEPS)
        events += [(start + step, i, step, loss) for step, loss in t["curve"]]
    return sorted(events)


def _decide(events, milestones, rf) -> dict:
    recorded = [{m: {} for m in ms} for ms in milestones]
    stopped: dict[int, int] = {}
    for _, i, step, loss in events:
        if i in stopped:
            continue
        b = i % len(milestones)
        for m in sorted(milestones[b], reverse=True):
            rec = recorded[b][m]
            if step < m or i in rec:
                continue
            if rec and loss > np.nanpercentile(list(rec.values()), 100 / rf):
                stopped[i] = step
            rec[i] = loss
            break
    return stopped


def table(anchor: dict, results: list[dict]) -> str:
    head = (
        "| setting | trial steps | compute ratio | best eval loss | loss ratio | targets "
        "| replayed on FIFO curves: steps, ratio, loss ratio | seconds |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    lines.append(
        f"| fifo (anchor) | {anchor['steps']} | 1.00 | {anchor['best']:.4f} | 1.000 | anchor | | "
        f"{anchor['seconds']:.0f} |"
    )
    for r in results:
        ratio, loss_ratio = anchor["steps"] / r["steps"], r["best"] / anchor["best"]
        met = ratio >= COMPUTE_TARGET and loss_ratio <= LOSS_TARGET
        rp = r["replay"]
        lines.append(
            f"| {r['label']} | {r['steps']} | {ratio:.2f} | {r['best']:.4f} | {loss_ratio:.3f} | "
            f"{'**met**' if met else 'missed'} | {rp['steps']}, {anchor['steps'] / rp['steps']:.2f}, "
            f"{rp['best'] / anchor['best']:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def curves_table(anchor: dict) -> str:
    """The anchor's trials: eval loss at each rung-relevant step, best at 90 first."""
    steps = [5, 10, 15, 20, 30, 45, 60, 90]
    lines = [
        "| trial (FIFO) | " + " | ".join(f"step {s}" for s in steps) + " |",
        "|---" * (len(steps) + 1) + "|",
    ]
    for t in sorted(anchor["trials"], key=lambda t: t["best"] or 9):
        at = dict(t["curve"])
        lines.append(
            f"| {t['key']} | " + " | ".join(f"{at[s]:.3f}" if s in at else "" for s in steps) + " |"
        )
    return "\n".join(lines)


def replay_grid(anchor: dict) -> str:
    """Every (grace, factor, brackets) of a small grid replayed on the anchor's curves: which
    settings could meet both targets if the trials reported the same numbers again."""
    import itertools

    lines = [
        "| grace steps | reduction factor | brackets | trial steps | compute ratio | loss ratio | targets |",
        "|---|---|---|---|---|---|---|",
    ]
    for g, rf, b in itertools.product((5, 10, 15, 20, 30), (2, 3, 4, 5, 6, 9), (1, 2, 3)):
        over = {
            "tune.scheduler": "asha" if b == 1 else "hyperband",
            "tune.grace_period_steps": g,
            "tune.reduction_factor": rf,
            "tune.brackets": b,
        }
        r = replay(anchor, over)
        ratio, loss_ratio = anchor["steps"] / r["steps"], r["best"] / anchor["best"]
        met = ratio >= COMPUTE_TARGET and loss_ratio <= LOSS_TARGET
        lines.append(
            f"| {g} | {rf} | {b} | {r['steps']} | {ratio:.2f} | {loss_ratio:.3f} | "
            f"{'**met**' if met else 'missed'} |"
        )
    return "\n".join(lines)


def write_report(out: Path, anchor: dict, results: list[dict], seconds: float, note: str) -> str:
    text = (
        f"bench.tune_asha: 12 trials, 2 at a time, {MAX_STEPS} steps, eval every 5; "
        f"targets: compute ratio >= {COMPUTE_TARGET}, loss ratio <= {LOSS_TARGET}; "
        f"{seconds:.0f} s in all{note}\n\n"
        + table(anchor, results)
        + "\n\nThe FIFO anchor's curves (eval loss), best at step 90 first:\n\n"
        + curves_table(anchor)
        + "\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps({"anchor": anchor, "settings": results}, indent=1)
    )
    return text


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="settings to run (the FIFO anchor always runs)")
    ap.add_argument(
        "--anchor",
        help="the FIFO anchor from an earlier run's JSON instead of running it again "
        "(it is deterministic: same space, seed and trials give the same steps and losses)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tune_asha"))
    ap.add_argument(
        "--replay-grid",
        action="store_true",
        help="with --anchor: replay a grid of settings on the anchor's curves (no search runs)",
    )
    args = ap.parse_args(argv)
    if args.replay_grid:
        print(replay_grid(json.loads(Path(args.anchor).read_text())["anchor"]))
        return 0
    chosen = {k: v for k, v in SETTINGS.items() if not args.only or k in args.only}
    t0 = time.time()
    out = Path(args.out)
    note = f"; FIFO anchor read from {args.anchor}" if args.anchor else ""
    with tempfile.TemporaryDirectory() as tmp:
        base = base_config(Path(tmp))
        if args.anchor:
            anchor = json.loads(Path(args.anchor).read_text())["anchor"]
        else:
            anchor = run_search(base, "fifo", {"tune.scheduler": "fifo"})
        print(f"fifo: {anchor['steps']} steps, best {anchor['best']:.4f} ({anchor['best_trial']})")
        print(curves_table(anchor), flush=True)
        results = []
        for label, over in chosen.items():
            r = run_search(base, label, over)
            r["replay"] = replay(anchor, over)
            print(
                f"{label}: {r['steps']} steps, best {r['best']:.4f} ({r['best_trial']})", flush=True
            )
            results.append(r)
            write_report(out, anchor, results, time.time() - t0, note)  # what is done so far
    print("\n" + write_report(out, anchor, results, time.time() - t0, note))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
