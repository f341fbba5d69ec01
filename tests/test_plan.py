"""The memory plan (train/memory_plan.py) against what training allocates.

    .venv/bin/python -m pytest -q tests/test_plan.py

On CPU, training's `mem` is the process's peak RSS (train/tracking.py), mostly the Python, torch
and Ray runtime for tiny models; the plan estimates tensors. So the slow test measures what the
loop's tensors occupy: the loop's own `build_run` and `train_step` run under a dispatch mode
that counts every live tensor storage (model, quantization constants, adapter, gradients,
AdamW state, activations), and the peak of that count is held to the plan's stated bound.
"""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from conftest import job_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cluster.errors import ConfigError
from train.memory_plan import (
    ERROR_BOUND,
    GIB,
    KNOWN_MODELS,
    estimate,
    gpu_capacity,
    linear_shapes,
    read_shape,
)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak: every op's outputs are counted until
    their storage is freed; tensors made before (the model) are added with add_model."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def add(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        s = t.untyped_storage()
        key, n = s.data_ptr(), s.nbytes()
        if n == 0 or key in self.live:
            return
        self.live[key] = n
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(s, self._free, key)

    def add_model(self, model) -> None:
        for p in [*model.parameters(), *model.buffers()]:
            self.add(p)
            qs = getattr(p, "quant_state", None)  # bitsandbytes' absmax and code tensors
            while qs is not None:
                for v in vars(qs).values():
                    self.add(v)
                qs = getattr(qs, "state2", None)
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.add(t)
        return out


def llama_folder(tmp_path, layers: int, width: int, inter: int, vocab: int = 259):
    """A random Llama-shaped base with the tiny byte tokenizer (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.tiny import build_tokenizer

    out = tmp_path / f"base-{layers}-{width}-{inter}-{vocab}"
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def test_plan_counts_the_adapter_as_peft_does(tmp_path):
    """LoRA parameters from the shapes, against PEFT on the real (unquantized) model."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from train.model import lora_config

    base = llama_folder(tmp_path, 2, 128, 352)
    for targets in ("all-linear", ["q_proj", "v_proj"], ["down_proj", "gate_proj"]):
        cfg = job_config(
            tmp_path, base, tmp_path / "d.jsonl", **{"adapter.target_modules": targets}
        )
        peft_model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base), lora_config(cfg.adapter)
        )
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        plan = estimate(cfg)
        (row,) = [b for what, b, _ in plan.parts if what.startswith("trained weights")]
        assert row == trainable * 4, targets


def test_plan_reads_a_local_config_and_the_fallback_table_offline(tmp_path):
    base = tmp_path / "m"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 512,
                "num_attention_heads": 8,
                "num_hidden_layers": 6,
                "vocab_size": 1000,
                "intermediate_size": 1024,
                "num_key_value_heads": 2,
            }
        )
    )
    cfg = job_config(tmp_path, base, tmp_path / "d.jsonl")
    s = read_shape(cfg)
    assert (s.hidden, s.layers, s.kv_heads, s.head_dim, s.vocab) == (512, 6, 2, 64, 1000)
    assert linear_shapes(s)["k_proj"] == (512, 128)
    hub = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"base": "Qwen/Qwen2.5-7B-Instruct"})}
    )
    shape = read_shape(hub)  # HF_HUB_OFFLINE=1: the hub is not asked, the table answers
    assert shape.hidden == KNOWN_MODELS["Qwen/Qwen2.5-7B-Instruct"].hidden
    assert "built-in table" in shape.source
    nowhere = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"base": "no-one/nothing"})}
    )
    with pytest.raises(ConfigError, match=r"model.base: cannot read 'no-one/nothing'"):
        read_shape(nowhere)


