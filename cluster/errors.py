"""The one error base class of lorafleet: every error meant for a user derives from it.

The CLI catches `LorafleetError`, prints its message (no traceback) and exits 2, without
importing train, tune, serve or torch to know what it caught.
"""

from __future__ import annotations


class LorafleetError(Exception):
    """A problem the user can fix: bad config, bad data, a missing file, an unreachable model."""


class ConfigError(LorafleetError, ValueError):
    """All the problems found in one config, one per line."""

    def __init__(self, problems: list[str] | str, source: str = "config"):
        if isinstance(problems, str):  # one problem given as a string, not one per character
            problems = [problems]
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


class ModelError(LorafleetError):
    """A base model that cannot be found or loaded: an unknown `tiny://` name, a hub id that
    could not be loaded."""
