"""Weighted, per-user-sticky A/B experiments.

A user id is hashed (SHA-256 of `<experiment>:<user>`) into one of 10,000 buckets; each bucket
belongs to one variant. At start each variant owns a contiguous range sized by its weight. When
the weights change, only as many buckets as the change needs move, from the variants that lost
weight to those that gained it: moving w% of the weight moves about w% of users, and no others.
Requests without a user id are assigned at random by weight.

`ExperimentState` is a small Serve deployment that holds the bucket tables, the request counts and
the outcomes (feedback) for every ingress replica, so a weight change reaches all of them without a
redeploy, and keeps them in `<storage.root>/experiments/<app>/state.json` so that a restart keeps
every user in their bucket. It also holds the app's feedback secret, which the ingress replicas
sign response ids with (serve/feedback_ids.py), and the record that each id is rewarded once.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from cluster.config.serve import HttpConfig
from serve.feedback_ids import RewardedOnce, load_secret, secret_from_env
from serve.outcomes import DEFAULT_MIN_SAMPLES, add_reward, parse_reward, summarize

BUCKETS = 10_000
# response headers naming who answered a request for an experiment
VARIANT_HEADER = "X-Lorafleet-Variant"
EXPERIMENT_HEADER = "X-Lorafleet-Experiment"
RESPONSE_ID_HEADER = "X-Lorafleet-Response-Id"
SAVE_INTERVAL_S = 2.0  # counts and outcomes reach storage.root at most this often
# ids recorded by name (an ingress replica's answers before it holds the feedback secret)
MAX_RESPONSES = 200_000
REMEMBER_TIMEOUT_S = 1.0  # longest an ingress waits on the state replica for what answers need
DEFAULT_FEEDBACK_MAX_AGE_S = HttpConfig.model_fields["feedback_max_age_s"].default


def _now_iso() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def merge_counts(into: dict, deltas: dict) -> None:
    """Add per experiment, per variant counts (`{exp: {variant: {stat: n}}}`) into `into`."""
    for exp, variants in deltas.items():
        for var, stats in variants.items():
            c = into.setdefault(exp, {}).setdefault(var, {})
            for k, v in stats.items():
                c[k] = c.get(k, 0) + v


def bucket(experiment: str, user: str) -> int:
    digest = hashlib.sha256(f"{experiment}:{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def quotas(weights: list[float], n: int = BUCKETS) -> list[int]:
    """Buckets per variant: proportional to weight, summing to n (largest remainders)."""
    total = sum(weights)
    exact = [w / total * n for w in weights]
    q = [int(x) for x in exact]
    order = sorted(range(len(q)), key=lambda i: exact[i] - q[i], reverse=True)
    for i in order[: n - sum(q)]:
        q[i] += 1
    return q


def check_weights(variants: list[str], weights: dict[str, float]) -> list[str]:
    problems = []
    for name, w in weights.items():
        if name not in variants:
            problems.append(f"unknown variant {name!r}; expected one of {variants}")
        elif not isinstance(w, int | float) or isinstance(w, bool) or not w > 0:
            problems.append(f"weight of {name!r} must be a positive number. Got {w!r} instead")
    if not weights:
        problems.append("no weights given")
    return problems


@dataclass
class Table:
    """Which variant owns each bucket."""

    variants: list[str]
    weights: list[float]
    owners: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.owners:
            self.owners = [i for i, q in enumerate(quotas(self.weights)) for _ in range(q)]

    def assign(self, experiment: str, user: str | None, rng: random.Random) -> str:
        if user:
            return self.variants[self.owners[bucket(experiment, user)]]
        return rng.choices(self.variants, weights=self.weights)[0]

    def reweight(self, weights: dict[str, float]) -> Table:
        """A new table with the least movement: losers give their highest buckets to gainers."""
        new_w = [float(weights.get(v, w)) for v, w in zip(self.variants, self.weights, strict=True)]
        target = quotas(new_w)
        owners = list(self.owners)
        have = [0] * len(self.variants)
        for o in owners:
            have[o] += 1
        freed: list[int] = []
        for i in range(len(self.variants)):
            extra = have[i] - target[i]
            if extra > 0:
                mine = [b for b in range(BUCKETS - 1, -1, -1) if owners[b] == i][:extra]
                freed.extend(mine)
        freed.sort()
        for i in range(len(self.variants)):
            need = target[i] - have[i]
            for _ in range(max(need, 0)):
                owners[freed.pop(0)] = i
        return Table(list(self.variants), new_w, owners)

    def shares(self) -> dict[str, float]:
        total = sum(self.weights)
        return {v: w / total for v, w in zip(self.variants, self.weights, strict=True)}


def tables_for(experiments: list[dict]) -> dict[str, Table]:
    """The starting tables of experiments as the config gives them (contiguous ranges)."""
    return {
        e["name"]: Table([v["name"] for v in e["variants"]], [v["weight"] for v in e["variants"]])
        for e in experiments
    }


def state_uri(storage_root: str, app_name: str) -> str:
    """Where an app's experiment state lives: `<storage.root>/experiments/<app>/state.json`."""
    from cluster.store import storage

    return storage.join(storage.absolute(storage_root), "experiments", app_name, "state.json")


