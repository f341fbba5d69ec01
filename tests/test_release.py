"""Canary releases (serve/release.py) without a server: real adapter versions in a real store,
the release's own bucket table, gates read from the counts an ingress would push. The release
through a live `lorafleet serve` is in test_serve.py."""

from __future__ import annotations

import json
import random
import time

import pytest

from cluster.store import versions
from serve.experiments import Table
from serve.release import ARMS, Releases, latency_bucket, p99

USERS = [f"user-{i}" for i in range(400)]


def _store(tmp_path, n=2) -> tuple[str, list[str]]:
    root = str(tmp_path / "store" / "adapters")
    made = []
    for i in range(n):
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "adapter_config.json").write_text(json.dumps({"r": 8, "i": i}))
        (src / "adapter_model.safetensors").write_bytes(bytes([i]) * 64)
        made.append(versions.publish(src, root, "bot", {"base_fingerprint": "sha256:00"}))
    versions.promote(root, "bot", made[0])  # the control: v1 current, v2 published, not current
    return root, made


def _releases(tmp_path, root) -> Releases:
    return Releases("app", str(tmp_path / "store"), root)


def _started(status: dict) -> dict:
    assert "error" not in status, status
    return status


def _spec(**gates) -> dict:
    return {
        "adapter": "bot",
        "steps": [
            {"percent": 10, "hold_s": 0.3},
            {"percent": 50, "hold_s": 0.3},
            {"percent": 100, "hold_s": 0.3},
        ],
        "gates": {"min_requests": 5, **gates},
    }


def _arms(rel: Releases) -> dict[str, str]:
    """Each user's arm, as an ingress replica routes them from the release's snapshot."""
    _, snap = rel.snapshot()
    if "bot" not in snap:
        return {}
    _, _, weights, owners, _ = snap["bot"]
    table = Table(list(ARMS), weights, owners)
    return {u: table.assign("release:bot", u, random.Random(0)) for u in USERS}


def _traffic(rel: Releases, arms: dict, error_arm=None, slow_arm=None) -> None:
    """One request per user, counted as an ingress replica counts it; in a shadow step a share
    of the control's requests is mirrored to the candidate (its answers agree 3 times in 4)."""
    counts = {a: {} for a in (*ARMS, "shadow")}
    _, snap = rel.snapshot()
    mirrored = snap["bot"][4] if "bot" in snap else 0.0
    rng = random.Random(len(arms))

    def count(arm, **more):
        c = counts[arm]
        answered_by = "candidate" if arm == "shadow" else arm  # a mirrored answer is its
        failed = answered_by == error_arm
        latency = 0.5 if answered_by == slow_arm else 0.05
        for k, v in (("requests", 1), ("errors", int(failed)), (latency_bucket(latency), 1)):
            c[k] = c.get(k, 0) + v
        for k, v in more.items():
            c[k] = c.get(k, 0) + v

    for i, arm in enumerate(arms.values()):
        count(arm)
        if arm == "control" and rng.random() * 100 < mirrored:
            count("shadow", compared=1, agreed=int(i % 4 != 0))
    rel.add_counts({"bot": counts})


def _run(rel: Releases, timeout_s=10.0, **traffic) -> list[dict[str, str]]:
    """Ticks with traffic until the release ends; each step's user -> arm."""
    seen = []
    deadline = time.time() + timeout_s
    while rel.releases["bot"]["state"] == "running" and time.time() < deadline:
        arms = _arms(rel)
        if not seen or arms != seen[-1]:
            seen.append(arms)
        _traffic(rel, arms, **traffic)
        time.sleep(0.05)
        rel.tick()
    return seen


