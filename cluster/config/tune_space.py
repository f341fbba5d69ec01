"""`tune:`: the search space over dotted job keys, and the checks that every trial it can
produce is a valid job (so a search never starts a trial that would fail at config time)."""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import BaseModel, Field

from cluster.config.base import Section
from cluster.config.validation import with_overrides
from cluster.errors import ConfigError

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")


class TuneSection(Section):
    space: dict[str, dict[str, list]] = Field(
        default_factory=dict,
        description="Dotted config key -> one distribution: {loguniform: [low, high]}, "
        "{uniform: [low, high]}, {randint: [low, high)}, {choice: [a, b, ...]} or {grid: [a, b, ...]}.",
    )
    metric: str = Field(
        "eval_loss", description="What trials are compared on (a metric training reports)."
    )
    mode: Literal["min", "max"] = Field(
        "min", description="Whether smaller or larger `metric` is better."
    )
    num_samples: int = Field(
        6, gt=0, description="Trials to sample (each grid point is run this many times)."
    )
    max_concurrent_trials: int = Field(2, gt=0, description="Trials running at once.")
    scheduler: Literal["asha", "hyperband", "median", "fifo"] = Field(
        "asha",
        description="Early stopping of weak trials: ASHA, HyperBand, median stopping, or none (fifo).",
    )
    search: Literal["random", "grid", "optuna"] = Field(
        "random",
        description="How trials are proposed: random/grid sampling of the space, or Optuna TPE.",
    )
    grace_period_steps: int = Field(
        20, gt=0, description="Training steps every trial runs before it may be stopped early."
    )
    reduction_factor: float = Field(
        3, gt=1, description="ASHA/HyperBand: keep the top 1/factor at each rung."
    )
    brackets: int = Field(
        3,
        gt=0,
        description="HyperBand: ASHA brackets; bracket s first stops trials at "
        "grace_period_steps x reduction_factor^s (ASHA is one bracket).",
    )
    seed: int = Field(0, description="Seed of the search algorithm.")


def _field_for(schema: type[BaseModel], dotted: str):
    """The pydantic field a dotted key names, or (None, known keys at the point it failed)."""
    node = schema
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = node.model_fields
        if part not in fields:
            return None, [".".join([*parts[:i], k]) for k in fields]
        ann = fields[part].annotation
        if i < len(parts) - 1:
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return None, [".".join(parts[: i + 1])]
            node = ann
    return fields[parts[-1]], []


# what the training loop reports at every eval (what `tune.metric` may name), and which way is better
REPORTED_METRICS = {
    "eval_loss": "min",
    "eval_perplexity": "min",
    "loss": "min",
    "tokens_per_s": "max",
}
# reported only with training.generation_eval_rows > 0 (generation eval at every eval step)
GENERATION_METRICS = {"eval_exact_match": "max", "eval_f1": "max"}


def _metric_problems(cfg) -> list[str]:
    """tune.metric must be one that training reports, and tune.mode its direction."""
    problems = []
    t = cfg.tune
    if t.metric in GENERATION_METRICS:
        if not cfg.training.generation_eval_rows:
            problems.append(
                f"tune.metric: {t.metric} is reported only when generation eval is on; expected "
                "training.generation_eval_rows > 0 (e.g. 50). Got "
                f"tune.metric={t.metric!r} with training.generation_eval_rows=0 instead"
            )
        elif t.mode != "max":
            problems.append(
                f"tune.mode: {t.metric} is better when larger; expected 'max'. Got {t.mode!r} instead"
            )
    elif t.metric not in REPORTED_METRICS:
        problems.append(
            f"tune.metric: training reports {sorted(REPORTED_METRICS)}. Got {t.metric!r} instead"
        )
    elif REPORTED_METRICS[t.metric] != t.mode:
        problems.append(
            f"tune.mode: {t.metric} is better when {'smaller' if REPORTED_METRICS[t.metric] == 'min' else 'larger'}; "
            f"expected '{REPORTED_METRICS[t.metric]}'. Got {t.mode!r} instead"
        )
    return problems


def _epoch_problems(cfg) -> list[str]:
    """Space keys that training.epochs (made steps once, on the driver) cannot follow."""
    problems = []
    epoch_keys = ("training.epochs", "training.batch_size", "training.grad_accum_steps")
    for key in [k for k in cfg.tune.space if k in epoch_keys + ("scaling.num_workers",)]:
        if key == "training.epochs":
            problems.append(
                "tune.space.training.epochs: trials run steps (training.epochs becomes steps once, "
                "on the driver); expected training.max_steps in the space instead"
            )
        elif cfg.training.epochs is not None:
            problems.append(
                f"tune.space.{key}: training.epochs becomes steps once, on the driver, from the "
                "base config's batch size, accumulation and workers, so trials cannot change "
                f"{key}; expected training.max_steps with this space. Got training.epochs="
                f"{cfg.training.epochs:g} instead"
            )
    return problems


def check_space(cfg) -> list[str]:
    """Every problem in `tune.space`, `tune.metric` and `tune.mode`, each naming its key."""
    problems = _metric_problems(cfg) + _epoch_problems(cfg)
    for key, dist in cfg.tune.space.items():
        where = f"tune.space.{key}"
        f, known = _field_for(type(cfg), key)
        if f is None or key.startswith(("tune", "name", "storage", "ray")):
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(f"{where}: not a config key that a trial can change.{hint}")
            continue
        if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            problems.append(
                f"{where}: expected exactly one of {list(DISTRIBUTIONS)}. Got {dist!r} instead"
            )
            continue
        kind, args = next(iter(dist.items()))
        if kind in ("choice", "grid"):
            if not args:
                problems.append(f"{where}: {kind} needs at least one value. Got [] instead")
                continue
            values = args
        else:
            if len(args) != 2 or not all(
                isinstance(a, int | float) and not isinstance(a, bool) for a in args
            ):
                problems.append(f"{where}: {kind} needs [low, high] numbers. Got {args!r} instead")
                continue
            low, high = args
            if low >= high:
                problems.append(
                    f"{where}: {kind} needs low < high. Got low={low}, high={high} instead"
                )
                continue
            if kind == "loguniform" and low <= 0:
                problems.append(f"{where}: loguniform needs low > 0. Got {low} instead")
                continue
            values = [low, high - 1 if kind == "randint" else high]
        # every value the space can produce must be a valid config
        for v in values:
            try:
                with_overrides(cfg.model_copy(update={"tune": TuneSection()}), {key: v})
            except ConfigError as e:
                problems.append(f"{where}: value {v!r} makes an invalid trial: {e.problems[0]}")
                break
    if (
        cfg.tune.space
        and cfg.tune.search == "grid"
        and any(k not in ("grid", "choice") for d in cfg.tune.space.values() for k in d)
    ):
        problems.append("tune.search: grid needs every tune.space entry to be grid or choice")
    if cfg.tune.search == "optuna":
        # Ray's OptunaSearch refuses a grid_search inside Ray ("Grid search parameters cannot be
        # automatically converted"), after the cluster has started: refuse it here instead
        problems += [
            f"tune.space.{key}: grid cannot be searched by tune.search: optuna (Optuna proposes "
            "each trial; Ray's OptunaSearch refuses grid_search); expected choice with these "
            f"values, or tune.search: grid or random. Got {{grid: {dist['grid']!r}}} instead"
            for key, dist in cfg.tune.space.items()
            if "grid" in dist
        ]
    return problems