def test_plan_deepspeed_shares_and_largest_batch(tmp_path):
    recipe = "configs/recipes/llama-3.1-70b.yaml"
    from cluster.config.load import load_config

    ddp = estimate(load_config(recipe))
    z2 = estimate(load_config(recipe, ["scaling.strategy=deepspeed", "scaling.deepspeed.stage=2"]))
    z3 = estimate(load_config(recipe, ["scaling.strategy=deepspeed", "scaling.deepspeed.stage=3"]))
    part = lambda plan, what: sum(b for w, b, _ in plan.parts if w.startswith(what))  # noqa: E731
    assert part(z2, "optimizer state") < part(ddp, "optimizer state") / 4
    assert part(z3, "base weights") == pytest.approx(part(ddp, "base weights") / 16)
    # lorafleet loads the whole quantized base before DeepSpeed partitions it: the floor
    assert z3.total() >= part(ddp, "base weights") + part(ddp, "embeddings")
    cap = (80 - 1.0) * GIB
    n = ddp.largest_batch(cap)
    assert ddp.total(n) <= cap < ddp.total(n + 1)
    with pytest.raises(ConfigError, match="--gpu: expected one of"):
        gpu_capacity("A100", None)  # two A100s: ambiguous, said so
    assert gpu_capacity("l4", None) == [("L4-24GB", 22.5)]


# (layers, width, intermediate, vocab, overrides): shapes and settings the plan must hold on
CASES = [
    (4, 256, 688, 259, {"data.max_length": 256, "training.batch_size": 4, "adapter.dropout": 0.1}),
    (
        8,
        256,
        688,
        259,
        {
            "data.max_length": 128,
            "training.batch_size": 8,
            "adapter.r": 32,
            "training.gradient_checkpointing": True,
        },
    ),
    (
        2,
        384,
        1024,
        32000,
        {
            "data.max_length": 256,
            "training.batch_size": 2,
            "training.gradient_checkpointing": True,
            "adapter.target_modules": ["q_proj", "v_proj"],
        },
    ),
    (
        3,
        128,
        352,
        259,
        {"data.max_length": 512, "training.batch_size": 2, "quantization.double_quant": False},
    ),
]


@pytest.mark.slow
def test_estimate_holds_against_the_loops_measured_tensor_peak(tmp_path, task_data):
    from train.loop import build_run, train_step
    from train.tracking import peak_memory_mb

    rows = []
    for layers, width, inter, vocab, overrides in CASES:
        base = llama_folder(tmp_path, layers, width, inter, vocab)
        cfg = job_config(tmp_path, base, task_data["train"], **overrides)
        run = build_run(cfg, 0, 1, "cpu", str(tmp_path / "run"))
        run.model.train()  # as fit() does: checkpointing and dropout act in train mode only
        meter = LiveTensorBytes()
        meter.add_model(run.model)
        with meter:
            for _ in range(2):  # the second step has AdamW's state, as every later one
                train_step(run)
        est = estimate(cfg).total()
        rows.append(
            (
                layers,
                width,
                vocab,
                overrides,
                est / 2**20,
                meter.peak / 2**20,
                peak_memory_mb(run.device),
            )
        )
    table = "\n".join(
        f"{L}L w{w} V{v} {o}: estimate {e:.1f} MiB, measured tensors {m:.1f} MiB, "
        f"ratio {e / m:.2f}; process RSS peak (training's CPU `mem`) {rss:.0f} MiB"
        for L, w, v, o, e, m, rss in rows
    )
    print(table)
    for *_, e, m, rss in rows:
        assert abs(e / m - 1) <= ERROR_BOUND, table
        assert rss >= m, table  # what training reports on CPU contains the tensors


def test_use_rslora_reaches_peft_and_scales_by_alpha_over_sqrt_r(tmp_path):
    """adapter.use_rslora is PEFT's rank-stabilized LoRA: the LoraConfig carries it, and the
    model PEFT builds scales each update by alpha/sqrt(r) instead of alpha/r."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from train.model import peft_config

    base = llama_folder(tmp_path, 2, 64, 128)
    scales = {}
    for rs in (True, False):
        over = {"adapter.r": 16, "adapter.alpha": 32, "adapter.use_rslora": rs}
        cfg = job_config(tmp_path, base, tmp_path / "d.jsonl", **over)
        conf = peft_config(cfg)
        assert conf.use_rslora is rs
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), conf)
        found = {
            m.scaling["default"]
            for m in model.modules()
            if isinstance(getattr(m, "scaling", 0), dict)
        }
        (scales[rs],) = found
    assert scales == {True: 32 / 16**0.5, False: 32 / 16}