def test_a_good_candidate_ramps_with_sticky_users_and_is_promoted(tmp_path):
    root, (v1, v2) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    status = rel.start(_spec())
    assert (status["control"], status["candidate"], status["state"]) == (v1, v2, "running")
    steps = _run(rel)
    assert rel.releases["bot"]["state"] == "promoted"
    assert versions.current(root, "bot") == v2
    decisions = [e["decision"] for e in rel.releases["bot"]["log"]]
    assert decisions == ["started", "advanced", "advanced", "promoted"]
    assert rel.releases["bot"]["log"][1]["numbers"]["candidate_requests"] >= 5
    assert len(steps) == 3  # 10%, 50%, 100% of users
    for arms, share in zip(steps, (0.10, 0.50, 1.0), strict=True):
        got = sum(a == "candidate" for a in arms.values()) / len(arms)
        assert abs(got - share) < 0.06, (got, share)
    # a ramp step moves users onto the candidate only, never off it
    for before, after in zip(steps, steps[1:], strict=False):
        assert all(after[u] == "candidate" for u, a in before.items() if a == "candidate")
    assert rel.snapshot()[1] == {}  # done: every request goes to `current` again


def test_a_candidate_that_errors_is_rolled_back_at_the_first_failed_gate(tmp_path):
    root, (v1, v2) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    _started(rel.start(_spec(max_error_rate=0.05)))
    _run(rel, error_arm="candidate")
    r = rel.releases["bot"]
    assert r["state"] == "rolled_back" and versions.current(root, "bot") == v1
    last = r["log"][-1]
    assert last["decision"] == "rolled back" and last["step"] == 0
    assert (
        last["numbers"]["candidate_error_rate"] == 1.0 and "error rate" in last["numbers"]["gate"]
    )


def test_a_slow_candidate_fails_the_p99_gate(tmp_path):
    root, (v1, _) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    _started(rel.start(_spec(max_p99_ratio=1.5)))
    _run(rel, slow_arm="candidate")
    last = rel.releases["bot"]["log"][-1]
    assert rel.releases["bot"]["state"] == "rolled_back" and versions.current(root, "bot") == v1
    assert last["numbers"]["candidate_p99_s"] > 1.5 * last["numbers"]["control_p99_s"]


def test_bad_feedback_rolls_back_and_good_feedback_does_not(tmp_path):
    root, (v1, v2) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    _started(rel.start(_spec(min_feedback=30)))
    rng = random.Random(1)
    for _ in range(60):  # thumbs: control liked 80% of the time, candidate 40%
        assert rel.add_outcome("bot", "control", float(rng.random() < 0.8))
        assert rel.add_outcome("bot", "candidate", float(rng.random() < 0.4))
    _run(rel)
    last = rel.releases["bot"]["log"][-1]
    assert rel.releases["bot"]["state"] == "rolled_back", last
    n = last["numbers"]
    assert n["difference_high"] < 0 < n["difference_high"] + 0.4 and "reward" in n["gate"]
    assert "mSPRT" in n["test"] and "mSPRT" in n["gate"]

    _started(rel.start(_spec(min_feedback=30)))  # the same candidate again, as liked as the control
    for _ in range(40):
        rel.add_outcome("bot", "control", 1.0)
        rel.add_outcome("bot", "candidate", 1.0)
    _run(rel)
    assert rel.releases["bot"]["state"] == "promoted" and versions.current(root, "bot") == v2
    advanced = rel.releases["bot"]["log"][1]["numbers"]
    assert advanced["difference_low"] > -advanced["max_reward_drop"]  # shown non-inferior


def test_few_rewards_are_not_evidence_the_step_waits_then_on_timeout_decides(tmp_path):
    """20 rewards a side, the candidate's a bit worse (0.45 vs 0.55): the old gate (no p < alpha)
    promoted it; now no step advances without evidence it is within max_reward_drop, so it waits
    and, after max_wait_s, `on_timeout` decides, logged with its numbers."""
    root, (v1, v2) = _store(tmp_path)
    for on_timeout, state, current in (
        ("rollback", "rolled_back", v1),
        ("promote", "promoted", v2),
    ):
        rel = _releases(tmp_path, root)
        _started(rel.start(_spec(min_feedback=20, max_wait_s=0.6, on_timeout=on_timeout)))
        for i in range(20):
            rel.add_outcome("bot", "control", float(i < 11))
            rel.add_outcome("bot", "candidate", float(i < 9))
        _run(rel)
        r = rel.releases["bot"]
        assert r["state"] == state and versions.current(root, "bot") == current
        waits = [e for e in r["log"] if e["decision"] == "held"]
        assert waits and "not yet shown within 0.1" in waits[0]["numbers"]["gate"]
        last = r["log"][-1]["numbers"] if on_timeout == "rollback" else waits[-1]["numbers"]
        if on_timeout == "rollback":
            assert last["on_timeout"] == "rollback" and last["waited_s"] >= 0.6
            assert last["difference_low"] < -0.1 < last["difference_high"]
        else:
            assert [e["decision"] for e in r["log"]][-1] == "promoted"
            assert r["log"][-1]["numbers"]["on_timeout"] == "promote"
        versions.promote(root, "bot", v1)


