"""Loading config files: a YAML file plus dotted command-line overrides, validated against its
schema (a job: `cluster.config.job`; a serve file: `cluster.config.serve`).

    lorafleet validate configs/demo.yaml training.learning_rate=1e-4

Every problem in a file is reported at once, each naming the key, the value it got and what it
expects, with a "did you mean" for a mistyped key (`cluster.config.validation`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from cluster.config.job import JobConfig
from cluster.config.overrides import deep_merge, parse_overrides
from cluster.config.serve import ServeAppConfig
from cluster.config.validation import validate
from cluster.errors import ConfigError

# set on every node of a cluster from cluster.yaml: the storage.root of configs that leave it unset
STORAGE_ROOT_ENV = "LORAFLEET_STORAGE_ROOT"


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict | None = None,
    schema: type[BaseModel] = JobConfig,
) -> Any:
    """Read YAML (optional), apply overrides, validate. Raises ConfigError with every problem."""
    raw: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {str(path)!r} does not exist"], source)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if not isinstance(raw, dict):
            raise ConfigError(
                [f"expected a mapping at the top level. Got {type(raw).__name__}"], source
            )
    if overrides:
        over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        raw = deep_merge(raw, over)
    storage = raw.get("storage")
    if os.environ.get(STORAGE_ROOT_ENV) and "storage" in schema.model_fields:
        if not (isinstance(storage, dict) and "root" in storage):
            raw = deep_merge(raw, {"storage": {"root": os.environ[STORAGE_ROOT_ENV]}})
    cfg = validate(schema, raw, source)
    missing = cfg.tracking.missing_packages() if isinstance(cfg, JobConfig) else []
    if missing:
        raise ConfigError(missing, source)
    return cfg


def schema_for(path: str | Path) -> type[BaseModel]:
    """Which schema a config file is written against: serve files have `models`, jobs `data`."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return JobConfig  # load_config reports it
    return (
        ServeAppConfig
        if isinstance(raw, dict) and "models" in raw and "data" not in raw
        else JobConfig
    )


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
