"""Experiments' always-valid comparison (serve/outcomes.py: compare's `always_valid` and `winner`):
read after every batch of feedback, as the /ui page and GET /v1/experiments are, an A/A experiment
shows a winner in at most alpha of runs, where the fixed-horizon p-value read as often finds one
in several times as many; a real difference gets its winner."""

from __future__ import annotations

import random

from scipy.stats import binom

from serve.outcomes import ALPHA, add_reward, compare, summarize


def _run(rng: random.Random, rate_a: float, rate_b: float, looks: int, per_look: int):
    """(first look with a winner or None, first look with fixed-horizon p < alpha or None, winner)."""
    a, b = {}, {}
    winner_at = peek_at = winner = None
    for look in range(looks):
        for _ in range(per_look):
            add_reward(a, float(rng.random() < rate_a))
            add_reward(b, float(rng.random() < rate_b))
        c = compare(a, b, min_samples=100)
        if winner_at is None and c["winner"]:
            winner_at, winner = look, c["winner"]
        if peek_at is None and c["p_value"] is not None and c["p_value"] < ALPHA:
            peek_at = look
    return winner_at, peek_at, winner


def test_an_aa_experiment_read_every_batch_rarely_shows_a_winner():
    rng = random.Random(4)
    runs = [_run(rng, 0.3, 0.3, looks=60, per_look=40) for _ in range(300)]
    winners = sum(w is not None for w, _, _ in runs)
    peeks = sum(p is not None for _, p, _ in runs)
    assert winners <= binom.isf(1e-3, 300, ALPHA), winners
    assert peeks > 3 * ALPHA * 300, peeks  # what the fixed-horizon p-value does when peeked at


def test_a_real_difference_gets_its_winner_and_the_method_is_named():
    rng = random.Random(5)
    winner_at, _, winner = _run(rng, 0.3, 0.4, looks=60, per_look=40)
    assert winner == "variant" and winner_at is not None
    a, b = {}, {}
    for _ in range(100):
        add_reward(a, 1.0)
        add_reward(b, 0.0)
    row = summarize({"a": a, "b": b}, "a", 100)["b"]["vs_control"]
    assert "mSPRT" in row["always_valid"]["method"] and row["always_valid"]["high"] < 0
    assert row["winner"] == "control"
    assert compare({}, {})["winner"] is None and compare({}, {})["always_valid"]["p_value"] is None