def test_outcome_true_holds_a_release_without_feedback_and_false_ignores_rewards(tmp_path):
    root, (v1, v2) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    _started(rel.start(_spec(outcome=True, max_wait_s=0.6)))
    _run(rel)  # traffic, no reward: `true` needs the evidence, `auto` would ramp on errors alone
    assert rel.releases["bot"]["state"] == "rolled_back"
    assert rel.releases["bot"]["log"][-1]["numbers"]["on_timeout"] == "rollback"
    _started(rel.start(_spec(outcome=False)))
    for _ in range(50):  # rewards that would roll it back are not read
        rel.add_outcome("bot", "control", 1.0)
        rel.add_outcome("bot", "candidate", 0.0)
    _run(rel)
    assert rel.releases["bot"]["state"] == "promoted" and versions.current(root, "bot") == v2


def test_one_error_in_a_few_requests_is_not_evidence_of_a_bad_error_rate(tmp_path):
    """1 error in the first 5 requests is 20%, above max_error_rate 0.05: the old point rule
    rolled back; the sequential test needs the data to show the rate is above the limit."""
    root, (v1, v2) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    _started(rel.start(_spec(max_error_rate=0.05)))
    rel.add_counts({"bot": {"candidate": {"requests": 5, "errors": 1}}})
    time.sleep(0.35)
    rel.tick()
    assert rel.releases["bot"]["state"] == "running" and rel.releases["bot"]["step"] == 1
    _run(rel)
    assert rel.releases["bot"]["state"] == "promoted"


def test_a_restarted_manager_never_repeats_the_version_an_ingress_holds(tmp_path):
    """#27: a restarted release manager started again at version 1, so an ingress that held
    version 1 kept its stale table. It starts at a random 62-bit version, as ExperimentState."""
    root, (v1, v2) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    held, table = rel.snapshot()  # what an ingress replica holds: no release yet
    assert table == {} and 0 <= held < 2**62
    _started(rel.start(_spec()))
    again = _releases(tmp_path, root)  # the restarted replica reads the running release back
    version, table = again.snapshot(held)
    assert version != held and "bot" in table  # the ingress gets the table, not "unchanged"
    assert len({_releases(tmp_path, root).version for _ in range(5)}) == 5


def test_a_step_without_traffic_is_held_then_rolled_back(tmp_path):
    root, (v1, _) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    _started(rel.start(_spec(max_wait_s=0.75)))
    deadline = time.time() + 10
    while rel.releases["bot"]["state"] == "running" and time.time() < deadline:
        time.sleep(0.05)
        rel.tick()
    decisions = [e["decision"] for e in rel.releases["bot"]["log"]]
    assert decisions[1:] == ["held", "held", "rolled back"], decisions
    assert rel.releases["bot"]["log"][-1]["numbers"]["gate"] == "too few requests"
    assert versions.current(root, "bot") == v1


def test_a_release_survives_a_restart_of_its_replica(tmp_path):
    root, (v1, v2) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    _started(rel.start(_spec()))
    _traffic(rel, _arms(rel))
    time.sleep(0.35)
    rel.tick()  # advanced to 50%
    before = _arms(rel)
    again = _releases(tmp_path, root)  # a new replica reads the release back from storage
    r = again.releases["bot"]
    assert (r["state"], r["step"], r["candidate"]) == ("running", 1, v2)
    assert _arms(again) == before  # every user keeps their arm
    _run(again)
    assert again.releases["bot"]["state"] == "promoted"


