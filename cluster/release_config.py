"""The `release:` section of a serve file: a canary release of one adapter version, ramped while
its gates hold, promoted at 100%, rolled back at the first failed gate (serve/release.py runs it
inside the Serve app).

    release:
      adapter: demo-last
      version: null               # the newest published version
      steps: [{percent: 5, hold_s: 300}, {percent: 25, hold_s: 300}, {percent: 50, hold_s: 300},
              {percent: 100, hold_s: 300}]
      gates: {max_error_rate: 0.02, max_p99_ratio: 1.5, min_requests: 50}
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from cluster.schema_base import Section, name_problem


class RampStep(Section):
    percent: float = Field(
        ..., gt=0, le=100, description="Candidate's share of users in this step."
    )
    hold_s: float = Field(..., gt=0, description="Seconds the step runs before its gates are read.")


class GatesConfig(Section):
    max_error_rate: float = Field(
        0.05, ge=0, le=1, description="Most errors per request the candidate may have in a step."
    )
    max_p99_ratio: float = Field(
        1.5,
        gt=0,
        description="Most the candidate's p99 latency may be, as a multiple of the control's.",
    )
    min_requests: int = Field(
        20,
        ge=1,
        description="Requests the candidate needs in a step before its gates are read; "
        "fewer: the step is held longer.",
    )
    max_wait_s: float = Field(
        3600,
        gt=0,
        description="Longest a step may be held for lack of requests; then the release rolls back.",
    )
    outcome: bool = Field(
        True,
        description="With feedback (POST /v1/feedback): roll back when the candidate's mean "
        "reward is below the control's with p < alpha.",
    )
    min_feedback: int = Field(
        20, ge=2, description="Rewards per arm before the outcome gate is read."
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of the outcome gate.")


def default_steps() -> list[RampStep]:
    return [RampStep(percent=p, hold_s=300) for p in (5, 25, 50, 100)]


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
