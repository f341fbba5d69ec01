"""DeepSpeed ZeRO as the training strategy: real DeepSpeed on its CPU accelerator, over the gloo
group Ray Train sets up, 2 workers, a 4-bit NF4 base with a LoRA adapter.

Each training run is a `lorafleet train` subprocess joined to the session's Ray, with a hard
timeout: a DeepSpeed hang (a collective one rank never reaches, a JIT build waiting on a stale
lock) fails the test with the run's output instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, current_adapter, job_config

from cluster.config.load import dump_config
from cluster.errors import ConfigError
from tests.helpers.toolbox import stop_processes

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 420  # a run takes ~30 s alone; a busy 2-core machine stretched one past 150 s
STEPS = 8
EVERY = 4


def _cfg(tmp: Path, tiny_base, task_data, name: str, stage: int, **extra):
    return job_config(
        tmp,
        tiny_base,
        task_data["train"],
        name=name,
        **{
            "scaling.num_workers": 2,
            "scaling.strategy": "deepspeed",
            "scaling.deepspeed.stage": stage,
            "training.max_steps": STEPS,
            "training.eval_every_steps": EVERY,
            "training.log_every_steps": EVERY,
        }
        | extra,
    )


def _train(cfg, tmp: Path, ray_address: str) -> tuple[list[dict], str]:
    """`lorafleet train` in a subprocess (its own process group, killed on timeout); returns the
    run's metrics history and its output."""
    path = tmp / f"{cfg.name}.yaml"
    path.write_text(dump_config(cfg))
    cmd = [sys.executable, "-m", "cluster.cli", "train", str(path), f"ray.address={ray_address}"]
    from cluster.ray_connect import state_api_address

    env = os.environ | {"RAY_API_SERVER_ADDRESS": state_api_address()}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # the group this test started, by its leader's PID: SIGKILL at once
        stop_processes(groups=[proc.pid], timeout_s=0)
        out, _ = proc.communicate()
        pytest.fail(f"DeepSpeed run {cfg.name} hung past {RUN_TIMEOUT_S}s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    assert "shm_comm" not in out, "DeepSpeed built its shared-memory comm op (a JIT C++ build)"
    runs = sorted((Path(cfg.storage.root) / "runs" / cfg.name).glob("run-*"))
    lines = (runs[-1] / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()], out


@pytest.fixture(scope="module")
def ray_address(ray_local):
    return ray_local.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, tiny_base, task_data, ray_address) -> dict:
    """One short run per ZeRO stage, same seed and data: {stage: (cfg, history)}. ZeRO-3 keeps
    parameters under 1e5 elements whole on every rank (stage3_param_persistence_threshold), and
    this adapter's are that small; a JSON file (the user's way to tune DeepSpeed) sets it to 0, so
    every LoRA weight is partitioned as a large model's are."""
    runs = {}
    for stage in (2, 3):
        tmp = tmp_path_factory.mktemp(f"zero{stage}")
        extra = {}
        if stage == 3:
            (tmp / "ds.json").write_text(
                json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}})
            )
            extra = {"scaling.deepspeed.config": str(tmp / "ds.json")}
        cfg = _cfg(tmp, tiny_base, task_data, f"zero{stage}", stage, **extra)
        runs[stage] = (cfg, _train(cfg, tmp, ray_address)[0])
    return runs


def _evals(history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}


def _adapter(cfg) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(
        str(Path(current_adapter(cfg.storage.root, cfg.name), "adapter_model.safetensors"))
    )


def test_zero2_and_zero3_train_qlora_and_agree(zero_runs):
    for stage, (_, history) in zero_runs.items():
        evals = _evals(history)
        assert sorted(evals) == [0, EVERY, STEPS], (stage, evals)
        # the 'last' task on the tiny base: 8 steps cut the eval loss by at least 8%
        assert evals[STEPS] < 0.92 * evals[0], (stage, evals)
        assert all(h["grad_norm"] > 0 for h in history if "loss" in h), history
    # ZeRO-2 and ZeRO-3 partition differently but compute the same steps
    e2, e3 = _evals(zero_runs[2][1]), _evals(zero_runs[3][1])
    assert all(abs(e2[s] - e3[s]) < 1e-3 for s in e2), (e2, e3)


def test_zero3_publishes_the_whole_adapter_not_empty_partitions(zero_runs, tiny_base):
    """ZeRO-3 leaves each rank a slice of every parameter; saved without gathering, the adapter's
    tensors are empty (the known 40-byte adapter). Ours has the shapes of a fresh adapter, is
    trained, and equals what ZeRO-2 (which never partitions parameters) publishes."""
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from train.model import lora_config

    cfg = zero_runs[3][0]
    fresh = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base), lora_config(cfg.adapter)
    )
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(fresh).items()}
    z3, z2 = _adapter(cfg), _adapter(zero_runs[2][0])
    assert {k: tuple(v.shape) for k, v in z3.items()} == want
    assert all(float(v.abs().max()) > 0 for k, v in z3.items() if "lora_B" in k)  # init is 0
    assert all(torch.allclose(z3[k], z2[k], atol=1e-4) for k in z3)


