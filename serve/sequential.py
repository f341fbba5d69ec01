"""Always-valid (sequential) statistics for releases and experiments: tests and intervals that
stay at their stated error rate however often they are read, so a gate may look every second.

    python bench/release_sim.py        # the simulation that shows the error rates below

Method: the normal-mixture boundary of Robbins (1970), in the form and with the tuning of
Howard, Ramdas, McAuliffe & Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence
sequences", Ann. Statist. 49(2), 2021 (section 3, the one- and two-sided normal mixtures;
`best_rho` is their choice of the mixture's precision for a target intrinsic time). It is the
mixture SPRT (mSPRT) that Optimizely's Stats Engine runs (Johari, Koomen, Pekelis & Walsh,
"Always valid inference: continuous monitoring of A/B tests", Oper. Res. 70(3), 2022), applied
to the difference of two arms' mean rewards: that difference over its variance is a Brownian
motion in the information 1/Var (the canonical joint distribution of group-sequential tests,
Jennison & Turnbull 2000, ch. 3), whatever the split between the arms and however it changes
from ramp step to ramp step. Each arm's variance is estimated from its rewards (a plug-in), which
makes the sequence valid asymptotically, as in Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas,
"Time-uniform central limit theory and asymptotic confidence sequences", Ann. Statist. 52(6),
2024; a release reads it only once each arm has `min_feedback` rewards.

Why this one: it needs only each arm's count, sum and sum of squares, which are what the ingress
replicas add up and what survives a restart (a betting sequence needs every reward in order); it
works for 0/1 and for any bounded real reward; it allows an unequal, changing split (a 5% canary);
and it gives a decision at any second rather than at planned looks (a group-sequential design
would need the looks fixed in advance, and a ramp's looks depend on its traffic).

The error-rate gate reads requests that are 0/1 and often near 0, where a normal approximation is
poor: it uses an exact mixture SPRT instead, the likelihood ratio of a uniform prior on the rates
above the limit against the limit itself (Robbins 1970; a supermartingale for every rate at or
below the limit), which fires with probability at most alpha on a candidate within the limit.
"""

from __future__ import annotations

import functools
import math

import numpy as np

METHOD = "normal-mixture confidence sequence (mSPRT; Howard et al. 2021)"
ERROR_METHOD = "beta mixture SPRT (Robbins 1970)"


def best_rho(v_opt, alpha: float):
    """The two-sided mixture precision that makes the boundary tightest at intrinsic time v_opt
    (Howard et al. 2021, eq. for the normal mixture; the one-sided mixture uses 2 * alpha)."""
    log_inv = math.log(1 / alpha)
    return v_opt / (2 * log_inv + math.log(1 + 2 * log_inv))


def log_mixture_two_sided(s, v, rho):
    """log of the two-sided normal-mixture supermartingale at sum s and intrinsic time v."""
    return 0.5 * np.log(rho / (v + rho)) + s * s / (2 * (v + rho))


def log_mixture_one_sided(s, v, rho):
    """log of the one-sided normal-mixture supermartingale (a half-normal prior on the drift)."""
    from scipy.special import log_ndtr

    w = v + rho
    return 0.5 * np.log(4 * rho / w) + s * s / (2 * w) + log_ndtr(s / np.sqrt(w))


def two_sided_bound(v, rho, alpha: float):
    """The s at which the two-sided mixture reaches 1/alpha: |S_v| stays below it for all v
    with probability at least 1 - alpha."""
    return np.sqrt((v + rho) * (np.log1p(v / rho) + 2 * math.log(1 / alpha)))


def one_sided_bound(v, rho, alpha: float):
    """The s at which the one-sided mixture reaches 1/alpha (S_v stays below it for all v with
    probability at least 1 - alpha). No closed form: Newton from the two-sided bound at alpha,
    which lies at or above the root of this convex, increasing function, so it converges from
    above, in a few steps; works on arrays."""
    from scipy.special import log_ndtr

    target = math.log(1 / alpha)
    w = np.asarray(v + rho, dtype=float)
    s = two_sided_bound(v, rho, alpha)
    for _ in range(8):
        x = s / np.sqrt(w)
        f = log_mixture_one_sided(s, v, rho) - target
        slope = s / w + np.exp(-0.5 * x * x - 0.5 * math.log(2 * math.pi) - log_ndtr(x)) / np.sqrt(
            w
        )
        s = s - f / slope
    return s


