"""Simulated canary releases through the release's own decision rules: how often each gate
rolls back an identical candidate, promotes a worse one, and how long it takes.

    python bench/release_sim.py                 # 1000 releases a row, default gates and ramp
    python bench/release_sim.py --releases 200 --check 5

Each row runs `--releases` releases of the default `release:` section (ramp 5/25/50/100%,
300 s each; gates as in cluster/config/release.py) second by second, as the ReleaseManager
ticks: users send requests (twice the reward rate, 1% errors on both arms), half of the answers
get a 0/1 reward, the control's rewards are 1 with probability 0.5, the candidate's 0.5 plus its
shift in margins (`gates.max_reward_drop`). The releases of a row run side by side on numpy
arrays through `gate_decision` and `step_action` (serve/release_gates.py) and the sequential
tests (serve/sequential.py): the same functions `Releases.tick` calls. `--check N` also runs
the first N releases of each row through a real `Releases` (its `tick(now)` on a store in a
temporary folder), fed the same random numbers, and fails unless every one ends the same way at
the same second.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.config.release import ReleaseConfig  # noqa: E402
from serve.release_gates import gate_decision, step_action  # noqa: E402
from serve.sequential import error_rate_exceeds, noninferiority  # noqa: E402

SLOTS = 20  # request slots a second: a slot holds a request with probability req_rate / SLOTS
CONTROL_MEAN, ERROR_RATE, FEEDBACK_SHARE = 0.5, 0.01, 0.5
SHIFTS = {"identical": 0.0, "worse by the margin": -1.0, "worse by 2x margin": -2.0, "better": 1.0}


def uniforms(seed: int, tick: int, releases: int) -> np.ndarray:
    """The random numbers of one second for every release: [release, slot, 5]."""
    return np.random.default_rng((seed, tick)).random((releases, SLOTS, 5))


def second(u: np.ndarray, pct, rate: float, means) -> dict:
    """One second of traffic from uniforms u [.., SLOTS, 5] at candidate share pct (per release):
    {arm: (requests, errors, rewards, reward sum)} per release."""
    request = u[..., 0] < 2 * rate / SLOTS
    cand = u[..., 1] < np.asarray(pct)[..., None]
    reward = request & (u[..., 2] < FEEDBACK_SHARE)
    error = request & (u[..., 4] < ERROR_RATE)
    out = {}
    for arm, on, mean in (("control", ~cand, means[0]), ("candidate", cand, means[1])):
        liked = reward & on & (u[..., 3] < mean)
        out[arm] = tuple(x.sum(axis=-1) for x in (request & on, error & on, reward & on, liked))
    return out


def simulate(spec: ReleaseConfig, rate: float, shift: float, releases: int, seed: int) -> dict:
    """Run `releases` releases side by side: {'end': per release 'promoted' | 'rolled back' |
    'timed out' (rolled back by on_timeout), 'at': the second it ended}."""
    g, steps = spec.gates, spec.steps
    percents = np.array([s.percent / 100 for s in steps])
    holds = np.array([s.hold_s for s in steps])
    means = (CONTROL_MEAN, CONTROL_MEAN + shift * g.max_reward_drop)
    r = releases
    step, started, held = np.zeros(r, int), np.zeros(r), np.zeros(r, int)
    win = {a: np.zeros((2, r)) for a in ("control", "candidate")}  # requests, errors
    out = {a: np.zeros((2, r)) for a in ("control", "candidate")}  # rewards, sum
    end, at = np.full(r, "", dtype=object), np.zeros(r)
    live = np.arange(r)
    horizon = int(sum(holds) + len(steps) * (g.max_wait_s + holds.max())) + 2
    for t in range(1, horizon):
        if not len(live):
            break
        u = uniforms(seed, t, r)[live]
        for arm, (req, err, n, liked) in second(u, percents[step[live]], rate, means).items():
            win[arm][:, live] += (req, err)
            out[arm][:, live] += (n, liked)
        action = decide(g, steps, t, live, step, started, held, win, out)
        for name in ("rollback", "promote", "timeout_rollback", "timeout_promote"):
            hit = live[action == name]
            end[hit] = {"rollback": "rolled back", "timeout_rollback": "timed out"}.get(
                name, "promoted"
            )
            at[hit] = t
        moved = live[np.isin(action, ("advance", "timeout_advance"))]
        step[moved] += 1
        started[moved], held[moved] = t, 0
        for a in win.values():
            a[:, moved] = 0
        restarted = live[action == "hold"]
        held[restarted] += 1
        started[restarted] = t
        live = live[end[live] == ""]
    end[end == ""] = "unfinished"
    return {"end": end, "at": at}


def decide(g, steps, t, live, step, started, held, win, out) -> np.ndarray:
    """`step_action` of every live release at second t, by the rules `Releases.tick` applies."""
    hold = np.array([s.hold_s for s in steps])[step[live]]
    req, err = win["candidate"][:, live]
    enough = req >= g.min_requests
    high = error_rate_exceeds(err, req, g.max_error_rate, g.alpha / len(steps))
    arms = [
        {"n": out[a][0, live], "sum": out[a][1, live], "sumsq": out[a][1, live], "nonbinary": 0}
        for a in ("control", "candidate")
    ]
    on = (arms[0]["n"] + arms[1]["n"] > 0) if g.outcome == "auto" else np.full(len(live), g.outcome)
    verdict = noninferiority(*arms, g.max_reward_drop, g.alpha, g.min_feedback)[0]
    elapsed = t - started[live]
    decision = gate_decision(elapsed, hold, enough, high, on, verdict, True)
    waited = held[live] * hold + elapsed - hold
    last = step[live] == len(steps) - 1
    return step_action(decision, held[live], waited, hold, g.max_wait_s, last, g.on_timeout)


def check_against_releases(
    spec: ReleaseConfig, rate: float, shift: float, n: int, sim: dict, seed: int, releases: int
) -> None:
    """Run the first n releases through a real `Releases` fed the same random numbers; raise
    unless each ends as the array run said, at the same second."""
    from cluster.store import versions
    from serve.release import ARMS, Releases, new_release

    means = (CONTROL_MEAN, CONTROL_MEAN + shift * spec.gates.max_reward_drop)
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "store" / "adapters")
        made = []
        for i in range(2):
            src = Path(tmp) / f"src{i}"
            src.mkdir()
            (src / "adapter_config.json").write_text(json.dumps({"r": 8, "i": i}))
            (src / "adapter_model.safetensors").write_bytes(bytes([i]) * 64)
            made.append(versions.publish(src, root, "bot", {"base_fingerprint": "sha256:00"}))
        for i in range(n):
            versions.promote(root, "bot", made[0])
            rel = Releases("sim", str(Path(tmp) / "store"), root)
            r = rel.releases["bot"] = new_release(spec, made[0], made[1])
            r["step_started"] = 0.0
            t = 0
            while r["state"] == "running" and t < 100_000:
                t += 1
                pct = np.array(r["spec"]["steps"][r["step"]]["percent"] / 100)
                traffic = second(uniforms(seed, t, releases)[i], pct, rate, means)
                counts = {
                    a: {"requests": int(x[0]), "errors": int(x[1])} for a, x in traffic.items()
                }
                rel.add_counts({"bot": counts})
                for arm in ARMS:
                    _, _, k, liked = (int(x) for x in traffic[arm])
                    for j in range(k):
                        rel.add_outcome("bot", arm, float(j < liked))
                with contextlib.redirect_stdout(io.StringIO()):  # the tick prints its log
                    rel.tick(now=float(t))
            got = {"promoted": "promoted", "rolled_back": "rolled back"}[r["state"]]
            want = sim["end"][i]
            timed_out = "on_timeout" in (r["log"][-1].get("numbers") or {})
            got = "timed out" if timed_out and got == "rolled back" else got
            if (got, t) != (want, sim["at"][i]):
                raise AssertionError(
                    f"release {i}: Releases.tick {got} at {t} s, arrays {want} at {sim['at'][i]} s"
                )


def p99_false_fires(spec: ReleaseConfig, rate: float, releases: int, seed: int, sigma=0.5) -> float:
    """The share of releases whose p99 gate (`p99_too_slow` on the latency histogram, read at the
    end of each step's hold) fails an identical candidate: both arms' latencies lognormal (median
    0.2 s, sigma 0.5), requests at twice the reward rate, split by the step's share."""
    from serve.release_gates import LATENCY_BOUNDS, p99_too_slow

    rng = np.random.default_rng(seed)
    g, fired = spec.gates, 0
    for _ in range(releases):
        for step in spec.steps:
            n = {
                a: rng.poisson(2 * rate * step.hold_s * s)
                for a, s in (("c", 1 - step.percent / 100), ("k", step.percent / 100))
            }
            if min(n.values()) < g.min_requests:
                continue  # the rule is read only with min_requests in each arm
            counts = {}
            for arm, k in n.items():
                idx = np.searchsorted(LATENCY_BOUNDS, 0.2 * np.exp(sigma * rng.standard_normal(k)))
                counts[arm] = {f"lat_{i:02d}": int(c) for i, c in enumerate(np.bincount(idx)) if c}
            alpha = g.alpha / len(spec.steps)
            if p99_too_slow(counts["c"], counts["k"], g.max_p99_ratio, alpha)[0]:
                fired += 1
                break
    return fired / releases


def row(spec: ReleaseConfig, rate: float, name: str, releases: int, seed: int, check: int) -> str:
    sim = simulate(spec, rate, SHIFTS[name], releases, seed)
    if check:
        check_against_releases(spec, rate, SHIFTS[name], check, sim, seed, releases)
    end, at = sim["end"], sim["at"]
    share = {k: float(np.mean(end == k)) for k in ("rolled back", "timed out", "promoted")}
    med = {k: statistics.median(at[end == k]) if (end == k).any() else None for k in share}
    shown = lambda k: f"{med[k]:.0f}" if med[k] is not None else "-"  # noqa: E731
    cand = CONTROL_MEAN + SHIFTS[name] * spec.gates.max_reward_drop
    return (
        f"| {rate:g} | {name} ({CONTROL_MEAN:g} vs {cand:g}) | {share['rolled back']:.1%} | "
        f"{share['timed out']:.1%} | {share['promoted']:.1%} | {shown('promoted')} | "
        f"{shown('rolled back')} |"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--releases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--check", type=int, default=0, help="releases a row also run by Releases.tick")
    ap.add_argument("--rates", type=lambda x: [float(v) for v in x.split(",")], default=[5.0, 0.5])
    ap.add_argument(
        "gates",
        nargs="*",
        help="gate overrides KEY=VALUE (max_reward_drop=0.05), or steps=[10,25,50,100]",
    )
    a = ap.parse_args(argv)
    gates = {
        k: json.loads(v) if v[:1] in "0123456789-[{tf" else v
        for k, v in (x.split("=", 1) for x in a.gates)
    }
    release = {"adapter": "bot", "gates": gates}
    if "steps" in gates:  # steps=[10,25,50,100]: the ramp's percents, 300 s each
        release["steps"] = [{"percent": p, "hold_s": 300} for p in gates.pop("steps")]
    spec = ReleaseConfig.model_validate(release)
    ramp = " / ".join(f"{s.percent:g}% {s.hold_s:g} s" for s in spec.steps)
    print(f"ramp {ramp}; gates {spec.gates.model_dump()}; {a.releases} releases a row")
    print(
        "| rewards/s | candidate (control vs candidate mean) | rolled back | timed out (rolled back) | promoted | median s to promote | median s to roll back |"
    )
    print("|---|---|---|---|---|---|---|")
    t0 = time.monotonic()
    for rate in a.rates:
        for name in SHIFTS:
            print(row(spec, rate, name, a.releases, a.seed, a.check), flush=True)
    for rate in a.rates:
        share = p99_false_fires(spec, rate, a.releases, a.seed)
        print(
            f"p99 rule on an identical candidate at {rate:g} rewards/s: fails {share:.1%} of releases"
        )
    print(f"{time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
