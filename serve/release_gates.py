"""The gates of a canary release step (serve/release.py ticks them every second): the error rate
and the outcome gate are sequential tests (serve/sequential.py), valid however often they are
read; the p99 rule is read once at the end of each step's hold. `gate_decision` and `step_action`
are plain functions of numbers that also work on numpy arrays, so bench/release_sim.py runs
thousands of simulated releases through the very rules the tick applies.

    python bench/release_sim.py
"""

from __future__ import annotations

import functools
import json
import math
import time

import numpy as np

from cluster.config.release import ReleaseConfig
from serve.sequential import (
    ERROR_METHOD,
    METHOD,
    NOT_WORSE,
    UNDECIDED,
    WORSE,
    error_rate_exceeds,
    noninferiority,
)

ARMS = ("control", "candidate")
# latency histogram bounds (s) for the p99 gate: 5 ms up, 25% apart, to 2 minutes
LATENCY_BOUNDS = [0.005 * 1.25**i for i in range(46)]


def latency_bucket(seconds: float) -> str:
    """The counter key of a latency: `lat_<i>`, i the first bound at or above it."""
    for i, bound in enumerate(LATENCY_BOUNDS):
        if seconds <= bound:
            return f"lat_{i:02d}"
    return f"lat_{len(LATENCY_BOUNDS):02d}"


def p99(counts: dict) -> float | None:
    """The 99th percentile latency (an upper bound, to 25%) from `lat_<i>` counters."""
    n = sum(v for k, v in counts.items() if k.startswith("lat_"))
    if not n:
        return None
    seen = 0
    for i in range(len(LATENCY_BOUNDS) + 1):
        seen += counts.get(f"lat_{i:02d}", 0)
        if seen >= 0.99 * n:
            return LATENCY_BOUNDS[i] if i < len(LATENCY_BOUNDS) else math.inf
    return math.inf


def p99_too_slow(ctl: dict, cand: dict, ratio: float, alpha: float) -> tuple[bool, int]:
    """(the data show the candidate's p99 above `ratio` x the control's, how many of its requests
    are above that limit). Its p99 is above the limit exactly when more than 1% of its requests
    are, so this is the error-rate test on "slower than the limit" at 1%: on an identical
    candidate (whose share above the limit is below 1%) it fires at most alpha of the time, read
    as often as you like. Only buckets wholly above the limit count (their lower bound >= it)."""
    limit = ratio * p99(ctl)
    lat = {int(k[4:]): v for k, v in cand.items() if k.startswith("lat_")}
    lower = [0.0, *LATENCY_BOUNDS]  # bucket i holds (lower[i], LATENCY_BOUNDS[i]]
    above = sum(v for i, v in lat.items() if lower[min(i, len(LATENCY_BOUNDS))] >= limit)
    return bool(error_rate_exceeds(above, sum(lat.values()), 0.01, alpha)), above


def _rate(c: dict, key: str) -> float:
    return c.get(key, 0) / c["requests"] if c.get("requests") else 0.0


def outcome_on(release: dict, g) -> bool:
    """Whether the outcome gate reads this release: `outcome: true`, or `auto` once it has any
    reward (an app that sends no feedback ramps on errors and latency alone)."""
    if g.outcome == "auto":
        return any(release["outcomes"][a].get("n", 0) for a in ARMS)
    return bool(g.outcome)


def outcome_gate(release: dict, g) -> tuple[int, dict]:
    """(sequential.WORSE | UNDECIDED | NOT_WORSE, numbers): the sequential non-inferiority test
    of the candidate's mean reward against the control's, over the whole release
    (serve/sequential.py: `noninferiority`); UNDECIDED until each arm has `min_feedback`."""
    ctl, cand = (release["outcomes"][a] for a in ARMS)
    arms = [{k: a.get(k, 0) for k in ("n", "sum", "sumsq", "nonbinary")} for a in (ctl, cand)]
    verdict, diff, low, high = noninferiority(*arms, g.max_reward_drop, g.alpha, g.min_feedback)
    if min(ctl.get("n", 0), cand.get("n", 0)) < 1:
        return UNDECIDED, {
            "control_rewards": ctl.get("n", 0),
            "candidate_rewards": cand.get("n", 0),
        }
    numbers = {
        "control_rewards": ctl["n"],
        "candidate_rewards": cand["n"],
        "control_mean": round(ctl["sum"] / ctl["n"], 4),
        "candidate_mean": round(cand["sum"] / cand["n"], 4),
        "difference": round(float(diff), 4),
        "difference_low": round(float(low), 4),
        "difference_high": round(float(high), 4),
        "max_reward_drop": g.max_reward_drop,
        "test": METHOD,
    }
    return int(verdict), numbers


def window_numbers(release: dict) -> dict:
    """Requests, error rates and p99 of each arm in this step's counts (in a shadow step the
    candidate's are its mirrored answers', with their agreement with the control's)."""
    ctl, cand = release["window"]["control"], release["window"]["candidate"]
    numbers = {
        "candidate_requests": cand.get("requests", 0),
        "control_requests": ctl.get("requests", 0),
        "candidate_error_rate": round(_rate(cand, "errors"), 4),
        "control_error_rate": round(_rate(ctl, "errors"), 4),
        "candidate_p99_s": p99(cand),
        "control_p99_s": p99(ctl),
    }
    if cand.get("compared"):
        numbers["shadow_compared"] = cand["compared"]
        numbers["shadow_agreement"] = round(cand.get("agreed", 0) / cand["compared"], 4)
    return numbers


