"""The `release:` section of a serve file: a canary release of one adapter version, ramped while
its gates hold, promoted at 100%, rolled back at the first failed gate (serve/release.py runs it
inside the Serve app).

    release:
      adapter: demo-last
      version: null               # the newest published version
      steps: [{percent: 10, hold_s: 300}, {percent: 25, hold_s: 300}, {percent: 50, hold_s: 300},
              {percent: 100, hold_s: 300}]
      gates: {max_error_rate: 0.02, max_p99_ratio: 1.5, min_requests: 50, max_reward_drop: 0.1}
      eval: {path: s3://bucket/held-out.jsonl, metric: exact_match, max_drop: 0.02}  # offline first
      shadow: {percent: 20, hold_s: 600}   # then mirrored traffic no user sees

Before any user sees the candidate: `eval` scores it and the control on held-out rows (a larger
drop than max_drop ends the release), then `shadow` mirrors a share of the control's requests to
it, discards its answers, and gates its errors and latency against the control's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cluster.config.base import Section, name_problem


class RampStep(Section):
    percent: float = Field(
        ..., gt=0, le=100, description="Candidate's share of users in this step."
    )
    hold_s: float = Field(..., gt=0, description="Seconds the step runs before its gates are read.")


class GatesConfig(Section):
    max_error_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Most errors per request the candidate may have in a step; it fails the "
        "step once a sequential test shows its rate above this (at alpha / steps), not on a "
        "point estimate.",
    )
    max_p99_ratio: float = Field(
        1.5,
        gt=0,
        description="Most the candidate's p99 latency may be, as a multiple of the control's; "
        "read at the end of each step's hold on the step's requests, once each arm has "
        "min_requests: it fails once a sequential test shows more than 1% of the candidate's "
        "requests above that multiple (at alpha / steps), not on a point estimate.",
    )
    min_requests: int = Field(
        20,
        ge=1,
        description="Requests the candidate needs in a step before its gates are read; "
        "fewer: the step is held longer.",
    )
    max_wait_s: float = Field(
        14400,
        gt=0,
        description="Longest a step may be held after its hold_s: for lack of requests (then "
        "it rolls back) or of outcome evidence (then on_timeout decides). 4 h by default: at "
        "0.5 rewards/s a 10% step needs over an hour to show the default margin "
        "(`lorafleet release plan`).",
    )
    outcome: bool | Literal["auto"] = Field(
        "auto",
        description="The outcome gate on rewards (POST /v1/feedback), a sequential "
        "non-inferiority test: a step advances only once the data show the candidate's mean "
        "reward is not below the control's by more than max_reward_drop, and the release rolls "
        "back once they show it is below the control's; true: every step needs that evidence; "
        "auto: the same once the release has any reward (an app that sends no feedback ramps on "
        "errors and latency alone); false: no outcome gate.",
    )
    max_reward_drop: float = Field(
        0.1,
        gt=0,
        description="The non-inferiority margin, absolute, in reward units (0.1 on thumbs "
        "up/down is 10 points of the thumbs-up rate): the largest drop of the candidate's mean "
        "reward below the control's that a step may still pass.",
    )
    min_feedback: int = Field(
        20, ge=2, description="Rewards per arm before the outcome gate is read."
    )
    alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Error rate of the sequential gates, however often they are read: of the "
        "outcome gate's rollback of an identical candidate and promotion of one worse by "
        "max_reward_drop, and of the error-rate gate firing on a candidate within "
        "max_error_rate (alpha / steps at each step).",
    )
    on_timeout: Literal["rollback", "promote"] = Field(
        "rollback",
        description="What a step does when the outcome gate has not decided within max_wait_s "
        "after its hold: rollback, or promote (advance as if passed; at the last step, "
        "promote). Logged with the numbers either way.",
    )


class ShadowConfig(Section):
    percent: float = Field(
        ...,
        gt=0,
        le=100,
        description="Share of the control's requests the candidate also answers, unseen: its "
        "answers are discarded, its errors and latency gated against the control's (the "
        "error-rate and p99 gates, min_requests of its own), its agreement with the control's "
        "answer logged.",
    )
    hold_s: float = Field(
        ..., gt=0, description="Seconds of shadow traffic before the gates are read."
    )


METRICS = ("exact_match", "f1", "rouge_l", "bleu")


class EvalGateConfig(Section):
    path: str = Field(
        ...,
        min_length=1,
        description="Held-out completion rows (JSONL of {prompt, completion}: a local path on "
        "the serving nodes, or a storage URI such as s3://...), read by the app.",
    )
    metric: Literal["exact_match", "f1", "rouge_l", "bleu"] = Field(
        "exact_match", description="The `lorafleet eval` metric both versions are scored by."
    )
    max_drop: float = Field(
        ...,
        ge=0,
        le=1,
        description="Largest drop of the candidate's score below the control's (absolute, in "
        "the metric's 0-1 units) that still lets the release start.",
    )
    model: str | None = Field(
        None, description="The served model (base) to score on; null: the first that fits."
    )
    max_rows: int = Field(200, ge=1, description="Rows scored (the file's first ones).")
    max_tokens: int = Field(32, ge=1, description="Greedy tokens per answer.")
    timeout_s: float = Field(
        1800, gt=0, description="Longest the scoring may take; then the release rolls back."
    )


def default_steps() -> list[RampStep]:
    # 10% first, not 5%: at 0.5 rewards/s a 5% step cannot show a 0.1 margin within max_wait_s
    # for one identical candidate in ten (bench/release_sim.py); 10% does for 98 in 100
    return [RampStep(percent=p, hold_s=300) for p in (10, 25, 50, 100)]


class ReleaseConfig(Section):
    adapter: str = Field(
        ..., description="The adapter to release; its current version is the control."
    )
    version: str | None = Field(
        None, description="The candidate version; null: the newest published."
    )
    steps: list[RampStep] = Field(
        default_factory=default_steps,
        min_length=1,
        description="The ramp: each step's candidate share and hold; the last must be 100.",
    )
    gates: GatesConfig = Field(
        default_factory=GatesConfig, description="What must hold at each step."
    )
    eval: EvalGateConfig | None = Field(
        None,
        description="Score the candidate and the control offline on held-out rows before any "
        "traffic; null: no eval gate.",
    )
    shadow: ShadowConfig | None = Field(
        None,
        description="A step before the ramp in which the candidate answers mirrored requests "
        "that no user sees; null: no shadow step.",
    )

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, v):
        problem = name_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _ramp(self):
        p = [s.percent for s in self.steps]
        if p != sorted(p) or len(set(p)) != len(p):
            raise ValueError(f"steps: expected rising percents. Got {p} instead")
        if p[-1] != 100:
            raise ValueError(f"steps: the last step must be 100 (it promotes). Got {p[-1]} instead")
        return self
