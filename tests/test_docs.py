"""The docs match the code: the configuration reference is the schema's, the site builds with
`--strict` (no broken link, no page left out), the README is a front door (<= 15 KB, every link
resolves), every `lorafleet` command shown in the README and the docs' pages parses with the real
CLI, and CI runs the README's test command.

    .venv/bin/pytest -q tests/test_docs.py
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config.reference import config_reference
from cluster.config.serve import ServeAppConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def test_the_config_reference_page_matches_the_schema():
    page = (DOCS / "reference.md").read_text()
    rows = config_reference() + config_reference(ServeAppConfig)
    missing = [row for row in rows if row not in page]
    assert not missing, (
        "docs/reference.md is stale; regenerate its rows with "
        "`python -m cluster.config.reference --update docs/reference.md`:\n" + "\n".join(missing)
    )


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block and "make test" in first_block


def test_the_readme_is_a_front_door_whose_links_resolve():
    assert len(README.encode()) <= 15 * 1024, len(README.encode())
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    assert links, "the README links into the docs"
    broken = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert not broken, broken


def test_the_docs_site_builds_strict(tmp_path):
    """`make docs` in a test: a broken link, a page missing from the nav or a stale anchor fails."""
    p = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (tmp_path / "site" / "security" / "index.html").is_file()


def _commands(text: str) -> list[str]:
    """Every `lorafleet ...` line inside a ```bash block (comments cut, `\\` lines joined)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"&&|;", line):
                words = part.strip().split()
                if words and words[0].endswith("lorafleet") and "/" not in words[0][:-9]:
                    out.append(part.strip())
                elif words[:1] == [".venv/bin/lorafleet"]:
                    out.append(part.strip())
    return out


PAGES = [README] + [p.read_text() for p in sorted(DOCS.glob("*.md"))]
COMMANDS = sorted({c for text in PAGES for c in _commands(text)})


def test_the_pages_show_commands():
    assert len(COMMANDS) >= 30, COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_shown_is_a_real_subcommand_with_real_flags(command):
    """Parsed by the CLI's own parser, as `lorafleet` would (a usage error exits 2)."""
    from cluster.cli.main import parse

    argv = shlex.split(command)[1:]
    try:
        parse(argv)
    except SystemExit as e:
        raise AssertionError(
            f"`{command}` is not a command lorafleet takes (exit {e.code})"
        ) from None
