"""Weighted, per-user-sticky A/B experiments.

A user id is hashed (SHA-256 of `<experiment>:<user>`) into one of 10,000 buckets; each bucket
belongs to one variant. At start each variant owns a contiguous range sized by its weight. When
the weights change, only as many buckets as the change needs move, from the variants that lost
weight to those that gained it: moving w% of the weight moves about w% of users, and no others.
Requests without a user id are assigned at random by weight.

`ExperimentState` is a small Serve deployment that holds the bucket tables and the request counts
for every ingress replica, so a weight change reaches all of them without a redeploy.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

BUCKETS = 10_000
# response headers naming who answered a request for an experiment
VARIANT_HEADER = "X-Lorafleet-Variant"
EXPERIMENT_HEADER = "X-Lorafleet-Experiment"


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


class ExperimentState:
    """One per app (a Serve deployment): bucket tables, a version, and summed counts."""

    def __init__(self, experiments: list[dict]):
        self.tables = tables_for(experiments)
        self.version = 0
        self.counts: dict[str, dict[str, dict[str, float]]] = {
            e["name"]: {v["name"]: {} for v in e["variants"]} for e in experiments
        }

    def snapshot(self, have_version: int = -1):
        """(version, {name: (variants, weights, owners)}), or (version, None) if unchanged."""
        if have_version == self.version:
            return self.version, None
        return self.version, {n: (t.variants, t.weights, t.owners) for n, t in self.tables.items()}

    def set_weights(self, name: str, weights: dict[str, float]) -> dict:
        if name not in self.tables:
            return {"error": f"unknown experiment {name!r}; expected one of {sorted(self.tables)}"}
        problems = check_weights(self.tables[name].variants, weights)
        if problems:
            return {"error": "; ".join(problems)}
        old = self.tables[name]
        self.tables[name] = old.reweight(weights)
        self.version += 1
        moved = sum(a != b for a, b in zip(old.owners, self.tables[name].owners, strict=True))
        return {
            "experiment": name,
            "shares": self.tables[name].shares(),
            "moved_users": moved / BUCKETS,
        }

    def add_counts(self, deltas: dict) -> None:
        merge_counts(self.counts, deltas)

    def summary(self) -> dict:
        out = {}
        for name, t in self.tables.items():
            out[name] = {
                "variants": {
                    v: {"weight": w, "share": s, **self.counts.get(name, {}).get(v, {})}
                    for (v, s), w in zip(t.shares().items(), t.weights, strict=True)
                }
            }
        return out
