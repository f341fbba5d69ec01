"""The GPU lane: the code paths that only exist on CUDA. Each test is marked `gpu` and is skipped,
with the reason, on a machine without one (conftest.py); `bench/gpu_check.sh` runs them on a GPU
node, then times QLoRA there. Same tiny model and data as the CPU tests, so a failure here is
the GPU path's, not the model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import job_config, vllm_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _gpu_job(tmp_path, tiny_base, task_data, name, **over):
    return job_config(
        tmp_path,
        tiny_base,
        task_data["train"],
        name=name,
        **{
            "scaling.use_gpu": True,
            "quantization.compute_dtype": "bfloat16",
            "training.precision": "bf16",
            "training.max_steps": 30,
            "training.eval_every_steps": 10,
            **over,
        },
    )


def _eval_losses(summary: dict) -> list[float]:
    return [h["eval_loss"] for h in summary["history"] if h.get("eval_loss") is not None]


def test_4bit_nf4_base_lives_on_cuda_and_stays_close_to_the_full_precision_model(
    tmp_path, tiny_base, task_data
):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from train.model import load_base

    cfg = _gpu_job(tmp_path, tiny_base, task_data, "nf4")
    quantized = load_base(cfg, device="cuda")
    layers = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" for m in layers)
    assert all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    full = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).cuda()
    ids = torch.randint(3, full.config.vocab_size, (2, 32), device="cuda")
    with torch.no_grad():
        q, f = quantized(ids).logits.float(), full(ids).logits
    assert torch.isfinite(q).all()
    # CUDA's NF4 kernels dequantize to the same weights as the reference: a small relative error
    assert ((q - f).abs().mean() / f.abs().mean()).item() < 0.15


def test_bf16_qlora_under_nccl_ddp_on_one_gpu_eval_loss_falls(
    ray_local, tmp_path, tiny_base, task_data
):
    from train.trainer import build_trainer, train

    cfg = _gpu_job(tmp_path, tiny_base, task_data, "bf16")
    assert build_trainer(cfg, "probe").torch_config.backend == "nccl"
    losses = _eval_losses(train(cfg, log=lambda *_: None))
    assert losses[-1] < losses[0] * 0.9, losses


def test_paged_adamw_8bit_trains_on_gpu(ray_local, tmp_path, tiny_base, task_data):
    from train.trainer import train

    cfg = _gpu_job(
        tmp_path, tiny_base, task_data, "paged", **{"training.optimizer": "paged_adamw_8bit"}
    )
    losses = _eval_losses(train(cfg, log=lambda *_: None))
    assert losses[-1] < losses[0] * 0.9, losses


def test_vllm_on_gpu_serves_the_adapter_as_peft_answers_it(
    ray_local, tmp_path, tiny_base, tokenizer, task_data
):
    """CUDA vLLM (the `gpu` extra's) with the adapter through LoRARequest: its greedy answers
    are PEFT's on the same base."""
    from cluster.text.scoring import is_exact_match
    from train.demo import _answer
    from train.export import load_adapter_model
    from train.trainer import train

    summary = train(_gpu_job(tmp_path, tiny_base, task_data, "vllm"), log=lambda *_: None)
    rows = [json.loads(x) for x in Path(task_data["test"]).read_text().splitlines()[:12]]
    out = vllm_greedy(
        tiny_base,
        summary["adapter"],
        [r["prompt"] for r in rows],
        tmp_path,
        env={"VLLM_TARGET_DEVICE": "cuda"},
    )
    peft_model = load_adapter_model(summary["adapter"], base=str(tiny_base))
    peft_answers = [_answer(peft_model, tokenizer, r["prompt"]) for r in rows]
    same = sum(is_exact_match(a, b) for a, b in zip(out["lora"], peft_answers, strict=True))
    assert same >= 10, list(zip(out["lora"], peft_answers, strict=True))


@pytest.fixture(scope="module")
def gpu_adapter(ray_local, tmp_path_factory, tiny_base, task_data):
    """One bf16 QLoRA adapter trained on the GPU, and 12 held-out prompts of its task."""
    from train.trainer import train

    tmp = tmp_path_factory.mktemp("gpu-serving")
    summary = train(_gpu_job(tmp, tiny_base, task_data, "served"), log=lambda *_: None)
    rows = [json.loads(x) for x in Path(task_data["test"]).read_text().splitlines()[:12]]
    return summary["adapter"], [r["prompt"] for r in rows], tmp


def _cuda_answers(gpu_adapter, tiny_base, **engine) -> dict:
    """vLLM on CUDA in bf16, with `engine` over that: greedy answers of the base and adapter."""
    adapter, prompts, tmp = gpu_adapter
    cuda = {"VLLM_TARGET_DEVICE": "cuda"}
    return vllm_greedy(
        tiny_base, adapter, prompts, tmp, env=cuda, engine={"dtype": "bfloat16", **engine}
    )


def _agree(a: list[str], b: list[str]) -> int:
    from cluster.text.scoring import is_exact_match

    return sum(is_exact_match(x, y) for x, y in zip(a, b, strict=True))


def test_vllm_serves_the_adapter_on_an_fp8_quantized_base(gpu_adapter, tiny_base):
    """`models[].quantization: fp8` (vLLM quantizes the 16-bit checkpoint as it loads): the
    adapter still applies on the quantized base (its answers are not the base's) and gives
    nearly the answers it gives on the bf16 base."""
    bf16 = _cuda_answers(gpu_adapter, tiny_base)
    fp8 = _cuda_answers(gpu_adapter, tiny_base, quantization="fp8")
    assert _agree(fp8["lora"], fp8["base"]) <= 6, fp8
    assert _agree(fp8["lora"], bf16["lora"]) >= 9, list(zip(fp8["lora"], bf16["lora"], strict=True))


def test_vllm_serves_the_adapter_sharded_over_two_gpus(gpu_adapter, tiny_base):
    """`models[].tensor_parallel_size: 2`: the adapter's answers sharded over two GPUs are the
    ones it gives on one."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"tensor parallelism needs 2 GPUs; this node has {torch.cuda.device_count()}")
    one = _cuda_answers(gpu_adapter, tiny_base)
    two = _cuda_answers(gpu_adapter, tiny_base, tensor_parallel_size=2)
    assert _agree(two["lora"], one["lora"]) >= 11, list(zip(two["lora"], one["lora"], strict=True))
