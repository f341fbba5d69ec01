"""Canary releases, run inside the Serve app: one adapter's candidate version takes a growing,
sticky share of its users while the gates hold; at 100% it is promoted (`current` moves to it),
at the first failed gate it is rolled back (its share goes to 0; `current` never moved).

`ReleaseManager` is a one-replica Serve deployment. The ingress replicas route each request for
an adapter under release by the user's bucket in the release's table (serve/experiments.Table: a
ramp step moves only the users the new share needs), push per-arm counts to it every second and
pull its tables. Its state (tables, step, counts, the decision log) lives in
`<storage.root>/releases/<app>.json`, written at every decision, so a restarted replica, or a
restarted `lorafleet serve`, carries on where the release stood.

An admin can pause a running release (`Releases.pause`) and resume it (`Releases.resume`); what
a pause keeps and what a resume starts afresh is said there.

Two optional gates come before any user sees the candidate. `release.eval`: the release starts
"evaluating"; the ingress replica that took the start scores both versions on held-out rows
(serve/shadow.py) and reports back (`Releases.eval_result`): a drop beyond `max_drop` ends the
release there, with both scores in its log. `release.shadow`: a first step (`phase: shadow`) in
which every user stays on the control and the ingress mirrors `percent` of the control's requests
to the candidate, discarding its answers; its errors and latency pass the step's gates as a ramp
step's would, and the ramp starts when they do.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import threading
import time
from datetime import UTC, datetime

from cluster.cli.releases import log_line
from cluster.config.release import ReleaseConfig
from cluster.store import storage, versions
from serve.experiments import Table
from serve.release_gates import (  # noqa: F401 (re-exported: the ingress, the UI, the tests)
    ARMS,
    LATENCY_BOUNDS,
    current_step,
    in_shadow,
    judge,
    latency_bucket,
    p99,
    release_spec,
    step_action,
    window_numbers,
)

LIVE = ("running", "paused")  # a release in these states routes its adapter's users
BUSY = (*LIVE, "evaluating")  # ... and in these, no other release of the adapter may start
RELEASE_PREFIX = "release:"  # how a release's arms appear among the experiments' metrics

SAVE_EVERY_S = 2.0


def releases_uri(storage_root: str, app_name: str) -> str:
    """Where an app's releases are kept: `<storage.root>/releases/<app>.json`."""
    return storage.join(storage.absolute(storage_root), "releases", f"{app_name}.json")


def running_candidates(uri: str) -> dict[str, str]:
    """{adapter: candidate version} of the releases running in the state file at `uri`."""
    try:
        releases = json.loads(storage.read_text(uri))
    except (FileNotFoundError, OSError, ValueError):
        return {}
    return {a: r["candidate"] for a, r in releases.items() if r.get("state") in BUSY}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_release(spec: ReleaseConfig, control: str, candidate: str) -> dict:
    """A release's state: evaluating (`release.eval`), else in its shadow step
    (`release.shadow`), else at its first ramp step."""
    before = spec.eval is not None or spec.shadow is not None  # nobody on the candidate yet
    first = 0.0 if before else spec.steps[0].percent
    table = Table(list(ARMS), [100 - first or 1e-9, first or 1e-9])
    state = "evaluating" if spec.eval is not None else "running"
    phase = "eval" if spec.eval is not None else "shadow" if spec.shadow is not None else "ramp"
    decision = "evaluating" if phase == "eval" else "started"
    return {
        "adapter": spec.adapter,
        "control": control,
        "candidate": candidate,
        "spec": spec.model_dump(mode="json"),
        "state": state,
        "phase": phase,
        "step": 0,
        "step_started": time.time(),
        "held": 0,
        "weights": table.weights,
        "owners": table.owners,
        "window": {a: {} for a in ARMS},
        "total": {a: {} for a in ARMS},
        "outcomes": {a: {} for a in ARMS},
        "started_at": _now(),
        "ended_at": None,
        "log": [_entry(spec.model_dump(mode="json"), 0, phase, decision)],
    }


