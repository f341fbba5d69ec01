"""configs/recipes/: every recipe and serve file loads with the real loaders, offline (the hub is
not asked: conftest sets HF_HUB_OFFLINE=1), and what can be checked without the hub is.

    .venv/bin/python -m pytest -q tests/test_recipes.py
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

from cluster.cli.main import main
from cluster.config.job import JobConfig
from cluster.config.load import load_config, schema_for
from cluster.config.serve import ServeAppConfig
from train.memory_plan import KNOWN_MODELS, estimate

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes"
JOBS = sorted(p for p in RECIPES.glob("*.yaml") if not p.name.endswith("-serve.yaml"))
SERVES = sorted(RECIPES.glob("*-serve.yaml"))
HEADER_MUST_SAY = (
    "lorafleet ",
    "Hardware:",
    "Expected peak memory per GPU",
    "What to change first",
)


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(
        line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))]
    )


def test_the_recipes_are_there():
    names = {p.stem for p in JOBS}
    assert {"llama-3.1-8b", "qwen2.5-7b", "mistral-7b-v0.3", "llama-3.1-70b"} <= names
    assert {p.name.removesuffix("-serve.yaml") for p in SERVES} == names


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_recipe_validates_with_gpu_qlora_settings(path):
    assert schema_for(path) is JobConfig
    cfg = load_config(path)
    assert cfg.model.base in KNOWN_MODELS  # so `lorafleet plan` answers offline
    assert cfg.scaling.use_gpu and cfg.scaling.resources_per_worker.get("GPU") == 1
    q = cfg.quantization
    assert (q.mode, q.quant_type, q.double_quant, q.compute_dtype) == (
        "4bit",
        "nf4",
        True,
        "bfloat16",
    )
    assert cfg.training.precision in ("bf16", "auto") and cfg.training.gradient_checkpointing
    assert cfg.data.format in ("chat", "alpaca") and re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.data.path)
    text = header(path)
    for words in HEADER_MUST_SAY:
        assert words in text, f"{path.name}: the header does not say {words!r}"
    assert f"configs/recipes/{path.name}" in text


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_header_memory_figure_is_the_plans(path):
    """The figure written in the header is what `lorafleet plan` computes today."""
    cfg = load_config(path)
    said = re.search(
        r"Expected peak memory per GPU \(`lorafleet plan`\): ([\d.]+) GiB", header(path)
    )
    assert said, f"{path.name}: no figure in the header"
    assert float(said.group(1)) == pytest.approx(estimate(cfg).total() / 2**30, abs=0.05)


@pytest.mark.parametrize("path", SERVES, ids=lambda p: p.stem)
def test_serve_file_validates_and_matches_its_recipe(path):
    assert schema_for(path) is ServeAppConfig
    serve = load_config(path, schema=ServeAppConfig)
    job = load_config(RECIPES / path.name.replace("-serve.yaml", ".yaml"))
    assert serve.release is not None and serve.release.adapter == job.name
    assert serve.release.steps[-1].percent == 100
    (model,) = serve.models
    assert model.base == job.model.base and model.use_gpu and model.dtype == "bfloat16"
    assert model.max_lora_rank >= job.adapter.r
    adapters = {v.adapter for e in serve.experiments for v in e.variants}
    assert job.name in adapters
    for words in ("lorafleet ", "Hardware:", "What to change first"):
        assert words in header(path)


def test_plan_on_the_8b_recipe_prints_a_figure_for_a100_80gb_and_l4(capsys):
    recipe = str(RECIPES / "llama-3.1-8b.yaml")
    for gpu in ("A100-80GB", "L4-24GB"):
        assert main(["plan", recipe, "--gpu", gpu]) == 0
        out = capsys.readouterr().out
        assert re.search(r"estimated peak per GPU: [\d.]+ GiB", out), out
        row = re.search(rf"^{gpu}\s+([\d.]+)GiB (yes|tight|no)\s+([+-][\d.]+)G\s+(\d+)", out, re.M)
        assert row, out
        assert row.group(2) == "yes", out  # the recipe is sized to fit both
        assert int(row.group(4)) >= 1
    assert "built-in table" in out  # offline: the fallback shapes, and it says so


def test_plan_refuses_an_unknown_gpu_naming_flag_and_value(capsys):
    assert main(["plan", str(RECIPES / "llama-3.1-8b.yaml"), "--gpu", "B300"]) == 2
    err = capsys.readouterr().err
    assert "--gpu" in err and "'B300'" in err and "A100-80GB" in err


def test_version_comes_from_the_installed_package(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"lorafleet {metadata.version('lorafleet')}")