def in_shadow(release: dict) -> bool:
    """Whether the release is in its shadow step (before the ramp: no user on the candidate)."""
    return release.get("phase") == "shadow"


def current_step(release: dict, spec: ReleaseConfig):
    """The step being judged: the shadow step's settings, or the ramp step's."""
    return spec.shadow if in_shadow(release) else spec.steps[release["step"]]


def tests_per_release(spec: ReleaseConfig) -> int:
    """How many steps each sequential test runs in (its alpha is split over them)."""
    return len(spec.steps) + (1 if spec.shadow else 0)


GATE_SAYS = {
    "errors": "error rate > {g.max_error_rate} ({method}, alpha {a:.3g})",
    "outcome": "reward below the control's ({method}, alpha {g.alpha})",
    "p99": "p99 > {g.max_p99_ratio} x control's ({method} on requests above it, alpha {a:.3g})",
}


def gate_decision(elapsed_s, hold_s, enough, errors_high, outcome_active, verdict, p99_ok):
    """The step's decision from its gates: 'fail_errors' | 'fail_outcome' | 'fail_p99' | 'not_yet'
    (inside the hold) | 'hold' (too few requests) | 'wait' (no outcome evidence yet) | 'pass'.
    The order is the rule: the two sequential tests may fail a step at any tick; the rest is
    read once its hold is over. Works on numpy arrays (bench/release_sim.py) as on scalars."""
    return np.select(
        [
            enough & errors_high,
            outcome_active & (verdict == WORSE),
            elapsed_s < hold_s,
            ~np.asarray(enough),
            ~np.asarray(p99_ok),
            outcome_active & (verdict != NOT_WORSE),
        ],
        ["fail_errors", "fail_outcome", "not_yet", "hold", "fail_p99", "wait"],
        "pass",
    )


def step_action(decision, held, waited_s, hold_s, max_wait_s, last, on_timeout: str):
    """What the tick does with a decision: 'rollback' | 'advance' | 'promote' | 'hold' (the
    step restarts its hold) | 'wait' (it goes on) | 'timeout_<rollback|advance|promote>' (no
    outcome evidence within max_wait_s after the hold: `on_timeout`) | 'none'. Arrays too."""
    forward = np.where(last, "promote", "advance")
    timeout = np.where(last, "timeout_promote", "timeout_advance")
    timeout = timeout if on_timeout == "promote" else "timeout_rollback"
    return np.select(
        [
            np.char.startswith(np.asarray(decision, dtype=str), "fail"),
            decision == "pass",
            (decision == "hold") & ((held + 1) * hold_s >= max_wait_s),
            decision == "hold",
            (decision == "wait") & (waited_s >= max_wait_s),
            decision == "wait",
        ],
        ["rollback", forward, "rollback", "hold", timeout, "wait"],
        "none",
    )


def judge(release: dict, now: float | None = None) -> tuple[str | None, dict]:
    """(a `gate_decision`, or None inside the hold; numbers): the gates at time `now`."""
    now = time.time() if now is None else now
    spec = release_spec(release)
    g, step = spec.gates, current_step(release, spec)
    ctl, cand = release["window"]["control"], release["window"]["candidate"]
    numbers = window_numbers(release)
    requests = cand.get("requests", 0)
    a_errors = g.alpha / tests_per_release(spec)  # one test per step: alpha over the release
    errors_high = bool(
        error_rate_exceeds(cand.get("errors", 0), requests, g.max_error_rate, a_errors)
    )
    # no user sees a shadow answer, so none rewards one: the outcome gate starts with the ramp
    active, verdict = outcome_on(release, g) and not in_shadow(release), UNDECIDED
    if active:
        verdict, more = outcome_gate(release, g)
        numbers |= more
    ratio_ok = True
    if numbers["control_p99_s"] is not None and ctl.get("requests", 0) >= g.min_requests:
        slow, above = p99_too_slow(ctl, cand, g.max_p99_ratio, a_errors)
        ratio_ok, numbers["candidate_above_p99_limit"] = not slow, above
    elapsed = now - release["step_started"]
    enough = requests >= g.min_requests
    decision = str(
        gate_decision(elapsed, step.hold_s, enough, errors_high, active, verdict, ratio_ok)
    )
    if decision.startswith("fail_"):
        method = METHOD if decision == "fail_outcome" else ERROR_METHOD
        numbers["gate"] = GATE_SAYS[decision[5:]].format(g=g, a=a_errors, method=method)
    return (None if decision == "not_yet" else decision), numbers


@functools.lru_cache(maxsize=256)
def _parsed_spec(spec_json: str) -> ReleaseConfig:
    return ReleaseConfig.model_validate_json(spec_json)


def release_spec(release: dict) -> ReleaseConfig:
    """The release's validated spec, parsed once per distinct spec (the tick reads it often)."""
    return _parsed_spec(json.dumps(release["spec"], sort_keys=True))