def encode_owners(owners: list[int]) -> list[list[int]]:
    """A bucket table as runs, [[variant index, run length], ...] (a few runs, not 10,000)."""
    runs: list[list[int]] = []
    for o in owners:
        if runs and runs[-1][0] == o:
            runs[-1][1] += 1
        else:
            runs.append([o, 1])
    return runs


def decode_owners(runs: list[list[int]], n_variants: int) -> list[int]:
    owners = [int(o) for o, k in runs for _ in range(int(k))]
    if len(owners) != BUCKETS or any(not 0 <= o < n_variants for o in owners):
        raise ValueError(f"a saved bucket table must cover {BUCKETS} buckets of known variants")
    return owners


class ExperimentState:
    """One per app (a Serve deployment): bucket tables, a version, summed counts and outcomes,
    the feedback secret (`feedback_key`) and which signed response ids were rewarded.

    With `state_uri` (`<storage.root>/experiments/<app>/state.json`) the tables, counts,
    outcomes and the record of rewarded ids are saved there (at once after a weight change; the
    rest at most every SAVE_INTERVAL_S, and when Serve stops the replica) and restored at start,
    so a restart keeps every user in their bucket. Serve calls the sync methods from a thread
    pool: one lock guards everything.
    """

    def __init__(self, experiments: list[dict], state_uri: str | None = None):
        self.config = {e["name"]: e for e in experiments}
        self.tables = tables_for(experiments)
        # a restarted state never repeats a version an ingress replica holds, so restored
        # tables always reach it
        self.version = random.getrandbits(62)
        self.counts: dict[str, dict[str, dict[str, float]]] = {
            e["name"]: {v["name"]: {} for v in e["variants"]} for e in experiments
        }
        self.outcomes: dict[str, dict[str, dict[str, float]]] = {
            e["name"]: {v["name"]: {} for v in e["variants"]} for e in experiments
        }
        self.responses: OrderedDict[str, tuple] = OrderedDict()  # id -> exp, var, release, rewarded
        self.rewarded = RewardedOnce()  # signed ids rewarded (serve/feedback_ids.py)
        self.rng = random.Random()
        self.state_uri = state_uri
        self._lock = threading.RLock()
        self._dirty, self._saved_at = False, 0.0
        self._secret = secret_from_env()  # a bad one fails the start, naming what is wrong
        if state_uri:
            self._restore()

    def __del__(self):
        """Serve calls this when it stops the replica (a redeploy, `lorafleet serve` stopped):
        what changed since the last save is saved, the record of rewarded ids with it."""
        import sys

        if getattr(self, "_dirty", False) and not sys.is_finalizing():
            with self._lock:
                self._maybe_save(force=True)

    # --- durability -----------------------------------------------------------------------

    def _restore(self) -> None:
        from cluster.store import storage

        try:
            if not storage.exists(self.state_uri):
                return
            whole = json.loads(storage.read_text(self.state_uri))
            saved = whole["experiments"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(
                f"[experiments] warning: cannot read {self.state_uri} ({e!r}); starting from the "
                "config, and refusing feedback for answers given before now"
            )
            self.rewarded.floor = int(time.time())  # which were rewarded is unknown: none again
            return
        for name in self.tables:
            if name in saved:
                self._restore_one(name, saved[name])
        try:
            self.rewarded = RewardedOnce.from_json(whole.get("rewarded", {"floor": 0, "ids": {}}))
        except (KeyError, TypeError, ValueError) as e:
            print(f"[experiments] warning: bad record of rewarded ids ({e}); refusing older ids")
            self.rewarded.floor = int(time.time())

    def _restore_one(self, name: str, saved: dict) -> None:
        names = self.tables[name].variants
        if saved.get("variants") != names:
            print(
                f"[experiments] warning: experiment {name!r} changed its variants (saved "
                f"{saved.get('variants')}, config {names}): starting it from the config's weights"
            )
            return
        try:
            owners = decode_owners(saved["owners"], len(names))
            table = Table(list(names), [float(w) for w in saved["weights"]], owners)
        except (KeyError, TypeError, ValueError) as e:
            print(
                f"[experiments] warning: experiment {name!r}: bad saved table ({e}); using config"
            )
            return
        self.tables[name] = table
        for into, key in ((self.counts, "counts"), (self.outcomes, "outcomes")):
            merge_counts(into, {name: {v: s for v, s in saved.get(key, {}).items() if v in names}})
        print(f"[experiments] restored experiment {name!r}: shares {table.shares()}")

    def _state_json(self) -> str:
        return json.dumps(
            {
                "format": 1,
                "saved_at": time.time(),
                "experiments": {
                    n: {
                        "variants": t.variants,
                        "weights": t.weights,
                        "owners": encode_owners(t.owners),
                        "counts": self.counts.get(n, {}),
                        "outcomes": self.outcomes.get(n, {}),
                    }
                    for n, t in self.tables.items()
                },
                "rewarded": self.rewarded.to_json(),
            }
        )

    def _maybe_save(self, force: bool = False) -> bool:
        """Save if asked to, or if something changed SAVE_INTERVAL_S since the last save. A
        failed save is logged and tried again next time."""
        from cluster.store import storage

        if not self.state_uri or not (
            force or (self._dirty and time.monotonic() - self._saved_at >= SAVE_INTERVAL_S)
        ):
            return False
        try:
            storage.write_text(self.state_uri, self._state_json())
        except Exception as e:  # storage down: serving goes on, the next call retries
            print(f"[experiments] warning: cannot save {self.state_uri}: {e!r}")
            return False
        self._dirty, self._saved_at = False, time.monotonic()
        return True

    # --- the ingress replicas' calls ------------------------------------------------------

    def snapshot(self, have_version: int = -1):
        """(version, {name: (variants, weights, owners)}), or (version, None) if unchanged."""
        with self._lock:
            if have_version == self.version:
                return self.version, None
            snap = {n: (t.variants, t.weights, t.owners) for n, t in self.tables.items()}
            return self.version, snap

    def set_weights(self, name: str, weights: dict[str, float]) -> dict:
        if name not in self.tables:
            return {"error": f"unknown experiment {name!r}; expected one of {sorted(self.tables)}"}
        problems = check_weights(self.tables[name].variants, weights)
        if problems:
            return {"error": "; ".join(problems)}
        with self._lock:
            old = self.tables[name]
            self.tables[name] = old.reweight(weights)
            self.version += 1
            self._dirty = True
            self._maybe_save(force=True)
        moved = sum(a != b for a, b in zip(old.owners, self.tables[name].owners, strict=True))
        return {
            "experiment": name,
            "shares": self.tables[name].shares(),
            "moved_users": moved / BUCKETS,
        }

    def add_counts(self, deltas: dict) -> None:
        """Counts from one ingress replica (called every second, so saves happen here too)."""
        with self._lock:
            merge_counts(self.counts, deltas)
            self._dirty = self._dirty or bool(deltas)
            self._maybe_save()

    def feedback_key(self) -> bytes:
        """The app's feedback secret, for the ingress replicas (each asks once): from the
        environment, else kept beside state.json, generated there at the first start
        (serve/feedback_ids.py: load_secret). Never logged."""
        with self._lock:
            if self._secret is None:
                self._secret = load_secret(self.state_uri)
            return self._secret

    def remember(
        self, response_id: str, experiment: str | None, variant: str | None, release=None
    ) -> bool:
        """Which variant answered `response_id`, and which arm of a canary release (`[adapter,
        arm]`) if one ran: for the answers an ingress replica gives before it holds the feedback
        secret (its first sync); every other answer's id is signed and needs no record. In
        memory, the newest MAX_RESPONSES. False, and nothing changed, when the id is already
        known: a client can make vLLM reuse an id (its X-Request-ID), and a second answer must
        neither clear the first one's reward nor take over its variant."""
        with self._lock:
            if response_id in self.responses:
                return False
            self.responses[response_id] = (experiment, variant, release, None)
            while len(self.responses) > MAX_RESPONSES:
                self.responses.popitem(last=False)
            return True

    def feedback(
        self, body: dict, answer: dict | None = None, max_age_s=DEFAULT_FEEDBACK_MAX_AGE_S
    ) -> dict:
        """Record one reward: {"response_id", "reward"} or {"experiment", "user", "reward"};
        `answer` is what the ingress read from a signed response id it verified
        (serve/feedback_ids.py: Answer.as_dict). Returns {"experiment", "variant", "reward"}
        (and "release", "version" where the id says), or {"error", "status"}.

        A response id is rewarded once: its first reward counts, any later one is refused (409),
        so replaying an id moves an outcome, or a release's outcome gate, by one reward at most.
        For signed ids the record is `self.rewarded` (serve/feedback_ids.py: RewardedOnce):
        bounded by http.feedback_max_age_s and MAX_REWARDED, and an id older than what it still
        holds is refused (410), never counted again. It is saved in state.json in the same write
        as the outcomes it guards, so after a restart of this replica or of the whole app:
        every reward that reached storage (SAVE_INTERVAL_S after it counted, or when Serve
        stopped the replica) is refused again; a reward lost with a crash before that save is
        lost from the outcomes too, so the saved outcomes count each id at most once across
        restarts (a release's outcome gate, kept by the ReleaseManager, may then get it twice);
        a state.json that cannot be read refuses every id given before the restart. Ids
        recorded by name (`remember`) live in memory only: after a restart they are unknown
        (404). Rewards by experiment and user are events, not answers: each counts, within the
        caller's rate limit."""
        try:
            reward = parse_reward(body.get("reward"))
        except ValueError as e:
            return {"error": str(e), "status": 400}
        with self._lock:
            if answer is not None:
                found = self._signed_target(body.get("response_id"), answer, max_age_s)
            else:
                found = self._feedback_target(body)
            if "error" in found:
                return found
            if found["experiment"] is not None:  # None: a release's answer outside experiments
                add_reward(self.outcomes[found["experiment"]][found["variant"]], reward)
                self._dirty = True
            self._maybe_save()
        return {**found, "reward": reward}

    def _signed_target(self, rid, answer: dict, max_age_s: float) -> dict:
        exp, var = answer.get("experiment"), answer.get("variant")
        if exp is not None and (exp not in self.tables or var not in self.tables[exp].variants):
            return {
                "error": f"response {rid!r} was given by variant {var!r} of experiment {exp!r}, "
                "which this server no longer runs",
                "status": 404,
            }
        refused = self.rewarded.claim(answer["nonce"], answer["issued"], time.time(), max_age_s)
        if refused == 409:
            return {
                "error": f"response {rid!r} was already rewarded; a response counts once, with "
                "its first reward",
                "status": 409,
            }
        if refused == 410:
            return {
                "error": f"response {rid!r} is older than the record of rewarded responses "
                f"reaches back (the newest {self.rewarded.limit} rewards within "
                "http.feedback_max_age_s): it can no longer be told from a replay",
                "status": 410,
            }
        self._dirty = True
        found = {"experiment": exp, "variant": var}
        if answer.get("arm"):
            found["release"] = [answer["adapter"], answer["arm"]]
        return found | ({"version": answer["version"]} if answer.get("version") else {})

    def _feedback_target(self, body: dict) -> dict:
        rid, exp, user = body.get("response_id"), body.get("experiment"), body.get("user")
        if isinstance(rid, str) and rid:
            if rid not in self.responses:
                return {"error": f"unknown response id {rid!r} (or too old)", "status": 404}
            exp, var, release, rewarded_at = self.responses[rid]
            if rewarded_at is not None:
                return {
                    "error": f"response {rid!r} was already rewarded (at {rewarded_at}); a "
                    "response counts once, with its first reward",
                    "status": 409,
                }
            self.responses[rid] = (exp, var, release, _now_iso())
            return {"experiment": exp, "variant": var} | ({"release": release} if release else {})
        if not (isinstance(exp, str) and isinstance(user, str) and user):
            return {
                "error": 'expected {"response_id": ..., "reward": ...} or '
                '{"experiment": ..., "user": ..., "reward": ...}',
                "status": 400,
            }
        if exp not in self.tables:
            return {
                "error": f"unknown experiment {exp!r}; expected one of {sorted(self.tables)}",
                "status": 404,
            }
        return {"experiment": exp, "variant": self.tables[exp].assign(exp, user, self.rng)}

    def summary(self) -> dict:
        with self._lock:
            self._maybe_save()
            return {name: self._summary_one(name, t) for name, t in self.tables.items()}

    def _summary_one(self, name: str, t: Table) -> dict:
        e = self.config.get(name, {})
        control = e.get("control") or t.variants[0]
        outcome = summarize(
            {v: self.outcomes[name][v] for v in t.variants},
            control,
            e.get("min_samples") or DEFAULT_MIN_SAMPLES,
        )
        return {
            "control": control,
            "variants": {
                v: {
                    "weight": w,
                    "share": s,
                    **self.counts.get(name, {}).get(v, {}),
                    "outcome": outcome[v],
                }
                for (v, s), w in zip(t.shares().items(), t.weights, strict=True)
            },
        }
