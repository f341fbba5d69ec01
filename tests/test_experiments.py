"""Experiment assignment without a server: sticky buckets, weights, least-movement re-weighting."""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

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


# --- signed response ids: feedback without a lookup (serve/feedback_ids.py) -------------------

SECRET = b"s" * 32
VERSION = "20261202-003015-123-9f3a"


def _ids(secret=SECRET, max_age_s=3600.0):
    from serve.feedback_ids import FeedbackIds

    return FeedbackIds(secret, max_age_s)


def test_a_signed_id_carries_its_answer_is_short_and_url_safe():
    import re

    from serve.feedback_ids import Answer
    from serve.release_gates import ARMS

    now = time.time()
    rid = _ids().sign("bot", "b", "t-reply", VERSION, "candidate", now=now)
    assert re.fullmatch(r"lf1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{22}", rid) and len(rid) < 110, rid
    got = _ids().verify(rid, now=now + 5)
    assert isinstance(got, Answer) and got.issued == int(now) and len(got.nonce) == 11
    assert (got.experiment, got.variant, got.adapter, got.version, got.arm) == (
        "bot", "b", "t-reply", VERSION, "candidate",
    )  # fmt: skip
    base_variant = _ids().verify(_ids().sign("bot", "a"))  # a variant on the base model
    assert (base_variant.adapter, base_variant.version, base_variant.arm) == (None, None, None)
    release_only = _ids().verify(_ids().sign(None, None, "t-last", VERSION, "control"))
    assert release_only.experiment is None and release_only.arm == "control"
    assert _ids().sign("bot", "a") != _ids().sign("bot", "a")  # each answer its own nonce
    assert all(arm in __import__("serve.feedback_ids").feedback_ids.ARMS for arm in ARMS)
    assert "s" * 32 not in repr(_ids())


def _flip(text: str, at: int) -> str:
    return text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1 :]