@pytest.mark.parametrize(
    ("change", "status", "says"),
    [
        ({"adapter": "ghost"}, 404, "not in the store"),
        ({"version": "20200101-000000-000-0000"}, 404, "no version"),
        ("current", 409, "already current"),
        ("twice", 409, "already being released"),
        ({"steps": [{"percent": 50, "hold_s": 1}]}, 400, "last step must be 100"),
        ({"adapter": "../x", "gates": {"max_error_rate": 2}}, 400, "max_error_rate"),
    ],
)
def test_a_release_that_cannot_start_says_why(tmp_path, change, status, says):
    root, (v1, v2) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    spec = _spec()
    if change == "current":
        spec["version"] = v1
    elif change == "twice":
        rel.start(_spec())
    else:
        spec |= change
    out = rel.start(spec)
    assert out.get("status") == status and says in out["error"], out
    if change == ({"adapter": "../x", "gates": {"max_error_rate": 2}}):
        assert "adapter" in out["error"]  # every problem at once


def test_p99_reads_the_latency_histogram():
    counts = {}
    for ms in range(1, 101):  # 1..100 ms, one each
        k = latency_bucket(ms / 1000)
        counts[k] = counts.get(k, 0) + 1
    assert 0.099 <= p99(counts) <= 0.125
    assert p99({}) is None


# --- pause and resume ------------------------------------------------------------------------------


def _decisions(rel: Releases) -> list[str]:
    return [e["decision"] for e in rel.releases["bot"]["log"]]


def test_a_paused_release_holds_its_step_and_split_until_resumed(tmp_path):
    """While paused, time passes and a failing candidate's counts and bad rewards arrive: the
    release neither advances nor rolls back, and every user keeps their arm. Resumed, the step
    starts on fresh counts (what arrived during the pause decides nothing) and the ramp goes on."""
    root, (v1, v2) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    _started(rel.start(_spec(max_wait_s=0.75)))
    arms = _arms(rel)
    _traffic(rel, arms)
    time.sleep(0.35)
    rel.tick()
    assert rel.releases["bot"]["step"] == 1  # advanced to 50%
    arms = _arms(rel)
    paused = rel.pause("bot")
    assert (paused["state"], paused["step"], paused["percent"]) == ("paused", 1, 50)
    entry = paused["log"][-1]
    assert entry["decision"] == "paused" and entry["numbers"]["by"] == "admin"
    assert entry["numbers"]["candidate_requests"] == 0  # the step's counts so far
    t0 = time.time()
    while time.time() - t0 < 1.2:  # beyond the hold (0.3 s) and max_wait_s (0.75 s)
        _traffic(rel, arms, error_arm="candidate")
        time.sleep(0.05)
        rel.tick()
        assert _arms(rel) == arms  # the split stays, users stay on their arm
    assert rel.releases["bot"]["state"] == "paused" and rel.releases["bot"]["step"] == 1
    assert _decisions(rel) == ["started", "advanced", "paused"]
    assert versions.current(root, "bot") == v1
    assert rel.status("bot")["total"]["candidate"]["errors"] > 0  # counted, shown, not judged

    resumed = rel.resume("bot")
    assert (resumed["state"], resumed["step"]) == ("running", 1)
    entry = resumed["log"][-1]
    assert entry["decision"] == "resumed" and entry["numbers"]["paused_s"] >= 1.2
    assert rel.releases["bot"]["window"] == {"control": {}, "candidate": {}}
    _run(rel)  # healthy traffic from now on
    assert rel.releases["bot"]["state"] == "promoted" and versions.current(root, "bot") == v2
    assert _decisions(rel) == ["started", "advanced", "paused", "resumed", "advanced", "promoted"]