@functools.lru_cache(maxsize=64)
def _unit_bound(alpha: float) -> float:
    """One-sided bound at v = 1 with rho tuned for v = 1; the bound tuned for any v_opt is
    this times sqrt(v_opt) there (the mixture is scale-free)."""
    return float(one_sided_bound(1.0, best_rho(1.0, 2 * alpha), alpha))


def rho_for_margin(margin: float, alpha: float) -> float:
    """The one-sided mixture's precision tuned so the boundary is tightest where its half-width
    equals `margin`: where an identical candidate is first shown non-inferior. It depends on the
    release's settings only, never on its data, as the method requires."""
    v_opt = (_unit_bound(alpha) / margin) ** 2
    return best_rho(v_opt, 2 * alpha)


def arm_variance(n, total, sumsq, nonbinary):
    """Each arm's reward variance, plugged in: for 0/1 rewards p(1 - p) with p shrunk half a
    reward toward 1/2 (never 0 at 0% or 100%); otherwise the sample variance."""
    n = np.asarray(n, dtype=float)
    p = (total + 0.5) / (n + 1)
    sample = np.maximum(sumsq - total * total / np.maximum(n, 1), 0) / np.maximum(n - 1, 1)
    return np.where(np.asarray(nonbinary) > 0, sample, p * (1 - p))


def variances(ctl: dict, cand: dict, nonbinary) -> tuple:
    """Each arm's variance for the test: the larger of its own (`arm_variance`) and that of both
    arms' rewards together. A plug-in from the arm alone is too small, too often, while an arm has
    few rewards (a canary's 20 thumbs at 15% up read as a variance of 0.13, not 0.25): that made
    the sequence exclude the truth in 7% of simulated identical releases at alpha 0.05."""
    n = ctl["n"] + cand["n"]
    total, sumsq = ctl["sum"] + cand["sum"], ctl["sumsq"] + cand["sumsq"]
    both = arm_variance(n, total, sumsq, nonbinary)
    return tuple(
        np.maximum(arm_variance(a["n"], a["sum"], a["sumsq"], nonbinary), both) for a in (ctl, cand)
    )


def difference_bounds(ctl: dict, cand: dict, alpha: float, rho: float) -> tuple:
    """(difference cand - ctl of mean rewards, lower, upper): each bound one-sided at level alpha,
    valid at every time at once. The arms are {n, sum, sumsq, nonbinary} of scalars or arrays;
    n must be >= 1 on both."""
    n1, n2 = (np.asarray(a["n"], dtype=float) for a in (ctl, cand))
    nonbinary = np.maximum(
        np.asarray(ctl.get("nonbinary", 0)), np.asarray(cand.get("nonbinary", 0))
    )
    v1, v2 = variances(ctl, cand, nonbinary)
    var = v1 / n1 + v2 / n2
    diff = cand["sum"] / n2 - ctl["sum"] / n1
    info = 1 / np.maximum(var, 1e-300)
    half = one_sided_bound(info, rho, alpha) / info
    return diff, diff - half, diff + half


WORSE, UNDECIDED, NOT_WORSE = -1, 0, 1


def noninferiority(ctl: dict, cand: dict, margin: float, alpha: float, min_feedback: int):
    """(verdict, difference, lower, upper) of the candidate against the control, on arrays or
    scalars: WORSE when the upper bound of cand - ctl is below 0 (the data show it is worse),
    NOT_WORSE when the lower bound is above -margin (the data show it is not worse by more than
    the margin), else UNDECIDED; UNDECIDED too while either arm has fewer than min_feedback.
    WORSE is checked first. On an identical candidate WORSE comes with probability at most alpha
    over the whole release; on one worse by the margin or more, NOT_WORSE comes with probability
    at most alpha. Between 0 and -margin lies the indifference zone: either may come."""
    ready = np.minimum(np.asarray(ctl["n"]), np.asarray(cand["n"])) >= min_feedback
    safe = {k: np.maximum(np.asarray(v, dtype=float), 1) if k == "n" else v for k, v in ctl.items()}
    safe_cand = {
        k: np.maximum(np.asarray(v, dtype=float), 1) if k == "n" else v for k, v in cand.items()
    }
    diff, low, high = difference_bounds(safe, safe_cand, alpha, rho_for_margin(margin, alpha))
    verdict = np.where(high < 0, WORSE, np.where(low > -margin, NOT_WORSE, UNDECIDED))
    return np.where(ready, verdict, UNDECIDED), diff, low, high