def test_zero3_adapter_reloads_in_plain_peft_and_changes_the_model(zero_runs, tiny_base, task_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = zero_runs[3][0]
    tok = AutoTokenizer.from_pretrained(tiny_base)
    row = json.loads(Path(task_data["test"]).read_text().splitlines()[0])
    ids = tok(tok.bos_token + row["prompt"], return_tensors="pt", add_special_tokens=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        before = base(**ids).logits
        model = PeftModel.from_pretrained(base, current_adapter(cfg.storage.root, cfg.name)).eval()
        after = model(**ids).logits
    assert (after - before).abs().max() > 1e-3


def test_zero2_checkpoint_resumes_to_the_same_run(
    zero_runs, tmp_path, tiny_base, task_data, ray_address
):
    """Each rank writes its slice of the optimizer state into the checkpoint; a run resumed from
    the step-4 checkpoint ends where the uninterrupted one did."""
    cfg, history = zero_runs[2]
    ckpt = sorted(
        (Path(cfg.storage.root) / "runs" / cfg.name).glob(f"run-*/checkpoint_{EVERY:06d}")
    )
    assert ckpt and {"zero_rank0.pt", "zero_rank1.pt"} <= {p.name for p in ckpt[-1].iterdir()}
    resumed_cfg = _cfg(
        tmp_path,
        tiny_base,
        task_data,
        "zero2-resumed",
        2,
        **{"training.resume_from": str(ckpt[-1])},
    )
    history2, out = _train(resumed_cfg, tmp_path, ray_address)
    assert f"resumed from a checkpoint at step {EVERY}" in out, out[-3000:]
    resumed = _evals(history2)
    assert abs(resumed[STEPS] - _evals(history)[STEPS]) < 1e-4, (resumed, _evals(history))


def test_deepspeed_config_comes_from_the_yaml_and_a_json_file_merges_over_it(tmp_path):
    from train.zero import ds_config, load_override

    cfg = job_config(
        tmp_path,
        tmp_path,
        tmp_path / "d.jsonl",
        **{
            "scaling.strategy": "deepspeed",
            "scaling.deepspeed.stage": 3,
            "training.batch_size": 2,
            "training.grad_accum_steps": 3,
            "training.max_grad_norm": 0.5,
        },
    )
    conf = ds_config(cfg, world=4, amp=torch.bfloat16)
    assert conf["train_micro_batch_size_per_gpu"] == 2 and conf["gradient_accumulation_steps"] == 3
    assert conf["train_batch_size"] == 24 and conf["gradient_clipping"] == 0.5
    assert conf["zero_optimization"] == {"stage": 3}
    assert conf["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    extra = {"zero_optimization": {"stage": 3, "overlap_comm": False}, "gradient_clipping": 2.0}
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(extra))
    cfg.scaling.deepspeed.config = str(f)
    merged = ds_config(cfg, 4, None, load_override(cfg))
    assert merged["zero_optimization"] == {"stage": 3, "overlap_comm": False}
    assert merged["gradient_clipping"] == 2.0 and merged["train_batch_size"] == 24


def test_a_json_file_that_contradicts_the_yaml_is_refused_naming_the_key(tmp_path):
    from train.zero import load_override

    cfg = job_config(tmp_path, tmp_path, tmp_path / "d.jsonl", **{"scaling.strategy": "deepspeed"})
    f = tmp_path / "ds.json"
    f.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 16,
                "zero_optimization": {"stage": 3},
                "optimizer": {"type": "Adam"},
            }
        )
    )
    cfg.scaling.deepspeed.config = str(f)
    with pytest.raises(ConfigError) as e:
        load_override(cfg)
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 3, text
    assert "train_micro_batch_size_per_gpu" in text and "training.batch_size (4)" in text
    assert "16" in text and "scaling.deepspeed.stage (2)" in text and "'optimizer'" in text
    cfg.scaling.deepspeed.config = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="scaling.deepspeed.config: expected a readable JSON"):
        load_override(cfg)


def test_zero3_stores_the_4bit_base_in_the_compute_dtype(tmp_path, tiny_base, task_data):
    import bitsandbytes as bnb

    from train.model import load_base

    for stage, dtype in ((2, torch.uint8), (3, torch.float32)):  # compute_dtype is float32 here
        cfg = _cfg(tmp_path, tiny_base, task_data, "q", stage)
        layer = load_base(cfg).model.layers[0].self_attn.q_proj
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.dtype == dtype, stage