def test_a_paused_release_does_not_spend_its_max_wait(tmp_path):
    """A starved step held once, paused past max_wait_s, resumed: it holds again (the one hold it
    had stays counted) instead of being rolled back for the time it was paused."""
    root, (v1, _) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    _started(rel.start(_spec(max_wait_s=0.75)))
    time.sleep(0.35)
    rel.tick()
    assert _decisions(rel) == ["started", "held"]
    _started(rel.pause("bot"))
    for _ in range(12):  # 1.2 s paused
        time.sleep(0.1)
        rel.tick()
    _started(rel.resume("bot"))
    assert rel.releases["bot"]["held"] == 1
    deadline = time.time() + 10
    while rel.releases["bot"]["state"] == "running" and time.time() < deadline:
        time.sleep(0.05)
        rel.tick()
    assert _decisions(rel) == ["started", "held", "paused", "resumed", "held", "rolled back"]
    assert versions.current(root, "bot") == v1


def test_a_paused_release_survives_a_restart_and_resumes_there(tmp_path):
    root, (v1, v2) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    _started(rel.start(_spec()))
    before = _arms(rel)
    _started(rel.pause("bot"))
    again = _releases(tmp_path, root)  # a new replica reads the paused release back
    assert again.status("bot")["state"] == "paused" and _arms(again) == before
    time.sleep(0.35)
    again.tick()
    assert again.releases["bot"]["step"] == 0 and _decisions(again)[-1] == "paused"
    _started(again.resume("bot"))
    _run(again)
    assert again.releases["bot"]["state"] == "promoted" and versions.current(root, "bot") == v2
    # a paused release can be aborted; an aborted one is neither paused nor resumed
    _started(again.start(_spec() | {"version": v1}))
    _started(again.pause("bot"))
    assert again.abort("bot")["state"] == "rolled_back"
    assert versions.current(root, "bot") == v2


@pytest.mark.parametrize(
    ("setup", "call", "status", "says"),
    [
        (None, "pause", 404, "no release of 'ghost'"),
        (None, "resume", 404, "no release of 'ghost'"),
        ("running", "resume", 409, "is running: nothing to resume"),
        ("paused", "pause", 409, "is paused: nothing to pause"),
        ("aborted", "pause", 409, "has ended (rolled back)"),
        ("aborted", "resume", 409, "has ended (rolled back)"),
    ],
)
def test_a_pause_or_resume_that_cannot_be_done_says_why(tmp_path, setup, call, status, says):
    root, _ = _store(tmp_path)
    rel = _releases(tmp_path, root)
    adapter = "ghost" if setup is None else "bot"
    if setup is not None:
        _started(rel.start(_spec()))
    if setup == "paused":
        _started(rel.pause("bot"))
    if setup == "aborted":
        _started(rel.abort("bot"))
    log = list(rel.releases["bot"]["log"]) if setup else []
    out = getattr(rel, call)(adapter)
    assert out.get("status") == status and says in out["error"], out
    assert (list(rel.releases["bot"]["log"]) if setup else []) == log  # nothing logged


def test_the_cli_parses_pause_and_resume_like_abort():
    from cluster.cli import main as cli

    for action in ("pause", "resume"):
        got = cli.parse(["release", action, "s.yaml", "bot", "--url", "http://127.0.0.1:9"])
        assert got.command == "release" and got.params == {
            "action": action,
            "config": "s.yaml",
            "overrides": [],
            "adapter": "bot",
            "url": "http://127.0.0.1:9",
            "follow": False,
        }
        with pytest.raises(SystemExit) as e:  # the adapter is not optional
            cli.parse(["release", action, "s.yaml"])
        assert e.value.code == 2


# --- lorafleet release plan ------------------------------------------------------------------------


