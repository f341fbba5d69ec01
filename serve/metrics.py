"""Per experiment and variant, counted in each ingress replica: requests, errors, latency and
tokens, and the rewards clients post. Prometheus gets them through Ray's metrics agent; the same
counts are kept here and pushed to the ExperimentState replica every second (serve/ingress.py:
`FleetIngress._sync`), which sums every replica's."""

from __future__ import annotations

from serve.experiments import merge_counts
from serve.release import latency_bucket

REWARD_BOUNDARIES = [0.25, 0.5, 0.75, 1.0]
LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class VariantMetrics:
    """Per experiment and variant: requests, errors, latency, tokens (Prometheus through Ray's
    metrics agent), and the same counts kept here for the JSON summary."""

    def __init__(self):
        from ray.serve import metrics

        tags = ("experiment", "variant")
        self.requests = metrics.Counter(
            "lorafleet_requests", "Requests per experiment variant.", tag_keys=tags
        )
        self.errors = metrics.Counter(
            "lorafleet_errors", "Failed requests per experiment variant.", tag_keys=tags
        )
        self.latency = metrics.Histogram(
            "lorafleet_latency_s",
            "Request latency per experiment variant (seconds, to the last byte).",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=tags,
        )
        self.prompt_tokens = metrics.Counter(
            "lorafleet_prompt_tokens", "Prompt tokens per experiment variant.", tag_keys=tags
        )
        self.completion_tokens = metrics.Counter(
            "lorafleet_completion_tokens",
            "Completion tokens per experiment variant.",
            tag_keys=tags,
        )
        self.feedback = metrics.Counter(
            "lorafleet_feedback",
            "Outcomes (POST /v1/feedback) per experiment variant.",
            tag_keys=tags,
        )
        # a histogram: its _sum is the reward sum (rewards may be negative; a counter cannot fall)
        self.reward = metrics.Histogram(
            "lorafleet_reward",
            "Rewards per experiment variant (_sum: reward sum, _count: outcomes).",
            boundaries=REWARD_BOUNDARIES,
            tag_keys=tags,
        )
        self.pending: dict[str, dict[str, dict[str, float]]] = {}

    def record(self, exp: str, var: str, *, ok: bool, latency_s: float, prompt=0, completion=0):
        tags = {"experiment": exp, "variant": var}
        self.requests.inc(1, tags)
        if not ok:
            self.errors.inc(1, tags)
        self.latency.observe(latency_s, tags)
        if prompt:
            self.prompt_tokens.inc(prompt, tags)
        if completion:
            self.completion_tokens.inc(completion, tags)
        c = self.pending.setdefault(exp, {}).setdefault(var, {})
        for k, v in (
            ("requests", 1),
            ("errors", 0 if ok else 1),
            ("latency_s_sum", latency_s),
            ("prompt_tokens", prompt),
            ("completion_tokens", completion),
            (latency_bucket(latency_s), 1),  # the /ui page's p50/p99 (serve/ui.py)
        ):
            c[k] = c.get(k, 0) + v

    def record_feedback(self, exp: str, var: str, reward: float) -> None:
        tags = {"experiment": exp, "variant": var}
        self.feedback.inc(1, tags)
        self.reward.observe(reward, tags)

    def take(self) -> dict:
        out, self.pending = self.pending, {}
        return out

    def put_back(self, taken: dict) -> None:
        """Counts a failed sync took: added to what came in since, for the next sync (at least
        once: a sync whose reply was lost after the state applied it counts twice)."""
        merge_counts(self.pending, taken)
