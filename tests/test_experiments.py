"""Experiment assignment without a server: sticky buckets, weights, least-movement re-weighting."""

from __future__ import annotations

import hashlib
import random
import time

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
    version = state.version
    assert "error" in state.set_weights("e", {"a": -1})
    assert "unknown experiment" in state.set_weights("nope", {"a": 1})["error"]
    assert state.version == version


def test_state_counts_add_up_across_ingress_replicas():
    state = ExperimentState(
        [{"name": "e", "variants": [{"name": "a", "weight": 3}, {"name": "b", "weight": 1}]}]
    )
    state.add_counts({"e": {"a": {"requests": 2, "errors": 1}}})
    state.add_counts({"e": {"a": {"requests": 3}, "b": {"requests": 1}}})
    s = state.summary()["e"]["variants"]
    assert {k: v for k, v in s["a"].items() if k != "outcome"} == {
        "weight": 3,
        "share": 0.75,
        "requests": 5,
        "errors": 1,
    }
    assert s["b"]["requests"] == 1
    before = state.version
    out = state.set_weights("e", {"a": 1, "b": 1})
    assert out["shares"] == {"a": 0.5, "b": 0.5} and out["moved_users"] == pytest.approx(0.25)
    assert state.snapshot(before + 1)[1] is None and state.snapshot(before)[1] is not None


def test_counts_a_failed_sync_took_are_sent_with_the_next_one():
    from collections import Counter

    from serve.metrics import VariantMetrics as _Metrics
    from serve.release import latency_bucket

    m = _Metrics()
    m.record("bot", "a", ok=True, latency_s=0.5, prompt=3, completion=4)
    taken = m.take()  # a sync takes them, then the state replica does not answer
    m.record("bot", "a", ok=False, latency_s=1.0)
    m.record("bot", "b", ok=True, latency_s=0.25, prompt=1, completion=2)
    m.put_back(taken)
    # each request is also counted in its latency bucket (the /ui page's p50/p99)
    lat = {s: latency_bucket(s) for s in (0.5, 1.0, 0.25)}
    assert m.take() == {
        "bot": {
            "a": {
                "requests": 2,
                "errors": 1,
                "latency_s_sum": 1.5,
                "prompt_tokens": 3,
                "completion_tokens": 4,
                **Counter([lat[0.5], lat[1.0]]),
            },
            "b": {
                "requests": 1,
                "errors": 0,
                "latency_s_sum": 0.25,
                "prompt_tokens": 1,
                "completion_tokens": 2,
                lat[0.25]: 1,
            },
        }
    }
    assert m.take() == {}


# --- outcomes: the statistics against scipy and textbook numbers ------------------------------


def _stats(rewards):
    from serve.outcomes import add_reward, parse_reward

    s: dict = {}
    for r in rewards:
        add_reward(s, parse_reward(r))
    return s


def test_two_proportion_z_test_matches_the_textbook_and_chi_square():
    """45 of 100 against 60 of 100: pooled 0.525, se 0.07062, z 2.124, p 0.0337 (two-sided); the
    z-test's p is the 2x2 chi-square's without continuity correction."""
    from scipy.stats import chi2_contingency

    from serve.outcomes import compare, two_proportion_z

    z, p = two_proportion_z(45, 100, 60, 100)
    assert z == pytest.approx(2.1240, abs=1e-4) and p == pytest.approx(0.03367, abs=1e-5)
    chi = chi2_contingency([[45, 55], [60, 40]], correction=False)
    assert p == pytest.approx(chi.pvalue, rel=1e-9) and z * z == pytest.approx(chi.statistic)
    out = compare(_stats([1] * 45 + [0] * 55), _stats(["up"] * 60 + ["down"] * 40))
    assert out["test"] == "two-proportion z" and out["p_value"] == pytest.approx(p)
    assert out["difference"] == pytest.approx(0.15)
    assert two_proportion_z(0, 10, 0, 12) == (0.0, 1.0)  # both all-zero: no difference


