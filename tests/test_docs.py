"""The README matches the code: its config reference is the schema's, its test command is CI's."""

from __future__ import annotations

from pathlib import Path

from cluster.config_reference import config_reference
from cluster.serve_config import ServeAppConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_config_reference_matches_the_schema():
    rows = config_reference() + config_reference(ServeAppConfig)
    missing = [row for row in rows if row not in README]
    assert not missing, (
        "README config reference is stale; regenerate its rows with `python -m cluster.config_reference [serve]`:\n"
        + "\n".join(missing)
    )


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block and "make test" in first_block
