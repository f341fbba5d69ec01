"""Outcomes of experiment variants: the rewards clients post to `POST /v1/feedback`, kept per
variant as sums (count, sum, sum of squares, how many were not 0/1), and each variant compared
with the experiment's control.

The comparison is a two-proportion z-test (pooled, two-sided) when every reward of both variants
is 0 or 1 (thumbs up/down), else Welch's t-test (unequal variances, two-sided). Both are read
from the sums alone, so counts from many ingress replicas add up and survive a restart. So is
each variant's 95% interval of its mean: Wilson's score interval when its rewards are all 0/1,
else Student's t interval from the mean and sample variance.

Those fixed-horizon numbers are right once, at a sample size chosen in advance; read each time
the page reloads, they find differences that are not there. So each comparison also carries an
always-valid one (`always_valid`: the difference's 95% confidence sequence and an anytime p-value,
serve/sequential.py, method named), and `winner` is set only when that says so.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from serve.sequential import experiment_comparison

THUMBS = {"up": 1.0, "down": 0.0}
ALPHA = 0.05  # of the always-valid comparison and its winner
DEFAULT_MIN_SAMPLES = 100
Z_95 = NormalDist().inv_cdf(0.975)  # 1.95996...


def parse_reward(value) -> float:
    """A reward as a float: a finite number, or "up" (1) / "down" (0). ValueError says why not."""
    if isinstance(value, str) and value.strip().lower() in THUMBS:
        return THUMBS[value.strip().lower()]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f'reward must be a number or "up"/"down". Got {value!r} instead')
    return float(value)


def add_reward(stats: dict, reward: float) -> None:
    """Add one reward to a variant's sums (in place)."""
    for key, v in (
        ("n", 1),
        ("sum", reward),
        ("sumsq", reward * reward),
        ("nonbinary", 0 if reward in (0.0, 1.0) else 1),
    ):
        stats[key] = stats.get(key, 0) + v


def mean_and_variance(stats: dict) -> tuple[int, float | None, float | None]:
    """(count, mean, sample variance); None where the count is too small to say."""
    n = int(stats.get("n", 0))
    if n == 0:
        return 0, None, None
    mean = stats["sum"] / n
    if n < 2:
        return n, mean, None
    return n, mean, max(stats["sumsq"] - n * mean * mean, 0.0) / (n - 1)


def interval_95(stats: dict) -> dict | None:
    """The 95% interval of a variant's mean reward, {low, high, method}; None with too few.

    All rewards 0/1: Wilson's score interval for the rate (any n >= 1; it stays inside [0, 1]
    and is sound at 0% or 100%). Otherwise Student's t: mean +- t(0.975, n - 1) * s / sqrt(n),
    s the sample standard deviation (n >= 2); it assumes the mean is near normal, which holds
    for bounded rewards once n is a few dozen, and is wider than z's below that."""
    n, mean, var = mean_and_variance(stats)
    if mean is None:
        return None
    if not stats.get("nonbinary"):
        z2 = Z_95 * Z_95
        mid = (mean + z2 / (2 * n)) / (1 + z2 / n)
        half = Z_95 * math.sqrt(mean * (1 - mean) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        return {"low": max(mid - half, 0.0), "high": min(mid + half, 1.0), "method": "wilson"}
    if var is None:
        return None
    from scipy.special import stdtrit  # Student's t quantile; scipy is imported only when needed

    half = float(stdtrit(n - 1, 0.975)) * math.sqrt(var / n)
    return {"low": mean - half, "high": mean + half, "method": "t"}


def two_proportion_z(x1: float, n1: int, x2: float, n2: int) -> tuple[float, float]:
    """(z, two-sided p) for successes x1 of n1 against x2 of n2, with the pooled proportion."""
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    diff = x2 / n2 - x1 / n1
    if se == 0:  # all 0s or all 1s on both sides: the rates are the same
        return 0.0, 1.0
    z = diff / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def welch_t(
    m1: float, v1: float, n1: int, m2: float, v2: float, n2: int
) -> tuple[float, float, float]:
    """(t, Welch-Satterthwaite degrees of freedom, two-sided p) for sample 2 against sample 1."""
    from scipy.special import stdtr  # Student's t CDF; scipy is imported only when needed

    a, b = v1 / n1, v2 / n2
    se = math.sqrt(a + b)
    if se == 0:  # both constant: equal means are the same, different ones surely differ
        return 0.0, float(n1 + n2 - 2), 1.0 if m1 == m2 else 0.0
    t = (m2 - m1) / se
    df = (a + b) ** 2 / (a * a / (n1 - 1) + b * b / (n2 - 1))
    return t, df, float(2 * stdtr(df, -abs(t)))


def compare(control: dict, variant: dict, min_samples: int = DEFAULT_MIN_SAMPLES) -> dict:
    """The variant against the control: test used, difference of means, statistic and p-value
    (None while either side has too few outcomes to test); `always_valid`, the same comparison
    valid however often it is read (its interval tightest near 10 x min_samples per variant),
    and `winner`: "variant" or "control" once its p-value is below ALPHA, else None."""
    n1, m1, v1 = mean_and_variance(control)
    n2, m2, v2 = mean_and_variance(variant)
    binary = not control.get("nonbinary") and not variant.get("nonbinary")
    out = {"test": "two-proportion z" if binary else "welch t", "difference": None}
    out.update(statistic=None, p_value=None)
    seq = experiment_comparison(control, variant, ALPHA, v_opt=5.0 * max(min_samples, 1))
    out["always_valid"], out["winner"] = seq, None
    if seq["p_value"] is not None and seq["p_value"] < ALPHA:
        out["winner"] = "variant" if seq["difference"] > 0 else "control"
    if m1 is None or m2 is None:
        return out
    out["difference"] = m2 - m1
    if binary:
        out["statistic"], out["p_value"] = two_proportion_z(control["sum"], n1, variant["sum"], n2)
    elif v1 is not None and v2 is not None:
        out["statistic"], out["df"], out["p_value"] = welch_t(m1, v1, n1, m2, v2, n2)
    return out


def summarize(stats: dict[str, dict], control: str, min_samples: int) -> dict[str, dict]:
    """Per variant: count, mean, its 95% interval (`interval_95`), whether it has `min_samples`
    outcomes, and (all but the control) the comparison with the control."""
    out = {}
    for name in stats:
        n, mean, _ = mean_and_variance(stats[name])
        row = {"count": n, "mean": mean, "interval_95": interval_95(stats[name])}
        row["min_samples"] = min_samples
        row["enough_samples"] = n >= min_samples
        row["control"] = name == control
        if name != control:
            vs = compare(stats[control], stats[name], min_samples)
            row["vs_control"] = {"control": control, **vs}
            row["vs_control"]["enough_samples"] = row["enough_samples"] and (
                stats[control].get("n", 0) >= min_samples
            )
        out[name] = row
    return out