def test_welch_t_test_matches_scipy():
    from scipy.stats import ttest_ind

    from serve.outcomes import compare

    rng = random.Random(1)
    a = [rng.gauss(0.5, 0.2) for _ in range(40)]
    b = [rng.gauss(0.6, 0.4) for _ in range(25)]
    out = compare(_stats(a), _stats(b))
    want = ttest_ind(b, a, equal_var=False)
    assert out["test"] == "welch t"
    assert out["statistic"] == pytest.approx(want.statistic, rel=1e-9)
    assert out["p_value"] == pytest.approx(want.pvalue, rel=1e-7)
    assert out["df"] == pytest.approx(want.df, rel=1e-9)
    # one outcome on a side: no test yet, but the difference of means
    few = compare(_stats([0.3]), _stats([0.5, 0.7]))
    assert few["p_value"] is None and few["difference"] == pytest.approx(0.3)


def test_rewards_are_numbers_or_thumbs():
    from serve.outcomes import parse_reward

    assert [parse_reward(x) for x in (1, 0.25, -2, "up", "Down")] == [1.0, 0.25, -2.0, 1.0, 0.0]
    for bad in (None, True, "great", float("nan"), [1]):
        with pytest.raises(ValueError, match="reward must be a number"):
            parse_reward(bad)


