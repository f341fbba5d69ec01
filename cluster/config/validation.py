"""Validating raw config dicts against a schema: every pydantic error becomes one readable line
naming the key, what it got and what it expects (with "did you mean" for a mistyped key), and
all of them are raised at once as one ConfigError."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from cluster.config.overrides import deep_merge, parse_overrides, set_dotted
from cluster.errors import ConfigError


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    node: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        if getattr(ann, "__origin__", None) is list:
            ann = ann.__args__[0]
        node = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if node is None:
            return []
    return list(node.model_fields) if node is not None else []


def _lookup(raw: Any, loc: tuple) -> Any:
    node = raw
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return "<missing>"
    return node


def describe_errors(err: ValidationError, raw: dict, schema: type[BaseModel]) -> list[str]:
    """One readable line per pydantic error: key, got, expected (and 'did you mean')."""
    problems = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not str(p).startswith("function-after["))
        key = ".".join(str(p) for p in loc) or "<top level>"
        got = e.get("input", _lookup(raw, loc))
        kind = e["type"]
        if kind == "extra_forbidden":
            parent, leaf = loc[:-1], str(loc[-1])
            known = _known_keys(schema, parent)
            close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
            hint = f" Did you mean '{'.'.join([*map(str, parent), close[0]])}'?" if close else ""
            where = ".".join(map(str, parent)) or "the top level"
            problems.append(
                f"{key}: unknown key (got {got!r}). Expected one of {sorted(known)} in {where}.{hint}"
            )
        elif kind == "missing":
            problems.append(f"{key}: required, but missing")
        elif kind == "value_error" and not loc:
            # cross-field checks carry their own key names, one per line
            msg = e["msg"].removeprefix("Value error, ")
            problems.extend(line for line in msg.split("\n") if line)
        else:
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {msg}. Got {got!r}" if "Got " not in msg else f"{key}: {msg}")
    return problems


def validate(schema: type[BaseModel], raw: dict, source: str = "config") -> Any:
    """`raw` validated against `schema`, or ConfigError with every problem."""
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(describe_errors(e, raw, schema), source) from None


def with_overrides(cfg: BaseModel, overrides: list[str] | dict) -> Any:
    """A new, validated config: `cfg` plus dotted overrides (how a Tune trial is built)."""
    over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
    flat = {}
    for k, v in over.items():
        if "." in k:
            set_dotted(flat, k, v)
        else:
            flat = deep_merge(flat, {k: v})
    return validate(type(cfg), deep_merge(cfg.model_dump(), flat))
