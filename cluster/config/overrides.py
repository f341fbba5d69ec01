"""Dotted command-line overrides (`training.learning_rate=1e-4`) to a nested dict, and the
dict helpers that apply them. Values are parsed by OmegaConf's dotlist (YAML, with 1e-4 read
as a number, which plain YAML 1.1 reads as a string)."""

from __future__ import annotations

from typing import Any

from cluster.errors import ConfigError


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=c` strings to a nested dict; values are parsed as YAML (so 1e-4, true, [a, b] work)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    nested: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected key.path=value")
            continue
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
        except OmegaConfBaseException as e:
            problems.append(f"override {item!r}: {str(e).splitlines()[0]}")
            continue
        nested = deep_merge(nested, parsed)
    if problems:
        raise ConfigError(problems, "command line")
    return nested


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