def _bad_ids() -> dict:
    now = time.time()
    rid = _ids().sign("bot", "b", "t-reply", VERSION, now=now)
    head, payload, mac = rid.split(".")
    return {
        "tampered payload": (
            _flip(rid, 4 + len(payload) // 2),
            400,
            "does not match its signature",
        ),
        "tampered mac": (_flip(rid, len(rid) - 3), 400, "does not match its signature"),
        "wrong secret": (_ids(b"t" * 32).sign("bot", "b", now=now), 400, "does not match"),
        "payload swapped in": (
            f"{head}.{_ids().sign('bot', 'a', now=now).split('.')[1]}.{mac}",
            400,
            "does not match its signature",
        ),
        "truncated mac": (rid[:-1], 400, "malformed response id"),
        "truncated payload": (f"{head}.{payload[:-4]}.{mac}", 400, "does not match"),
        "expired": (_ids().sign("bot", "b", now=now - 3601), 410, "expired"),
        "from the future": (_ids().sign("bot", "b", now=now + 3600), 400, "in the future"),
        "garbage": ("lf1.%%%.x", 400, "malformed response id"),
        "empty parts": ("lf1..", 400, "malformed response id"),
        "a lone surrogate": ("lf1.\ud800" + "A" * 30 + "." + "A" * 22, 400, "malformed"),
        "huge": ("lf1." + "A" * 100_000 + "." + "A" * 22, 400, "malformed response id"),
        "not a string": (12345, 400, "malformed response id 'int'"),
    }


@pytest.mark.parametrize("case", sorted(_bad_ids()))
def test_a_forged_altered_truncated_or_expired_id_is_refused_with_the_reason(case):
    from serve.feedback_ids import BadResponseId

    rid, status, says = _bad_ids()[case]
    with pytest.raises(BadResponseId) as e:
        _ids().verify(rid)
    assert e.value.status == status and says in e.value.message, (case, e.value.message)


def test_the_record_of_rewarded_ids_is_bounded_and_refuses_what_it_let_go():
    from serve.feedback_ids import RewardedOnce

    r = RewardedOnce(limit=3)
    now = 10_000
    assert [r.claim(f"n{i}", 100 + i, now, 1e9) for i in range(4)] == [None] * 4
    assert sorted(r.ids) == ["n1", "n2", "n3"] and r.floor == 100  # n0 (the oldest) let go
    assert r.claim("n0", 100, now, 1e9) == 410  # it cannot be told from a replay: refused
    assert r.claim("n3", 103, now, 1e9) == 409
    assert r.claim("n4", 104, now, max_age_s=now - 102) is None  # ids given before 102 leave
    assert sorted(r.ids) == ["n2", "n3", "n4"] and r.floor == 101
    again = RewardedOnce.from_json(json.loads(json.dumps(r.to_json())), limit=3)
    assert (again.ids, again.floor, again.claim("n3", 103, now, 1e9)) == (r.ids, 101, 409)
    with pytest.raises((TypeError, ValueError)):
        RewardedOnce.from_json({"floor": 0, "ids": {"x": "soon"}})


def _signed_feedback(state, signer, rid, reward=1):
    from serve.feedback_ids import BadResponseId

    try:
        answer = signer.verify(rid).as_dict()
    except BadResponseId as e:
        return {"status": e.status, "error": e.message}
    return state.feedback({"response_id": rid, "reward": reward}, answer, signer.max_age_s)


def test_a_signed_id_is_rewarded_once_also_after_a_restart(tmp_path, monkeypatch, capsys):
    """An id counts once; restarted on the same storage, the state keeps the secret (every id
    still verifies) and the record (a replay is still 409)."""
    import serve.experiments as ex
    from serve.feedback_ids import FeedbackIds

    monkeypatch.delenv("LORAFLEET_FEEDBACK_SECRET", raising=False)
    monkeypatch.setattr(ex, "SAVE_INTERVAL_S", 0.0)
    uri = ex.state_uri(str(tmp_path / "store"), "app")
    state = ExperimentState(AB, state_uri=uri)
    signer = FeedbackIds(state.feedback_key(), 3600)
    ids = [signer.sign("e", "b", "t-reply", VERSION) for _ in range(3)]
    first = _signed_feedback(state, signer, ids[0], "up")
    assert first == {"experiment": "e", "variant": "b", "version": VERSION, "reward": 1.0}
    assert _signed_feedback(state, signer, ids[0])["status"] == 409
    rel = signer.sign(None, None, "t-last", VERSION, "candidate")
    assert _signed_feedback(state, signer, rel)["release"] == ["t-last", "candidate"]
    secret_file = tmp_path / "store" / "experiments" / "app" / "feedback-secret"
    assert secret_file.stat().st_mode & 0o077 == 0  # only its owner reads it
    assert secret_file.read_text().strip() not in capsys.readouterr().out  # never logged
    fresh = ExperimentState(AB, state_uri=uri)
    assert fresh.feedback_key() == state.feedback_key()
    resigner = FeedbackIds(fresh.feedback_key(), 3600)
    for rid in (ids[0], rel):
        replay = _signed_feedback(fresh, resigner, rid)
        assert replay["status"] == 409 and "already rewarded" in replay["error"]
    assert _signed_feedback(fresh, resigner, ids[1])["variant"] == "b"
    assert fresh.outcomes["e"]["b"]["n"] == 2
    gone = ExperimentState([{"name": "other", "variants": AB[0]["variants"]}], state_uri=uri)
    assert _signed_feedback(gone, resigner, ids[2])["status"] == 404  # its experiment is gone


def test_a_stopping_state_saves_the_rewards_it_took_and_an_unreadable_one_refuses_older_ids(
    tmp_path, monkeypatch
):
    import serve.experiments as ex

    monkeypatch.delenv("LORAFLEET_FEEDBACK_SECRET", raising=False)
    uri = ex.state_uri(str(tmp_path), "app")
    state = ExperimentState(AB, state_uri=uri)
    signer = _ids(state.feedback_key())
    first, rid = (signer.sign("e", "a", now=time.time() - 5) for _ in range(2))
    assert _signed_feedback(state, signer, first)["variant"] == "a"  # saved (the first change)
    assert _signed_feedback(state, signer, rid)["variant"] == "a"  # not yet: 2 s after that
    nonce = signer.verify(rid).nonce
    assert nonce not in Path(uri).read_text()
    state.__del__()  # what Serve calls when it stops the replica
    assert nonce in Path(uri).read_text()
    assert _signed_feedback(ExperimentState(AB, state_uri=uri), signer, rid)["status"] == 409
    Path(uri).write_text("{not json")
    blind = ExperimentState(AB, state_uri=uri)
    later = _signed_feedback(blind, signer, signer.sign("e", "a", now=time.time() - 5))
    assert later["status"] == 410  # which were rewarded is unknown: none is counted again
    assert _signed_feedback(blind, signer, signer.sign("e", "a", now=time.time() + 2))["variant"]


def test_the_feedback_secret_comes_from_the_environment_or_one_kept_beside_the_state(tmp_path):
    from serve.feedback_ids import load_secret

    key = "k" * 40
    assert load_secret(None, {"LORAFLEET_FEEDBACK_SECRET": key}) == key.encode()
    (tmp_path / "secret").write_text(key + "\n")
    env = {"LORAFLEET_FEEDBACK_SECRET_FILE": str(tmp_path / "secret")}
    assert load_secret(None, env) == key.encode()
    with pytest.raises(ValueError, match="needs 32 or more") as e:
        load_secret(None, {"LORAFLEET_FEEDBACK_SECRET": "short-secret"})
    assert "short-secret" not in str(e.value)
    with pytest.raises(ValueError, match="cannot read"):
        load_secret(None, {"LORAFLEET_FEEDBACK_SECRET_FILE": str(tmp_path / "nope")})
    uri = str(tmp_path / "store" / "experiments" / "app" / "state.json")
    made = load_secret(uri, {}, log=lambda *_: None)
    assert len(made) == 32 and load_secret(uri, {}) == made  # generated once, then read
    assert load_secret(None, {}) != load_secret(None, {})  # in memory only: one per start


def test_a_reward_for_an_earlier_release_of_the_adapter_does_not_reach_this_ones_gate():
    from serve.routes.experiments import release_current

    running = {"t-last": ("v-control", "v-candidate", None, 0.0)}  # as the ingress holds it
    result = {"release": ["t-last", "candidate"], "version": "v-candidate"}
    assert release_current(running, result)
    assert not release_current(running, result | {"version": "v-older"})
    assert release_current(
        running, result | {"release": ["t-last", "control"], "version": "v-control"}
    )
    assert release_current({}, result)  # not routed here: the manager decides


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