AB = [{"name": "e", "variants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]}]


def test_feedback_by_response_id_or_user_reaches_the_variant_that_answered():
    state = ExperimentState([{**AB[0], "control": "b", "min_samples": 3}])
    state.remember("cmpl-1", "e", "a")
    assert state.feedback({"response_id": "cmpl-1", "reward": "up"}) == {
        "experiment": "e",
        "variant": "a",
        "reward": 1.0,
    }
    user_variant = state.tables["e"].assign("e", "ada", random.Random())
    assert state.feedback({"experiment": "e", "user": "ada", "reward": 0})["variant"] == (
        user_variant
    )
    assert state.feedback({"response_id": "cmpl-2", "reward": 1})["status"] == 404
    assert state.feedback({"experiment": "nope", "user": "x", "reward": 1})["status"] == 404
    assert state.feedback({"response_id": "cmpl-1", "reward": "meh"})["status"] == 400
    assert state.feedback({"reward": 1})["status"] == 400
    for i in range(3, 6):  # three more answers of `a` (an id counts once: tests/test_auth.py)
        state.remember(f"cmpl-{i}", "e", "a")
        state.feedback({"response_id": f"cmpl-{i}", "reward": 1})
    out = state.summary()["e"]
    a, b = out["variants"]["a"]["outcome"], out["variants"]["b"]["outcome"]
    assert out["control"] == "b" and b["control"] and "vs_control" not in b
    n_a = 4 + (user_variant == "a")
    assert a["count"] == n_a and a["enough_samples"] and a["vs_control"]["control"] == "b"
    assert a["vs_control"]["enough_samples"] is False  # b has at most one outcome


def test_response_ids_kept_for_feedback_are_bounded(monkeypatch):
    import serve.experiments as ex

    monkeypatch.setattr(ex, "MAX_RESPONSES", 3)
    state = ExperimentState(AB)
    for i in range(5):
        state.remember(f"r{i}", "e", "a")
    assert list(state.responses) == ["r2", "r3", "r4"]


# --- durable state: a fresh ExperimentState on the same storage restores it ------------------


def _durable_roundtrip(uri: str, monkeypatch):
    import serve.experiments as ex

    monkeypatch.setattr(ex, "SAVE_INTERVAL_S", 0.2)
    first = ExperimentState(AB, state_uri=uri)
    first.set_weights("e", {"a": 30, "b": 70})  # saved at once
    first.add_counts({"e": {"a": {"requests": 3}}})
    first.remember("r1", "e", "b")
    first.feedback({"response_id": "r1", "reward": 0.5})
    assert ExperimentState(AB, state_uri=uri).counts["e"]["a"] == {}  # counts wait up to 0.2 s
    time.sleep(0.25)
    first.add_counts({"e": {"b": {"requests": 2}}})  # the ingress's next sync saves them
    fresh = ExperimentState(AB, state_uri=uri)
    assert fresh.tables["e"].owners == first.tables["e"].owners
    assert fresh.tables["e"].weights == [30.0, 70.0]
    assert fresh.counts["e"] == {"a": {"requests": 3}, "b": {"requests": 2}}
    assert fresh.summary()["e"]["variants"]["b"]["outcome"]["mean"] == 0.5
    assert fresh.version != first.version  # an ingress holding the old version re-reads


def test_weights_counts_and_outcomes_survive_a_restart_on_a_local_root(tmp_path, monkeypatch):
    from serve.experiments import state_uri

    uri = state_uri(str(tmp_path / "store"), "app")
    assert uri == str(tmp_path / "store" / "experiments" / "app" / "state.json")
    _durable_roundtrip(uri, monkeypatch)


def test_weights_counts_and_outcomes_survive_a_restart_on_s3(s3_bucket, monkeypatch):
    from serve.experiments import state_uri

    uri = state_uri(f"{s3_bucket}/exp-state", "app")
    assert uri == f"{s3_bucket}/exp-state/experiments/app/state.json"
    _durable_roundtrip(uri, monkeypatch)


def test_an_experiment_whose_variants_changed_starts_from_the_config(tmp_path, capsys):
    uri = str(tmp_path / "state.json")
    other = {"name": "o", "variants": [{"name": "x", "weight": 1}, {"name": "y", "weight": 3}]}
    old = ExperimentState([*AB, other], state_uri=uri)
    old.set_weights("e", {"a": 90, "b": 10})
    old.set_weights("o", {"x": 3, "y": 1})
    changed = {"name": "e", "variants": [*AB[0]["variants"], {"name": "c", "weight": 2}]}
    fresh = ExperimentState([changed, other], state_uri=uri)
    assert fresh.tables["e"].weights == [1, 1, 2]  # the config's
    assert fresh.tables["o"].weights == [3.0, 1.0]  # unchanged variants: restored
    err = capsys.readouterr().out
    assert "experiment 'e' changed its variants" in err and "'o' changed" not in err


# --- admin scope: which key may change experiments --------------------------------------------


def _auth_status(api: list[str], admin: list[str], key: str | None, *, admin_endpoint: bool):
    """The status serve/auth.py's Access answers for `key` on a server with these keys (0:
    allowed)."""
    from starlette.requests import Request

    from serve.auth import Access, ApiError

    access = Access(
        [hashlib.sha256(k.encode()).hexdigest() for k in api],
        [hashlib.sha256(k.encode()).hexdigest() for k in admin],
    )
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    request = Request({"type": "http", "method": "POST", "headers": headers})
    try:
        access.check(request, admin=admin_endpoint)
    except ApiError as e:
        return e.status, e.message
    return 0, ""


def test_admin_endpoints_need_an_admin_key_and_are_closed_by_default_when_keys_are_set():
    both = (["api"], ["root"])
    assert _auth_status(*both, "root", admin_endpoint=True)[0] == 0
    assert _auth_status(*both, "root", admin_endpoint=False)[0] == 0  # admin keys pass as API keys
    assert _auth_status(*both, "api", admin_endpoint=False)[0] == 0
    status, says = _auth_status(*both, "api", admin_endpoint=True)
    assert status == 403 and "needs an admin key" in says
    assert _auth_status(*both, None, admin_endpoint=True)[0] == 401
    assert _auth_status(*both, "nope", admin_endpoint=True)[0] == 401
    # API keys but no admin key: changes are refused, saying how to allow them
    status, says = _auth_status(["api"], [], "api", admin_endpoint=True)
    assert status == 403 and "LORAFLEET_ADMIN_KEYS" in says
    # no keys at all (a local server): reads open, admin closed unless open_admin_on_loopback
    assert _auth_status([], [], None, admin_endpoint=False)[0] == 0
    status, says = _auth_status([], [], None, admin_endpoint=True)
    assert status == 403 and "http.open_admin_on_loopback" in says