def error_rate_exceeds(errors, requests, max_rate: float, alpha: float):
    """True where the data show an error rate above `max_rate`, at level alpha for any number of
    looks: the mixture of (p / max_rate)^errors ((1 - p) / (1 - max_rate))^(requests - errors)
    over p uniform on [max_rate, 1] has reached 1 / alpha. Works on arrays."""
    from scipy.special import betainc, betaln

    x = np.asarray(errors, dtype=float)
    n = np.asarray(requests, dtype=float)
    if max_rate <= 0:
        return x > 0
    if max_rate >= 1:
        return np.zeros_like(x, dtype=bool)
    tail = 1 - betainc(1 + x, 1 + n - x, max_rate)  # share of the posterior above max_rate
    log_m = (
        betaln(1 + x, 1 + n - x)
        + np.log(np.maximum(tail, 1e-300))
        - math.log(1 - max_rate)
        - x * math.log(max_rate)
        - (n - x) * math.log(1 - max_rate)
    )
    return log_m >= math.log(1 / alpha)


def experiment_comparison(ctl: dict, cand: dict, alpha: float = 0.05, v_opt: float = 200.0):
    """An always-valid two-sided test and interval for an experiment's variant against its
    control: {difference, low, high, p_value, method}. p_value is 1 / (the two-sided mixture
    martingale) for "no difference", capped at 1: at any time, however chosen, it is below alpha
    with probability at most alpha when the variants do not differ. v_opt (in samples of unit
    variance) is where the interval is tightest; the information is standardized by the pooled
    variance for that tuning. None of the numbers while either side has fewer than 2 rewards."""
    n1, n2 = float(ctl.get("n", 0)), float(cand.get("n", 0))
    out = {"difference": None, "low": None, "high": None, "p_value": None, "method": METHOD}
    if min(n1, n2) < 2:
        return out
    nonbinary = max(ctl.get("nonbinary", 0), cand.get("nonbinary", 0))
    v1, v2 = (float(v) for v in variances(ctl, cand, nonbinary))
    diff = cand["sum"] / n2 - ctl["sum"] / n1
    var = v1 / n1 + v2 / n2
    if var <= 0:
        same = diff == 0
        return out | {"difference": diff, "low": diff, "high": diff, "p_value": float(same)}
    pooled = max((v1 * n1 + v2 * n2) / (n1 + n2), 1e-12)
    info = pooled / var  # in samples of the pooled variance
    rho = best_rho(v_opt, alpha)
    s = diff / math.sqrt(var) * math.sqrt(info)
    half = float(two_sided_bound(info, rho, alpha)) / info * math.sqrt(pooled)
    p = min(1.0, math.exp(-float(log_mixture_two_sided(s, info, rho))))
    return out | {"difference": diff, "low": diff - half, "high": diff + half, "p_value": p}


def information_needed(drop: float, margin: float, alpha: float, power: float = 0.8) -> float:
    """The information (1 / variance of the difference of means) at which the release's outcome
    gate decides, with probability `power`, on a candidate `drop` below the control (rolled back),
    or, with drop = margin, on an identical one (shown within the margin: the step passes): the
    bound's half-width plus the power quantile of the estimate fits within `drop`. Read at that
    one time; the gate reads every second, so the chance to have decided by then is larger."""
    from statistics import NormalDist

    rho, z = rho_for_margin(margin, alpha), NormalDist().inv_cdf(power)
    lo, hi = 1e-6, 1e12
    for _ in range(200):  # bisection, in log space
        mid = math.sqrt(lo * hi)
        ok = float(one_sided_bound(mid, rho, alpha)) / mid + z / math.sqrt(mid) <= drop
        lo, hi = (lo, mid) if ok else (mid, hi)
    return hi