def test_release_plan_sizes_a_step_as_the_gate_decides(capsys):
    """`lorafleet release plan`: the rewards per arm it prints for an identical candidate (and one
    worse by 2x the margin) are where the gate's own decision function passes (rolls back) in at
    least 80% of 4,000 draws, and half as many are not enough."""
    import numpy as np

    from cluster.cli import main as cli
    from cluster.config.release import ReleaseConfig
    from serve.sequential import NOT_WORSE, WORSE, information_needed, noninferiority

    got = cli.parse(
        ["release", "plan", "s.yaml", "release.gates.alpha=0.1", "--rewards-per-s", "2"]
    )
    assert got.params == {
        "config": "s.yaml",
        "overrides": ["release.gates.alpha=0.1"],
        "adapter": None,
        "url": None,
        "action": "plan",
        "follow": False,
        "rewards_per_s": 2.0,
    }
    assert cli.main(["release", "plan", "configs/serve-demo.yaml", "--rewards-per-s", "5"]) == 0
    out = capsys.readouterr().out
    g = ReleaseConfig(adapter="a").gates
    rng = np.random.default_rng(0)
    for drop, want, shown in ((0.0, NOT_WORSE, "| identical |"), (0.2, WORSE, "| worse by 0.2 |")):
        per_arm = round(2 * information_needed(drop or 0.1, 0.1, g.alpha) * 0.25)
        line = next(x for x in out.splitlines() if x.startswith(shown))
        assert f"| {per_arm:,} |" in line, (per_arm, line)
        for n, enough in ((per_arm, True), (per_arm // 2, False)):
            ctl, cand = rng.binomial(n, 0.5, 4000), rng.binomial(n, 0.5 - drop, 4000)
            arms = [
                {"n": np.full(4000, n), "sum": x, "sumsq": x, "nonbinary": 0} for x in (ctl, cand)
            ]
            share = np.mean(noninferiority(*arms, 0.1, g.alpha, g.min_feedback)[0] == want)
            assert (share >= 0.78) if enough else (share < 0.6), (drop, n, share)


def test_a_pause_keeps_the_wait_for_outcome_evidence_counted(tmp_path):
    """A step waiting for outcome evidence, paused after ~3 holds of waiting: resumed, those
    holds stay counted against max_wait_s, so pausing cannot stretch the wait forever."""
    root, _ = _store(tmp_path)
    rel = _releases(tmp_path, root)
    _started(rel.start(_spec(min_feedback=20, max_wait_s=100)))
    for i in range(20):  # undecided: 20 rewards a side, 0.55 vs 0.45
        rel.add_outcome("bot", "control", float(i < 11))
        rel.add_outcome("bot", "candidate", float(i < 9))
    _traffic(rel, _arms(rel))
    r = rel.releases["bot"]
    while not r.get("waiting") or time.time() - r["step_started"] < 1.3:  # hold 0.3 s, then wait
        time.sleep(0.05)
        rel.tick()
    assert r["state"] == "running" and r["held"] == 0
    _started(rel.pause("bot"))
    held = int((r["paused_at"] - r["step_started"] - 0.3) // 0.3)
    assert r["held"] == held >= 3
    _started(rel.resume("bot"))
    assert r["held"] == held and "waiting" not in r


def test_a_reward_the_restarting_manager_missed_reaches_its_gate_with_the_next_sync(tmp_path):
    """Feedback marks a response rewarded before the ingress tells the ReleaseManager; if the
    manager is restarting, the reward waits in the ingress and goes with the next sync (the
    client's retry would get 409), and counts already sent are not sent twice."""
    import asyncio

    from serve.routes.releases import ReleaseRoutingMixin

    root, _ = _store(tmp_path)
    rel = _releases(tmp_path, root)
    _started(rel.start(_spec()))

    class Restarting:
        """The manager's handle: the real Releases, down for its first `down` calls."""

        def __init__(self, down: int):
            self.down = down

        def __getattr__(self, name):
            async def call(*args):
                if self.down > 0:
                    self.down -= 1
                    raise ConnectionError("the ReleaseManager replica is restarting")
                return getattr(rel, name)(*args)

            return type("Method", (), {"remote": staticmethod(call)})

    class Ingress(ReleaseRoutingMixin):
        def __init__(self):
            self.release, self.releases, self.release_version = Restarting(1), {}, -1
            self.release_counts, self.pending_outcomes = {}, []

    ing = Ingress()
    asyncio.run(ing._release_outcome("bot", "candidate", 1.0))
    assert ing.pending_outcomes == [("bot", "candidate", 1.0)]
    assert not rel.releases["bot"]["outcomes"]["candidate"]
    ing.release_counts = {"bot": {"control": {"requests": 3}}}
    asyncio.run(ing._sync_releases())
    assert ing.pending_outcomes == [] and rel.releases["bot"]["outcomes"]["candidate"]["n"] == 1
    assert rel.releases["bot"]["total"]["control"]["requests"] == 3
    # a sync that fails after its counts went: they are not put back to be sent again
    ing.release_counts = {"bot": {"control": {"requests": 2}}}
    ing.pending_outcomes = [("bot", "control", 0.0)]
    ing.release.down = 0
    real_add = rel.add_outcome
    rel.add_outcome = lambda *a: (_ for _ in ()).throw(ConnectionError("down again"))
    asyncio.run(ing._sync_releases())
    rel.add_outcome = real_add
    assert ing.release_counts == {} and rel.releases["bot"]["total"]["control"]["requests"] == 5
    assert ing.pending_outcomes == [("bot", "control", 0.0)]


# --- before users see the candidate: the eval gate and the shadow step (#20 part 4) ---------


def _spec_before(**more) -> dict:
    return _spec() | more


def test_a_shadow_step_mirrors_requests_no_user_sees_then_ramps(tmp_path):
    """In the shadow step every user stays on the control; the candidate's mirrored answers pass
    the error and latency gates, their agreement is logged, and the ramp starts at its first
    step's share."""
    root, (v1, v2) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    status = _started(rel.start(_spec_before(shadow={"percent": 50, "hold_s": 0.3})))
    assert (status["state"], status["phase"], status["percent"]) == ("running", "shadow", 0.0)
    assert rel.snapshot()[1]["bot"][4] == 50  # the share the ingress mirrors
    steps = _run(rel)
    r = rel.releases["bot"]
    assert r["state"] == "promoted" and versions.current(root, "bot") == v2
    assert [e["decision"] for e in r["log"]] == [
        "started",
        "advanced",
        "advanced",
        "advanced",
        "promoted",
    ]
    shadow = r["log"][1]
    assert shadow["phase"] == "shadow" and shadow["mirrored"] == 50 and shadow["percent"] == 0
    n = shadow["numbers"]
    assert n["candidate_requests"] >= 5 and n["candidate_error_rate"] == 0
    assert n["shadow_compared"] == n["candidate_requests"] and 0.6 < n["shadow_agreement"] < 0.9
    assert "phase" not in r["log"][2] and r["log"][2]["percent"] == 10
    assert "shadow_compared" not in r["log"][2]["numbers"]  # the ramp counts users' answers only
    assert r["total"]["shadow"]["requests"] == n["candidate_requests"]
    # no user was on the candidate during the shadow step; then 10%, 50%, 100%
    assert len(steps) == 4 and set(steps[0].values()) == {"control"}
    for arms, share in zip(steps[1:], (0.10, 0.50, 1.0), strict=True):
        assert abs(sum(a == "candidate" for a in arms.values()) / len(arms) - share) < 0.06


@pytest.mark.parametrize("failing", ["errors", "slow"])
def test_a_candidate_that_fails_its_shadow_is_rolled_back_before_any_user_sees_it(
    tmp_path, failing
):
    root, (v1, _) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    gates = {"max_error_rate": 0.05, "max_p99_ratio": 1.5}
    _started(rel.start(_spec(**gates) | {"shadow": {"percent": 100, "hold_s": 0.3}}))
    traffic = {"error_arm": "candidate"} if failing == "errors" else {"slow_arm": "candidate"}
    steps = _run(rel, **traffic)
    r = rel.releases["bot"]
    assert r["state"] == "rolled_back" and versions.current(root, "bot") == v1
    assert r["log"][-1]["phase"] == "shadow"
    assert ("error rate" if failing == "errors" else "p99") in r["log"][-1]["numbers"]["gate"]
    assert all(set(arms.values()) == {"control"} for arms in steps)


def _eval_spec(**more) -> dict:
    gate = {"path": "s3://unused/rows.jsonl", "metric": "exact_match", "max_drop": 0.05}
    return _spec() | {"eval": gate | more}


def test_an_eval_gate_holds_the_release_until_both_scores_are_in(tmp_path):
    root, (v1, v2) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    status = _started(rel.start(_eval_spec()))
    assert (status["state"], status["phase"], status["percent"]) == ("evaluating", "eval", None)
    rel.tick()
    assert rel.snapshot()[1] == {}  # nobody is routed by the release while it is scored
    assert rel.start(_spec())["status"] == 409  # and no second release of the adapter starts
    assert rel.pause("bot")["status"] == 409
    assert rel.eval_result("bot", v1, {"metric": "exact_match"})["status"] == 409  # not it
    result = {"metric": "exact_match", "control": 0.80, "candidate": 0.78, "rows": 40}
    status = rel.eval_result("bot", v2, result)
    assert (status["state"], status["phase"], status["percent"]) == ("running", "ramp", 10)
    evaluated = rel.releases["bot"]["log"][1]
    assert evaluated["decision"] == "evaluated" and evaluated["phase"] == "eval"
    n = evaluated["numbers"]
    assert (n["control_score"], n["candidate_score"], n["eval_rows"]) == (0.8, 0.78, 40)
    _run(rel)
    assert rel.releases["bot"]["state"] == "promoted"


@pytest.mark.parametrize(
    "result, says",
    [
        (
            {"metric": "exact_match", "control": 0.80, "candidate": 0.70, "rows": 40},
            "dropped 0.100",
        ),
        (
            {"error": "'tiny:bot@x' cannot be served: rank 16"},
            "eval: 'tiny:bot@x' cannot be served",
        ),
    ],
)
def test_an_eval_gate_that_fails_ends_the_release_before_it_starts(tmp_path, result, says):
    from cluster.cli.releases import log_line

    root, (v1, v2) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    _started(rel.start(_eval_spec(max_drop=0.05) | {"shadow": {"percent": 10, "hold_s": 1}}))
    status = rel.eval_result("bot", v2, result)
    r = rel.releases["bot"]
    assert status["state"] == r["state"] == "rolled_back" and versions.current(root, "bot") == v1
    assert says in r["log"][-1]["numbers"]["gate"]
    line = log_line(status, r["log"][-1])
    assert line.startswith(f"[release] bot {v2}: eval rolled back (") and says in line, line
    if "control" in result:  # both scores in the log
        assert "exact_match 0.700 vs control 0.800 on 40 rows" in line, line


def test_an_eval_no_replica_reports_rolls_back_after_its_timeout(tmp_path):
    root, (v1, _) = _store(tmp_path)
    rel = _releases(tmp_path, root)
    _started(rel.start(_eval_spec(timeout_s=60)))
    rel.tick(now=time.time() + 30)
    assert rel.releases["bot"]["state"] == "evaluating"
    rel.tick(now=time.time() + 61)
    r = rel.releases["bot"]
    assert (
        r["state"] == "rolled_back" and "no scores within 60 s" in r["log"][-1]["numbers"]["gate"]
    )
    assert rel.abort("bot")["status"] == 404 and versions.current(root, "bot") == v1


def test_mirrored_answers_count_only_while_the_shadow_step_lasts(tmp_path):
    """A mirrored answer is counted as the candidate's in the shadow step; one that reaches the
    manager after the ramp started (mirrored before the ingress saw the step end) counts
    nowhere, and a candidate answer during the shadow step (none should exist) neither."""
    root, _ = _store(tmp_path)
    rel = _releases(tmp_path, root)
    _started(rel.start(_spec_before(shadow={"percent": 50, "hold_s": 60})))
    rel.add_counts({"bot": {"shadow": {"requests": 6, "errors": 1}, "candidate": {"requests": 9}}})
    r = rel.releases["bot"]
    assert r["window"]["candidate"] == {"requests": 6, "errors": 1}
    assert r["total"]["shadow"] == {"requests": 6, "errors": 1} and r["total"]["candidate"] == {}
    rel._advance(r, {})  # the shadow step passed
    assert (r["phase"], r["window"]["candidate"]) == ("ramp", {})
    rel.add_counts({"bot": {"shadow": {"requests": 4}, "candidate": {"requests": 2}}})
    assert r["window"]["candidate"] == {"requests": 2}
    assert r["total"]["shadow"] == {"requests": 6, "errors": 1}