def _entry(spec: dict, step: int, phase: str, decision: str, numbers: dict | None = None) -> dict:
    """One line of a release's decision log: where it stood (a ramp step and its share, the
    shadow step, the eval) and what was decided."""
    entry = {"at": _now(), "step": step, "percent": 0.0, "decision": decision}
    if phase == "ramp":
        entry["percent"] = spec["steps"][step]["percent"]
    else:
        entry["phase"] = phase
    if phase == "shadow":
        entry["mirrored"] = spec["shadow"]["percent"]
    if numbers is not None:
        entry["numbers"] = numbers
    return entry


def percent_of(r: dict) -> float:
    """The candidate's share of users, in percent, by its table's weights."""
    return r["weights"][1] * 100 / sum(r["weights"])


def mirrored(r: dict) -> float:
    """Percent of the control's requests mirrored to the candidate: its shadow step's, running."""
    if r["state"] != "running" or not in_shadow(r):
        return 0.0
    return float(r["spec"]["shadow"]["percent"])


def _locked(method):
    """Serve runs a deployment's sync methods in a thread pool, beside the tick loop: one lock."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class Releases:
    """Every release of one app: started, ramped, promoted or rolled back, and kept in storage.
    `tick()` reads the gates and moves the releases on; `ReleaseManager` calls it every second."""

    def __init__(self, app_name: str, storage_root: str, adapter_root: str):
        self.uri = releases_uri(storage_root, app_name)
        self.adapter_root = adapter_root
        self._lock = threading.RLock()
        self.releases: dict[str, dict] = self._load()
        # a restarted manager must never repeat a version an ingress replica holds (it would keep
        # its stale table, #27): start at a random one, as serve/experiments.ExperimentState does
        self.version = secrets.randbits(62)
        self._saved_at = 0.0

    def _load(self) -> dict:
        try:
            return json.loads(storage.read_text(self.uri))
        except (FileNotFoundError, OSError, ValueError):
            return {}

    def _save(self) -> None:
        storage.write_text(self.uri, json.dumps(self.releases))
        self._saved_at = time.monotonic()

    # --- what the ingress and the CLI call ---------------------------------------------------

    @_locked
    def start(self, spec: dict) -> dict:
        try:
            cfg = ReleaseConfig.model_validate(spec)
        except ValueError as e:
            return {"error": str(e), "status": 400}
        r = self.releases.get(cfg.adapter)
        if r and r["state"] in BUSY:
            return {"error": f"adapter {cfg.adapter!r} is already being released", "status": 409}
        control = versions.current(self.adapter_root, cfg.adapter)
        if control is None:
            return {"error": f"adapter {cfg.adapter!r} is not in the store", "status": 404}
        published = [m["version"] for m in versions.versions(self.adapter_root, cfg.adapter)]
        candidate = cfg.version or published[-1]
        if candidate not in published:
            return {"error": f"adapter {cfg.adapter!r} has no version {candidate!r}", "status": 404}
        if candidate == control:
            return {
                "error": f"version {candidate} is already current: nothing to release",
                "status": 409,
            }
        self.releases[cfg.adapter] = new_release(cfg, control, candidate)
        self._changed()
        return self.status(cfg.adapter)

    @_locked
    def abort(self, adapter: str) -> dict:
        r = self.releases.get(adapter)
        if not r or r["state"] not in BUSY:
            return {"error": f"no running or paused release of {adapter!r}", "status": 404}
        self._end(r, "rolled_back", "aborted", {"by": "admin"})
        return self.status(adapter)

    def _refused(self, adapter: str, want: str) -> dict | None:
        """Why `adapter`'s release cannot be paused (want 'running') or resumed ('paused')."""
        r = self.releases.get(adapter)
        if not r:
            return {"error": f"no release of {adapter!r}", "status": 404}
        if r["state"] == want:
            return None
        if r["state"] == "evaluating":
            return {
                "error": f"the release of {adapter!r} is being evaluated (release.eval): abort "
                "it, or wait for its ramp to start",
                "status": 409,
            }
        if r["state"] in LIVE:
            verb = "pause" if want == "running" else "resume"
            return {
                "error": f"the release of {adapter!r} is {r['state']}: nothing to {verb}",
                "status": 409,
            }
        state = r["state"].replace("_", " ")
        return {"error": f"the release of {adapter!r} has ended ({state})", "status": 409}

    @_locked
    def pause(self, adapter: str) -> dict:
        """Hold a running release where it stands. Its table is kept, so each user stays on the
        arm they have; the tick leaves it alone: it neither advances, nor is promoted, nor is
        rolled back, and neither its step's hold nor its `max_wait_s` count (the holds so far)
        moves (a step waiting for outcome evidence counts its wait so far as holds). Counts and
        rewards still arrive (they show in `total`); see `resume` for what the gates read. Logged as "paused" with the step's numbers so far."""
        if refused := self._refused(adapter, "running"):
            return refused
        r = self.releases[adapter]
        now = time.time()
        if r.get("waiting"):  # the wait for outcome evidence so far counts, in whole holds
            hold_s = current_step(r, release_spec(r)).hold_s
            r["held"] += int(max(now - r["step_started"] - hold_s, 0) // hold_s)
        r["state"], r["paused_at"] = "paused", now
        step_s = round(now - r["step_started"], 1)
        self._log(r, "paused", window_numbers(r) | {"by": "admin", "step_elapsed_s": step_s})
        self._changed()
        return self.status(adapter)

    @_locked
    def resume(self, adapter: str) -> dict:
        """Run a paused release again, on the same step and share. The step starts afresh: its
        hold runs again from now, on counts from now on, since traffic before or during the
        pause (whatever made someone pause) is not what the gates should pass or fail the step
        on. The holds already counted against `max_wait_s` stay counted, so pausing cannot
        stretch a starved step forever. Rewards (the outcome gate) are over the whole release
        and each names the arm that answered, so those sent during the pause count. Logged as
        "resumed" with how long it was paused."""
        if refused := self._refused(adapter, "paused"):
            return refused
        r = self.releases[adapter]
        now = time.time()
        paused_s = round(now - (r.pop("paused_at", None) or now), 1)
        r["state"], r["step_started"] = "running", now
        r["window"] = {a: {} for a in ARMS}
        r.pop("waiting", None)
        self._log(r, "resumed", {"by": "admin", "paused_s": paused_s})
        self._changed()
        return self.status(adapter)

    @_locked
    def status(self, adapter: str | None = None) -> dict:
        def view(r):
            keep = (
                "adapter",
                "control",
                "candidate",
                "state",
                "step",
                "spec",
                "started_at",
                "ended_at",
                "log",
            )
            spec = r["spec"]
            live = r["state"] in LIVE
            return {k: r[k] for k in keep} | {
                "phase": r.get("phase", "ramp"),  # a release saved before phases: its ramp
                "percent": (0.0 if r.get("phase") == "shadow" else percent_of(r)) if live else None,
                "paused_at": r.get("paused_at"),
                "steps": len(spec["steps"]),
                "total": r["total"],
            }

        if adapter is not None:
            r = self.releases.get(adapter)
            return view(r) if r else {"error": f"no release of {adapter!r}", "status": 404}
        return {"releases": [view(r) for r in self.releases.values()]}

    @_locked
    def snapshot(self, have_version: int = -1):
        """(version, {adapter: (control, candidate, weights, owners, mirrored percent)} of
        running or paused releases: a paused one keeps routing by its table; one in its shadow
        step mirrors that share of its control's requests to the candidate, a paused one none)."""
        if have_version == self.version:
            return self.version, None
        running = {
            a: (r["control"], r["candidate"], r["weights"], r["owners"], mirrored(r))
            for a, r in self.releases.items()
            if r["state"] in LIVE
        }
        return self.version, running

    @_locked
    def add_counts(self, deltas: dict) -> None:
        """{adapter: {arm: {stat: n}}} from an ingress replica, into the step's window and total.
        Arm "shadow" is the candidate's mirrored answers: they count as the candidate's in the
        shadow step's window (and under "shadow" in the total), and not at all once the ramp
        has started (answers mirrored just before the ingress saw the step end)."""
        for adapter, arms in deltas.items():
            r = self.releases.get(adapter)
            if not r or r["state"] not in LIVE:
                continue
            for arm, stats in arms.items():
                if arm == "shadow" and in_shadow(r):
                    into = [(r["window"], "candidate"), (r["total"], "shadow")]
                elif arm in ARMS and not (arm == "candidate" and in_shadow(r)):
                    into = [(r["window"], arm), (r["total"], arm)]
                else:
                    continue
                for where, key in into:
                    c = where.setdefault(key, {})
                    for k, v in stats.items():
                        c[k] = c.get(k, 0) + v

    # --- the loop ------------------------------------------------------------------------------

    def _changed(self) -> None:
        self.version += 1
        self._save()

    def _log(self, r: dict, decision: str, numbers: dict) -> None:
        r["log"].append(_entry(r["spec"], r["step"], r.get("phase", "ramp"), decision, numbers))
        print(log_line(self.status(r["adapter"]), r["log"][-1]))

    def _end(self, r: dict, state: str, decision: str, numbers: dict) -> None:
        self._log(r, decision, numbers)
        r["state"], r["ended_at"] = state, _now()
        r.pop("paused_at", None)
        if state == "promoted":
            try:
                versions.set_current(self.adapter_root, r["adapter"], r["candidate"], by="release")
            except versions.PointerConflict as e:  # a publish landed between read and write:
                print(f"[release] {e}; promoting {r['candidate']} on top of it")  # it stays in
                versions.set_current(  # the history; the release's decision stands
                    self.adapter_root, r["adapter"], r["candidate"], by="release"
                )
        self._changed()

    def _advance(self, r: dict, numbers: dict, now: float | None = None) -> None:
        steps = r["spec"]["steps"]
        if r["step"] == len(steps) - 1 and not in_shadow(r):
            self._end(r, "promoted", "promoted", numbers)
            return
        self._log(r, "advanced", numbers)
        if in_shadow(r):  # the shadow step passed: the ramp's first step, with real users
            r["phase"] = "ramp"
        else:
            r["step"] += 1
        self._ramp_to(r, now)

    def _ramp_to(self, r: dict, now: float | None = None) -> None:
        """Route r's ramp step (its share of users on the candidate, a fresh window)."""
        pct = r["spec"]["steps"][r["step"]]["percent"]
        table = Table(list(ARMS), r["weights"], r["owners"]).reweight(
            {"control": max(100 - pct, 1e-9), "candidate": pct}
        )
        r["weights"], r["owners"] = table.weights, table.owners
        r["step_started"], r["held"] = time.time() if now is None else now, 0
        r["window"] = {a: {} for a in ARMS}
        r.pop("waiting", None)
        self._changed()

    @_locked
    def add_outcome(self, adapter: str, arm: str, reward: float) -> bool:
        """A reward for a response a release arm gave (POST /v1/feedback); False if no release
        of `adapter` runs or is paused."""
        from serve.outcomes import add_reward

        r = self.releases.get(adapter)
        if not r or r["state"] not in LIVE or arm not in ARMS:
            return False
        add_reward(r["outcomes"][arm], reward)
        return True

    @_locked
    def eval_result(self, adapter: str, candidate: str, result: dict) -> dict:
        """The eval gate's scores from the ingress replica that ran them: {metric, control,
        candidate, rows} or {error}. A drop beyond `max_drop`, or an error, ends the release
        before any traffic, with both scores (or the error) in its log; otherwise the shadow
        step or the ramp starts."""
        r = self.releases.get(adapter)
        if not r or r["state"] != "evaluating" or r["candidate"] != candidate:
            return {"error": f"no release of {adapter!r} {candidate} is evaluating", "status": 409}
        g = release_spec(r).eval
        if "error" in result:
            self._end(r, "rolled_back", "rolled back", {"gate": f"eval: {result['error']}"})
            return self.status(adapter)
        drop = result["control"] - result["candidate"]
        numbers = {
            "metric": g.metric,
            "control_score": round(result["control"], 4),
            "candidate_score": round(result["candidate"], 4),
            "eval_rows": result["rows"],
            "max_drop": g.max_drop,
        }
        if drop > g.max_drop + 1e-12:
            numbers["gate"] = f"eval: {g.metric} dropped {drop:.3f} > max_drop {g.max_drop:g}"
            self._end(r, "rolled_back", "rolled back", numbers)
            return self.status(adapter)
        self._log(r, "evaluated", numbers)
        r["state"] = "running"
        r["phase"] = "shadow" if r["spec"].get("shadow") else "ramp"
        if r["phase"] == "shadow":
            r["step_started"], r["window"] = time.time(), {a: {} for a in ARMS}
        else:
            self._ramp_to(r)
        self._log(r, "started", {})
        self._changed()
        return self.status(adapter)

    @_locked
    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for r in list(self.releases.values()):
            if r["state"] == "running":
                self._tick_one(r, now)
            elif r["state"] == "evaluating":
                timeout_s = release_spec(r).eval.timeout_s
                if now - r["step_started"] > timeout_s:  # the replica scoring it went away
                    gate = f"eval: no scores within {timeout_s:g} s (release.eval.timeout_s)"
                    self._end(r, "rolled_back", "rolled back", {"gate": gate})
        if time.monotonic() - self._saved_at > SAVE_EVERY_S:
            self._save()

    def _tick_one(self, r: dict, now: float) -> None:
        """Judge one running release at `now` and do what `step_action` says."""
        decision, numbers = judge(r, now)
        if decision is None:
            return
        spec = release_spec(r)
        step = current_step(r, spec)
        waited_s = r["held"] * step.hold_s + now - r["step_started"] - step.hold_s
        last = r["step"] == len(spec.steps) - 1 and not in_shadow(r)
        g = spec.gates
        action = str(
            step_action(
                decision, r["held"], waited_s, step.hold_s, g.max_wait_s, last, g.on_timeout
            )
        )
        if action.startswith("timeout_"):
            numbers |= {"gate": "outcome undecided after max_wait_s", "on_timeout": g.on_timeout}
            numbers["waited_s"] = round(waited_s, 1)
            action = action[len("timeout_") :]
        if action == "rollback":
            numbers.setdefault("gate", "too few requests")
            self._end(r, "rolled_back", "rolled back", numbers)
        elif action in ("advance", "promote"):
            self._advance(r, numbers, now)
        elif action == "hold":
            r["held"] += 1
            r["step_started"] = now
            self._log(r, "held", numbers)
            self._changed()
        elif action == "wait" and not r.get("waiting"):
            r["waiting"] = True  # logged once a step: the tick reads the test every second
            gate = f"outcome: not yet shown within {g.max_reward_drop} of the control's"
            self._log(r, "held", numbers | {"gate": gate})
            self._changed()


class ReleaseManager(Releases):
    """The Serve deployment: `Releases` plus the loop that ticks it every `tick_s`."""

    async def __init__(
        self, app_name: str, storage_root: str, adapter_root: str, tick_s: float = 1.0
    ):
        super().__init__(app_name, storage_root, adapter_root)
        self.tick_s = tick_s
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.tick()
            except Exception as e:  # a storage hiccup must not end the loop
                print(f"[release] tick failed: {e!r}")
