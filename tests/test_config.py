"""The config schema: every shipped YAML validates; every error names key, value, expectation."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config.job import JobConfig
from cluster.config.load import load_config, schema_for
from cluster.config.overrides import parse_overrides
from cluster.config.serve import ServeAppConfig
from cluster.config.validation import with_overrides
from cluster.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_exist():
    assert CONFIGS, "configs/ ships no YAML"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    schema = schema_for(path)
    cfg = load_config(path, schema=schema)
    assert isinstance(cfg, JobConfig | ServeAppConfig)


def test_serve_config_errors_name_key_value_and_expectation(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(
        """
models:
  - {id: tiny, base: tiny://demo, max_lora: 3, autoscaling: {min_replicas: 3, max_replicas: 2}}
experiments:
  - name: bot
    variants:
      - {name: a, model: tiny, adapter: "../etc", weight: 0}
"""
    )
    assert schema_for(p) is ServeAppConfig
    with pytest.raises(ConfigError) as e:
        load_config(p, schema=ServeAppConfig)
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 4, text
    assert "models.0.max_lora: unknown key" in text and "Did you mean" in text
    assert "models.0.autoscaling: expected min_replicas <= max_replicas. Got 3 > 2" in text
    assert "experiments.0.variants.0.adapter" in text and "'../etc'" in text
    assert "experiments.0.variants.0.weight: Input should be greater than 0. Got 0" in text


def test_serve_parallelism_and_quantization_name_the_key_and_what_vllm_takes(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(
        """
models:
  - {id: a, base: x, tensor_parallel_size: 2}
  - {id: b, base: x, use_gpu: true, engine_kwargs: {tensor_parallel_size: 4}}
  - {id: c, base: x, use_gpu: true, quantization: bitsandbytes}
  - {id: d, base: x, use_gpu: true, quantization: nf4}
"""
    )
    with pytest.raises(ConfigError) as e:
        load_config(p, schema=ServeAppConfig)
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 4, text
    assert "models.0: tensor_parallel_size x pipeline_parallel_size: 2 x 1" in text
    assert "needs use_gpu: true" in text and "Got use_gpu: false" in text
    assert "models.1: engine_kwargs.tensor_parallel_size: set models[].tensor_parallel_size" in text
    assert "models.2.quantization: expected one of ['awq'," in text
    assert "no bitsandbytes loader" in text and "Got 'bitsandbytes'" in text
    assert "models.3.quantization" in text and "training's quantization.mode" in text


def test_every_serve_quantization_is_one_the_pinned_vllm_knows():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    from cluster.config.serve import NOT_SERVED_QUANTIZATIONS, SERVE_QUANTIZATIONS

    assert set(SERVE_QUANTIZATIONS) <= set(QUANTIZATION_METHODS)
    assert not set(NOT_SERVED_QUANTIZATIONS) & set(QUANTIZATION_METHODS)


def test_a_quantized_base_checks_adapters_against_the_base_they_were_trained_on(tmp_path):
    """An AWQ checkpoint is not the 16-bit base's files, so its fingerprint differs: with
    `adapters_base`, adapters trained on the 16-bit base are checked against that one's, while
    vLLM loads the quantized checkpoint."""
    from serve.app import resolve

    cfg = load_config(
        None,
        {
            "models": [
                {"id": "m", "base": "org/llama-8b-awq", "use_gpu": True, "quantization": "awq"},
                {
                    "id": "q",
                    "base": "org/llama-8b-awq",
                    "use_gpu": True,
                    "quantization": "awq",
                    "adapters_base": "org/llama-8b",
                },
            ],
            "storage": {"root": str(tmp_path)},
        },
        ServeAppConfig,
    )
    got = resolve(cfg, {})
    assert got.model_sources == {"m": "org/llama-8b-awq", "q": "org/llama-8b-awq"}
    assert got.base_ids == {"m": "hub:org/llama-8b-awq@main", "q": "hub:org/llama-8b@main"}


@pytest.mark.parametrize(
    "tp, pp, strategy", [(1, 1, "STRICT_PACK"), (4, 1, "STRICT_PACK"), (2, 2, "PACK")]
)
def test_a_sharded_replica_reserves_one_gpu_bundle_per_vllm_worker(tp, pp, strategy):
    """The deployment `lorafleet serve` builds for a base sharded over GPUs, as Ray Serve LLM
    reads it: tp x pp bundles of one GPU (the replica's CPUs in the first), the engine told the
    same sizes and the quantization, tensor parallelism packed on one node."""
    from ray.llm._internal.serve.engines.vllm.vllm_models import VLLMEngineConfig

    from cluster.config.serve import ServeModelConfig
    from serve.app import llm_config_for

    m = ServeModelConfig(
        id="big",
        base="org/big-awq",
        use_gpu=True,
        cpus_per_replica=4,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        quantization="awq",
        dtype="float16",
    )
    engine = VLLMEngineConfig.from_llm_config(llm_config_for(m, "org/big-awq"))
    assert engine.num_devices == tp * pp
    assert engine.placement_bundles == [{"GPU": 1, "CPU": 4}] + [{"GPU": 1}] * (tp * pp - 1)
    assert engine.placement_strategy == strategy
    kwargs = engine.engine_kwargs
    assert kwargs["quantization"] == "awq" and kwargs["enable_lora"]
    assert kwargs.get("tensor_parallel_size", 1) == tp
    assert kwargs.get("pipeline_parallel_size", 1) == pp


def test_serve_config_cross_checks(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(
        """
models: [{id: tiny, base: x}, {id: tiny, base: y}]
experiments:
  - {name: tiny, variants: [{name: a, model: tinyy, weight: 1}]}
"""
    )
    with pytest.raises(ConfigError) as e:
        load_config(p, schema=ServeAppConfig)
    text = "\n".join(e.value.problems)
    assert "models: id 'tiny' appears more than once" in text
    assert "experiments[0].name: 'tiny' is also a model id" in text
    assert "experiments[0].variants[0].model: expected one of ['tiny', 'tiny']. Got 'tinyy'" in text
    assert "Did you mean 'tiny'?" in text


def _problems(yaml_text: str, tmp_path, overrides=None) -> list[str]:
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(p, overrides)
    return e.value.problems


def test_all_errors_at_once_each_naming_key_value_and_expectation(tmp_path):
    problems = _problems(
        """
data: {path: x.jsonl, format: sharegpt}
adapter: {r: -4, dropout: 1.5}
training: {learning_rate: fast}
""",
        tmp_path,
    )
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "data.format" in text and "'sharegpt'" in text and "'alpaca'" in text
    assert "adapter.r" in text and "-4" in text and "greater than 0" in text
    assert "adapter.dropout" in text and "1.5" in text and "less than 1" in text
    assert "training.learning_rate" in text and "'fast'" in text and "number" in text


def test_unknown_key_gets_did_you_mean(tmp_path):
    problems = _problems("data: {path: x.jsonl}\ntraining: {learning_rat: 0.1}\n", tmp_path)
    assert len(problems) == 1
    assert "training.learning_rat" in problems[0]
    assert "Did you mean 'training.learning_rate'?" in problems[0]


def test_unknown_top_level_section_gets_did_you_mean(tmp_path):
    problems = _problems("data: {path: x.jsonl}\nquantisation: {mode: 4bit}\n", tmp_path)
    assert "Did you mean 'quantization'?" in problems[0]


def test_missing_required_key_is_named(tmp_path):
    problems = _problems("name: x\n", tmp_path)
    assert problems == ["data: required, but missing"]


def test_cross_field_errors_name_both_keys(tmp_path):
    problems = _problems(
        "data: {path: x.jsonl}\ntraining: {max_steps: 5, warmup_steps: 50, optimizer: paged_adamw_8bit}\n",
        tmp_path,
    )
    text = "\n".join(problems)
    assert "training.warmup_steps" in text and "50" in text and "training.max_steps (5)" in text
    assert "training.optimizer" in text and "use_gpu" in text


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "x" * 200, ""])
def test_names_that_would_escape_the_adapter_store_are_refused(tmp_path, name):
    problems = _problems(f"name: {name!r}\ndata: {{path: x.jsonl}}\n", tmp_path)
    assert problems and problems[0].startswith("name:")
    assert repr(name) in problems[0]


def test_dotted_overrides_are_typed_and_validated():
    assert parse_overrides(
        [
            "training.learning_rate=1e-4",
            "data.packing=false",
            "adapter.target_modules=[q_proj, v_proj]",
        ]
    ) == {
        "training": {"learning_rate": 1e-4},
        "data": {"packing": False},
        "adapter": {"target_modules": ["q_proj", "v_proj"]},
    }
    cfg = load_config(
        ROOT / "configs" / "demo.yaml", ["training.learning_rate=1e-4", "scaling.num_workers=3"]
    )
    assert cfg.training.learning_rate == 1e-4 and cfg.scaling.num_workers == 3
    trial = with_overrides(cfg, {"adapter.r": 4})
    assert trial.adapter.r == 4 and cfg.adapter.r == 16
    with pytest.raises(ConfigError, match="adapter.r"):
        with_overrides(cfg, {"adapter.r": 0})


def test_bad_override_syntax_is_reported():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_overrides(["training.learning_rate"])


def test_trust_remote_code_is_off_by_default():
    assert load_config(None, {"data": {"path": "x.jsonl"}}).model.trust_remote_code is False


def test_cli_validate_reports_and_exits_nonzero(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {path: x.jsonl}\nscaling: {num_worker: 2}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "validate",
            str(ROOT / "configs" / "demo.yaml"),
            str(bad),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "demo.yaml: ok" in proc.stdout
    assert (
        "scaling.num_worker" in proc.stderr and "Did you mean 'scaling.num_workers'?" in proc.stderr
    )


def test_cli_takes_flags_among_the_overrides(capsys):
    from cluster.cli.main import main

    assert (
        main(["validate", str(ROOT / "configs" / "demo.yaml"), "--print", "training.max_steps=70"])
        == 0
    )
    assert "max_steps: 70" in capsys.readouterr().out


def test_serve_client_commands_take_the_key_from_env_or_key_file_and_report_no_server(
    tmp_path, monkeypatch, capsys
):
    from cluster.cli.main import main
    from cluster.config.load import load_config
    from cluster.config.serve import ServeAppConfig

    keys = tmp_path / "keys"
    keys.write_text("\n sk-from-file \nsk-second\n")
    raw = {"name": "x", "models": [{"id": "m", "base": "tiny://demo"}]}
    cfg = load_config(None, {**raw, "http": {"api_keys_file": str(keys)}}, ServeAppConfig)
    monkeypatch.delenv("LORAFLEET_API_KEYS", raising=False)
    assert cfg.http.client_key() == "sk-from-file"
    monkeypatch.setenv("LORAFLEET_API_KEYS", "sk-env,sk-other")
    assert cfg.http.client_key() == "sk-env"

    cfg_path = tmp_path / "serve.yaml"
    cfg_path.write_text("name: x\nmodels: [{id: m, base: 'tiny://demo'}]\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "last: a b\\n", "completion": "b"}\n')
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main(["serve", "eval", str(cfg_path), "m", str(rows), "--url", url]) == 1
    assert f"no lorafleet server at {url}" in capsys.readouterr().err
    assert main(["serve", "eval", str(cfg_path), "m", str(rows), "--limit", "0"]) == 2
    assert "--limit must be at least 1. Got 0" in capsys.readouterr().err


def test_storage_root_comes_from_the_cluster_environment_unless_the_file_sets_it(
    tmp_path, monkeypatch
):
    from cluster.config.load import STORAGE_ROOT_ENV

    job = tmp_path / "job.yaml"
    job.write_text("data: {path: rows.jsonl}\n")
    assert load_config(job).storage.root == "lorafleet-runs"
    monkeypatch.setenv(STORAGE_ROOT_ENV, "s3://bucket/lf")
    assert load_config(job).storage.root == "s3://bucket/lf"
    assert load_config(job, ["storage.root=/mnt/runs"]).storage.root == "/mnt/runs"
    job.write_text("data: {path: rows.jsonl}\nstorage: {root: here}\n")
    assert load_config(job).storage.root == "here"


def test_deepspeed_combinations_that_cannot_train_are_refused_with_the_reason(tmp_path):
    ds3 = "scaling: {strategy: deepspeed, deepspeed: {stage: 3}, use_gpu: true}\n"
    problems = _problems(
        "data: {path: x.jsonl}\nadapter: {use_dora: true}\n"
        "training: {optimizer: paged_adamw_8bit}\n" + ds3,
        tmp_path,
    )
    text = "\n".join(problems)
    assert len(problems) == 2, problems
    assert "adapter.use_dora" in text and "stage=3" in text and "'4bit'" in text
    assert "ds_status" in text  # the error DeepSpeed gives when it is tried
    assert "training.optimizer" in text and "'paged_adamw_8bit'" in text and "deepspeed" in text
    # what does work: DoRA on ZeRO-2 or on an unquantized base, ZeRO-3 QLoRA with adamw
    for ok in (
        "adapter: {use_dora: true}\nscaling: {strategy: deepspeed, deepspeed: {stage: 2}}\n",
        "adapter: {use_dora: true}\nquantization: {mode: none}\n" + ds3,
        ds3,
    ):
        p = tmp_path / "ok.yaml"
        p.write_text("data: {path: x.jsonl}\n" + ok)
        assert load_config(p).scaling.strategy == "deepspeed"


def test_deepspeed_stage_and_strategy_values_are_checked(tmp_path):
    problems = _problems(
        "data: {path: x.jsonl}\nscaling: {strategy: fsdp, deepspeed: {stage: 1}}\n", tmp_path
    )
    text = "\n".join(problems)
    assert "scaling.strategy" in text and "fsdp" in text and "deepspeed" in text
    assert "scaling.deepspeed.stage" in text and "1" in text


def _method_problems_text(yaml_text: str, tmp_path) -> str:
    return "\n".join(_problems("data: {path: x.jsonl, packing: true}\n" + yaml_text, tmp_path))


def test_method_combinations_that_cannot_train_are_refused_with_the_reason(tmp_path):
    problems = _problems(
        "data: {path: x.jsonl}\nadapter: {method: full, use_dora: true}\n", tmp_path
    )
    text = "\n".join(problems)
    assert len(problems) == 2, problems
    assert "adapter.use_dora" in text and "'full'" in text
    assert "quantization.mode" in text and "'4bit'" in text and "cannot take gradient" in text
    prefix = _method_problems_text("adapter: {method: prefix_tuning}\n", tmp_path)
    assert "data.packing" in prefix and "training.gradient_checkpointing" in prefix
    ds = "scaling: {strategy: deepspeed}\nquantization: {mode: none}\n"
    text = _method_problems_text("adapter: {method: adalora}\n" + ds, tmp_path)
    assert "adapter.method" in text and "zeroes the gradients" in text, text
    partial = _method_problems_text(
        "adapter: {method: partial}\nquantization: {mode: none}", tmp_path
    )
    assert "partial_last_n_blocks" in partial and "exactly one" in partial
    text = _method_problems_text(
        "adapter: {method: prompt_tuning, prompt_tuning_init: text}\n", tmp_path
    )
    assert "adapter.prompt_tuning_text" in text
    # what does work: each method with what it needs
    for ok in (
        "adapter: {method: ia3}\n",
        "adapter: {method: adalora, bias: all}\n",
        "adapter: {method: p_tuning}\ndata: {path: x.jsonl, packing: false}\n",
        "adapter: {method: prefix_tuning}\ndata: {path: x.jsonl, packing: false}\n"
        "training: {gradient_checkpointing: false}\n",
        "adapter: {method: partial, partial_modules: [lm_head]}\nquantization: {mode: none}\n",
        "adapter: {method: full}\nquantization: {mode: none}\n",
        "adapter: {method: full}\n" + ds,  # ZeRO-2 and 3 train, checkpoint and resume it
    ):
        p = tmp_path / "ok.yaml"
        p.write_text(ok if "data:" in ok else "data: {path: x.jsonl}\n" + ok)
        cfg, written = load_config(p), yaml.safe_load(p.read_text())
        # the method named and every other setting written, exactly ("lora" in "adalora" won't do)
        assert cfg.adapter.method == written["adapter"]["method"], (ok, cfg.adapter.method)
        assert _settings(cfg.model_dump(mode="json"), written) == written, ok


def _settings(dumped: dict, written: dict) -> dict:
    """The values in `dumped` at the keys of `written` (nested sections alike)."""
    return {
        k: _settings(dumped.get(k) or {}, v) if isinstance(v, dict) else dumped.get(k)
        for k, v in written.items()
    }


def test_optuna_with_a_grid_entry_is_refused_at_validation_naming_the_key(tmp_path):
    """Ray's OptunaSearch refuses a grid_search only inside Ray, after the cluster started: the
    config refuses it first, naming the key, why, and what works (choice)."""
    text = """
data: {path: x.jsonl}
tune:
  search: optuna
  space:
    adapter.r: {grid: [4, 8]}
    training.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}
    adapter.dropout: {choice: [0.0, 0.1]}
"""
    problems = _problems(text, tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].startswith("tune.space.adapter.r: grid cannot be searched by tune.search:")
    assert "expected choice" in problems[0] and "Got {grid: [4, 8]} instead" in problems[0]
    # grid under random or grid search is Ray's grid_search, which those run
    for ok in (
        text.replace("optuna", "random"),
        text.replace("{grid: [4, 8]}", "{choice: [4, 8]}"),
    ):
        (tmp_path / "ok.yaml").write_text(ok)
        assert load_config(tmp_path / "ok.yaml").tune.space["adapter.r"]
