"""Experiment assignment without a server: sticky buckets, weights, least-movement re-weighting."""

from __future__ import annotations

import random

import pytest

from serve.experiments import BUCKETS, ExperimentState, Table, bucket, check_weights, quotas


def test_quotas_are_proportional_and_sum_to_the_bucket_count():
    assert quotas([80, 20]) == [8000, 2000]
    assert sum(quotas([1, 1, 1])) == BUCKETS
    assert quotas([1, 1, 1]) == [3334, 3333, 3333]


def test_initial_ranges_are_contiguous_and_sized_by_weight():
    t = Table(["a", "b", "c"], [50, 30, 20])
    assert t.owners == [0] * 5000 + [1] * 3000 + [2] * 2000


def test_a_user_always_gets_the_same_variant_and_the_split_follows_the_weights():
    t = Table(["a", "b"], [80, 20])
    rng = random.Random(0)
    users = [f"user-{i}" for i in range(20_000)]
    first = [t.assign("exp", u, rng) for u in users]
    assert first == [t.assign("exp", u, rng) for u in users]
    share_a = first.count("a") / len(users)
    assert abs(share_a - 0.8) < 0.015  # 20k users: sd 0.0028
    # no user id: random by weight
    anon = [t.assign("exp", None, rng) for _ in range(20_000)]
    assert abs(anon.count("a") / len(anon) - 0.8) < 0.015


@pytest.mark.parametrize(
    ("before", "after"),
    [([80, 20], [70, 30]), ([50, 30, 20], [20, 30, 50]), ([34, 33, 33], [10, 80, 10])],
)
def test_moving_w_percent_of_weight_moves_w_percent_of_users_and_no_more(before, after):
    names = [f"v{i}" for i in range(len(before))]
    old = Table(names, before)
    new = old.reweight(dict(zip(names, after, strict=True)))
    moved = sum(a != b for a, b in zip(old.owners, new.owners, strict=True)) / BUCKETS
    # the least any re-weighting can move: half the total absolute change of the shares
    least = (
        sum(abs(a / sum(after) - b / sum(before)) for a, b in zip(after, before, strict=True)) / 2
    )
    assert moved == pytest.approx(least, abs=2 / BUCKETS)
    assert [new.owners.count(i) for i in range(len(names))] == quotas(after)
    # users whose bucket stayed put keep their variant
    users = [f"u{i}" for i in range(5000)]
    rng = random.Random(0)
    changed = sum(old.assign("x", u, rng) != new.assign("x", u, rng) for u in users) / len(users)
    assert abs(changed - least) < 0.03


def test_bucket_depends_on_the_experiment_too():
    same = sum(bucket("a", f"u{i}") == bucket("b", f"u{i}") for i in range(1000))
    assert same < 10


def test_weight_problems_are_named():
    assert check_weights(["a", "b"], {"a": 0, "c": 1, "b": "x"}) == [
        "weight of 'a' must be a positive number. Got 0 instead",
        "unknown variant 'c'; expected one of ['a', 'b']",
        "weight of 'b' must be a positive number. Got 'x' instead",
    ]
    state = ExperimentState([{"name": "e", "variants": [{"name": "a", "weight": 1}]}])
    assert "error" in state.set_weights("e", {"a": -1})
    assert "unknown experiment" in state.set_weights("nope", {"a": 1})["error"]
    assert state.version == 0


def test_state_counts_add_up_across_ingress_replicas():
    state = ExperimentState(
        [{"name": "e", "variants": [{"name": "a", "weight": 3}, {"name": "b", "weight": 1}]}]
    )
    state.add_counts({"e": {"a": {"requests": 2, "errors": 1}}})
    state.add_counts({"e": {"a": {"requests": 3}, "b": {"requests": 1}}})
    s = state.summary()["e"]["variants"]
    assert s["a"] == {"weight": 3, "share": 0.75, "requests": 5, "errors": 1}
    assert s["b"]["requests"] == 1
    out = state.set_weights("e", {"a": 1, "b": 1})
    assert out["shares"] == {"a": 0.5, "b": 0.5} and out["moved_users"] == pytest.approx(0.25)
    assert state.snapshot(1)[1] is None and state.snapshot(0)[1] is not None


def test_counts_a_failed_sync_took_are_sent_with_the_next_one():
    from serve.ingress import _Metrics

    m = _Metrics()
    m.record("bot", "a", ok=True, latency_s=0.5, prompt=3, completion=4)
    taken = m.take()  # a sync takes them, then the state replica does not answer
    m.record("bot", "a", ok=False, latency_s=1.0)
    m.record("bot", "b", ok=True, latency_s=0.25, prompt=1, completion=2)
    m.put_back(taken)
    assert m.take() == {
        "bot": {
            "a": {
                "requests": 2,
                "errors": 1,
                "latency_s_sum": 1.5,
                "prompt_tokens": 3,
                "completion_tokens": 4,
            },
            "b": {
                "requests": 1,
                "errors": 0,
                "latency_s_sum": 0.25,
                "prompt_tokens": 1,
                "completion_tokens": 2,
            },
        }
    }
    assert m.take() == {}
