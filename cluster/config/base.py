"""What every config schema shares: strict sections (unknown keys are errors) and the name rule
for anything that becomes a directory name (runs, adapters, experiments, apps)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def is_valid_name(value: str) -> bool:
    """Names become directory names in the adapter store: no separators, no '..'."""
    return isinstance(value, str) and bool(NAME_RE.fullmatch(value)) and ".." not in value


def validate_name(value: str, what: str = "name") -> str:
    if not is_valid_name(value):
        raise ValueError(
            f"{what} must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit and without '..' (it becomes a directory name). Got {value!r} instead"
        )
    return value


# names lorafleet uses itself (store folders, pointer files): never adapter names
RESERVED_NAMES = frozenset(
    {"adapters", "models", "runs", "experiments", "releases", "versions", "current", "latest"}
)


def name_problem(name: str) -> str | None:
    """Why `name` cannot be an adapter name, or None."""
    if not is_valid_name(name):
        return (
            f"invalid adapter name {name!r}: letters, digits, '.', '_', '-' only, starting with a "
            "letter or digit, no '..'"
        )
    if name.lower() in RESERVED_NAMES or name.lower().startswith("lorafleet"):
        return (
            f"adapter name {name!r} is reserved for lorafleet's own use "
            f"({', '.join(sorted(RESERVED_NAMES))}, and names starting with 'lorafleet')"
        )
    return None
