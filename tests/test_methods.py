"""Every adapter.method trains through the same loop (train/loop.py), in process and through
real Ray Train; what each publishes reloads to the same logits; what vLLM cannot serve is named
(cluster/store/servability.py) and refused by `lorafleet serve`."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from conftest import job_config, vllm_greedy

METHOD_CONFIGS = {
    "lora": {},
    "dora": {"adapter.use_dora": True},
    "rslora": {"adapter.use_rslora": True},
    "adalora": {"adapter.method": "adalora", "adapter.adalora_init_r": 8, "adapter.r": 4},
    "ia3": {"adapter.method": "ia3", "training.learning_rate": 5e-2},
    "prompt_tuning": {
        "adapter.method": "prompt_tuning",
        "adapter.num_virtual_tokens": 8,
        "data.packing": False,
        "training.learning_rate": 5e-2,
    },
    "prompt_tuning_text": {
        "adapter.method": "prompt_tuning",
        "adapter.prompt_tuning_init": "text",
        "adapter.prompt_tuning_text": "Answer with the last word:",
        "data.packing": False,
        "training.learning_rate": 5e-2,
    },
    "prefix_tuning": {
        "adapter.method": "prefix_tuning",
        "adapter.num_virtual_tokens": 8,
        "data.packing": False,
        "training.learning_rate": 2e-2,
    },
    "p_tuning": {
        "adapter.method": "p_tuning",
        "adapter.num_virtual_tokens": 8,
        "data.packing": False,
        "training.learning_rate": 1e-2,
    },
    "full": {"adapter.method": "full", "quantization.mode": "none", "training.learning_rate": 1e-3},
    "partial": {
        "adapter.method": "partial",
        "adapter.partial_last_n_blocks": 1,
        "quantization.mode": "none",
        "training.learning_rate": 1e-3,
    },
}


def _in_process_run(tmp_path, tiny_base, task_data, **overrides):
    from train.loop import build_run
    from train.model import resolve_base

    cfg = job_config(tmp_path, tiny_base, task_data["train"], **overrides)
    return build_run(resolve_base(cfg), 0, 1, "cpu", str(tmp_path / "run"))


def _mean_loss(run, batches) -> float:
    from train.loop import forward_loss

    with torch.no_grad():
        return sum(forward_loss(run, b).item() for b in batches) / len(batches)


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_each_method_trains_in_the_loop_and_its_loss_falls(name, tmp_path, tiny_base, task_data):
    """Each method through the loop's own train_step (the one Ray Train runs), 8 steps on the
    tiny base: the loss on fixed batches falls, and only the method's weights changed."""
    from train.loop import train_step

    run = _in_process_run(tmp_path, tiny_base, task_data, **METHOD_CONFIGS[name])
    probe = [run.batches.batch(i) for i in range(100, 102)]
    for b in probe:
        b.pop("num_tokens")
    frozen = {n: p.detach().clone() for n, p in run.model.named_parameters() if not p.requires_grad}
    before = _mean_loss(run, probe)
    for _ in range(8):
        train_step(run)
    after = _mean_loss(run, probe)
    assert after < before - 0.01, (name, before, after)
    changed = [
        n for n, p in run.model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])
    ]
    assert not changed, changed[:3]


def test_rslora_scales_every_lora_layer_by_alpha_over_sqrt_r(tmp_path, tiny_base, task_data):
    """adapter.use_rslora reaches PEFT: each LoRA layer scales by alpha/sqrt(r) (16/sqrt(8)),
    not plain LoRA's alpha/r (2)."""
    run = _in_process_run(tmp_path, tiny_base, task_data, **METHOD_CONFIGS["rslora"])
    scales = [m.scaling["default"] for m in run.model.modules() if hasattr(m, "lora_A")]
    assert scales and scales == pytest.approx([16 / 8**0.5] * len(scales)), scales


def _micro_batches(run, n: int) -> list[dict]:
    out = [run.batches.batch(i) for i in range(n)]
    for b in out:
        b.pop("num_tokens")
    return out


def test_grad_accum_steps_averages_the_micro_batches_gradients_in_one_step(
    tmp_path, tiny_base, task_data
):
    """training.grad_accum_steps=2: one optimizer step takes the next two micro-batches, and
    its loss and gradient are the mean of theirs, each computed on its own beforehand (not the
    last micro-batch's alone, nor their sum)."""
    from train.loop import forward_loss, train_step

    run = _in_process_run(
        tmp_path, tiny_base, task_data, **{"training.batch_size": 2, "training.grad_accum_steps": 2}
    )
    losses, grads = [], []
    for b in _micro_batches(run, 2):
        run.optimizer.zero_grad(set_to_none=True)
        loss = forward_loss(run, b)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in run.params]))
    run.optimizer.zero_grad(set_to_none=True)
    want_norm = ((grads[0] + grads[1]) / 2).norm().item()
    assert (
        abs(want_norm - grads[1].norm().item()) > 1e-3 * want_norm
    )  # the test can tell them apart
    loss, norm, tokens = train_step(run)
    assert run.step == 1 and run.position == 2
    assert loss == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert norm == pytest.approx(want_norm, rel=1e-4)
    assert tokens == sum(int(run.batches.batch(i)["num_tokens"]) for i in range(2))


def test_gradient_checkpointing_the_default_gives_the_same_step_as_without_it(
    tmp_path, tiny_base, task_data
):
    """training.gradient_checkpointing is on by default (it recomputes activations in backward):
    the default is what trains here, and its steps match a run without it."""
    from cluster.config.sections import TrainingConfig
    from train.loop import train_step

    assert TrainingConfig().gradient_checkpointing  # the default this test runs
    on = _in_process_run(
        tmp_path / "on", tiny_base, task_data, **{"training.gradient_checkpointing": True}
    )
    off = _in_process_run(tmp_path / "off", tiny_base, task_data)
    assert on.model.base_model.model.is_gradient_checkpointing
    assert not off.model.base_model.model.is_gradient_checkpointing
    for _ in range(2):
        (loss_on, norm_on, _), (loss_off, norm_off, _) = train_step(on), train_step(off)
        assert loss_on == pytest.approx(loss_off, rel=1e-5)
        assert norm_on == pytest.approx(norm_off, rel=1e-4)


@pytest.mark.parametrize("name", ["adalora", "full", "partial", "prefix_tuning", "p_tuning"])
def test_each_method_resumes_from_its_checkpoint_at_the_same_losses(
    name, tmp_path, tiny_base, task_data
):
    """A checkpoint (the loop's save_checkpoint: safetensors weights, torch.load(weights_only)
    state) restores the method's weights, optimizer, schedule, RNGs and method state (AdaLoRA's
    importance scores): the next steps give the losses the uninterrupted run gave."""
    from train.checkpoint import load_checkpoint, save_checkpoint
    from train.loop import train_step

    over = METHOD_CONFIGS[name] | {"training.max_steps": 12}
    run = _in_process_run(tmp_path, tiny_base, task_data, **over)
    for _ in range(3):
        train_step(run)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_checkpoint(ckpt, run.model, run.optimizer, run.scheduler, {"step": 3, "position": 3})
    want = [train_step(run)[0] for _ in range(3)]
    resumed = _in_process_run(tmp_path, tiny_base, task_data, **over)
    meta = load_checkpoint(ckpt, resumed.model, resumed.optimizer, resumed.scheduler)
    resumed.step, resumed.position = meta["step"], meta["position"]
    got = [train_step(resumed)[0] for _ in range(3)]
    assert got == pytest.approx(want, rel=1e-5), (name, got, want)


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_each_methods_output_reloads_to_the_trained_logits(name, tmp_path, tiny_base, task_data):
    """What publishing writes for each method reloads to the trained model's logits: a PEFT
    adapter with PEFT (and, for LoRA, AdaLoRA and (IA)^3, merged by `lorafleet merge`), a full
    or partial fine-tune as a whole model with AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM

    from train.export import build_full_model, load_adapter_model, merge_adapter
    from train.loop import train_step
    from train.model import save_trained

    over = METHOD_CONFIGS[name] | {"quantization.mode": "none"}
    run = _in_process_run(tmp_path, tiny_base, task_data, **over)
    for _ in range(3):
        train_step(run)
    run.model.eval()
    save_trained(run.model, tmp_path / "out")
    if name in ("full", "partial"):
        reloaded = [
            AutoModelForCausalLM.from_pretrained(
                build_full_model(tmp_path / "out", run.cfg, tmp_path / "model")
            )
        ]
    else:
        reloaded = [load_adapter_model(tmp_path / "out", base=str(tiny_base))]
        if name in ("lora", "adalora", "ia3"):
            merged = merge_adapter(tmp_path / "out", tmp_path / "merged", log=lambda *_: None)
            reloaded.append(AutoModelForCausalLM.from_pretrained(merged))
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = run.model(input_ids=ids).logits
        for model in reloaded:
            assert torch.allclose(model.eval()(input_ids=ids).logits, want, atol=1e-4), name


def _checkpoint(run_dir: str, step: int):
    from pathlib import Path

    return next(Path(run_dir).glob(f"checkpoint_{step:06d}"))


def _losses(summary: dict, after: int = 0) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in summary["history"] if "loss" in h and h["step"] > after}


@pytest.mark.slow
def test_partial_through_ray_resumes_and_publishes_a_full_model(
    ray_local, tmp_path, tiny_base, task_data
):
    """partial (the last block) on real Ray Train: a resume from the step-4 checkpoint gives
    steps 5-8 the losses of the uninterrupted run, and the published whole model loads with
    AutoModelForCausalLM to the trained logits, its frozen block untouched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.model import TRAINED_WEIGHTS, load_trained
    from train.trainer import train

    common = METHOD_CONFIGS["partial"] | {
        "training.max_steps": 8,
        "training.eval_every_steps": 4,
        "training.log_every_steps": 1,
        "training.keep_checkpoints": 3,
        "training.export": "last",
    }
    lines: list[str] = []
    first = train(job_config(tmp_path, tiny_base, task_data["train"], **common), log=lines.append)
    assert not any("will not serve" in x for x in lines)  # a whole model: no vLLM warning
    ckpt4 = _checkpoint(first["run_dir"], 4)
    resumed = train(
        job_config(
            tmp_path,
            tiny_base,
            task_data["train"],
            name="resumed",
            **common,
            **{"training.resume_from": str(ckpt4)},
        ),
        log=lambda *_: None,
    )
    want, got = _losses(first), _losses(resumed, after=4)
    assert sorted(got) == [5, 6, 7, 8]
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-4, abs=1e-5), (step, loss, want[step])

    published = first["adapter"]
    assert "/models/finetuned/t/versions/" in published
    model = AutoModelForCausalLM.from_pretrained(published, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(published)
    trained = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    assert (_checkpoint(first["run_dir"], 8) / "adapter" / TRAINED_WEIGHTS).is_file()
    load_trained(trained, _checkpoint(first["run_dir"], 8) / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    ids = tok("Last word of: red green blue ->", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, trained(ids).logits, atol=1e-5)
        assert not torch.allclose(model(ids).logits, base(ids).logits, atol=1e-4)
    layers, base_layers = model.model.layers, base.model.layers
    assert torch.equal(layers[0].mlp.up_proj.weight, base_layers[0].mlp.up_proj.weight)
    assert not torch.equal(layers[1].mlp.up_proj.weight, base_layers[1].mlp.up_proj.weight)

    # vLLM deploys the published folder as a base (what `models[].base` hands it), and its greedy
    # answers are the fine-tuned model's own (7 of 8: vLLM's CPU kernels round differently, and
    # a near-tie may go the other way, as in test_train's LoRARequest test)
    prompts = [json.loads(x)["prompt"] for x in task_data["test"].read_text().splitlines()[:8]]
    served = vllm_greedy(published, "-", prompts, tmp_path)["base"]
    hf = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id
            )
        hf.append(tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True))
    same = sum(a == b for a, b in zip(served, hf, strict=True))
    assert same >= 7, list(zip(served, hf, strict=True))


@pytest.mark.slow
def test_prefix_tuning_through_ray_learns_publishes_and_is_named_unservable(
    ray_local, tmp_path, tiny_base, task_data
):
    """prefix_tuning on real Ray Train: eval loss falls, the published adapter reloads with PEFT
    and changes the model's output; training warned that vLLM cannot serve it, serving's
    rule says why, and `lorafleet merge` refuses it with the reason."""
    import json
    from pathlib import Path

    from cluster.store.servability import vllm_problems
    from train.export import AdapterError, load_adapter_model, merge_adapter
    from train.trainer import train

    over = METHOD_CONFIGS["prefix_tuning"] | {
        "training.max_steps": 16,
        "training.eval_every_steps": 8,
    }
    lines: list[str] = []
    summary = train(job_config(tmp_path, tiny_base, task_data["train"], **over), log=lines.append)
    warned = [x for x in lines if "will not serve" in x]
    assert warned and "PEFT" in warned[0], lines[:5]
    evals = [h["eval_loss"] for h in summary["history"] if "eval_loss" in h]
    assert evals[-1] < evals[0] - 0.02, evals
    version_dir = Path(summary["adapter"])
    conf = json.loads((version_dir / "adapter_config.json").read_text())
    assert conf["peft_type"] == "PREFIX_TUNING"
    assert "only LoRA" in vllm_problems(conf)[0]
    model = load_adapter_model(version_dir, base=str(tiny_base))
    ids = torch.randint(3, 200, (2, 16))
    with torch.no_grad():
        with_prefix = model(input_ids=ids).logits
        with model.disable_adapter():
            without = model(input_ids=ids).logits
    assert not torch.allclose(with_prefix, without, atol=1e-4)
    with pytest.raises(AdapterError, match="cannot be merged"):
        merge_adapter(version_dir, tmp_path / "merged")


def _saved_adapter_config(tiny_base, out, **lora) -> dict:
    """adapter_config.json as PEFT's save_pretrained writes it for a LoRA variant."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    conf = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **lora)
    get_peft_model(model, conf).save_pretrained(out)
    return json.loads((out / "adapter_config.json").read_text())


def test_vllm_servability_read_from_real_peft_adapter_configs(tmp_path, tiny_base):
    """The one rule training and serving share, on what PEFT writes: plain LoRA serves; DoRA,
    bias and modules_to_save do not, each named."""
    from cluster.store.servability import vllm_problems

    assert vllm_problems(_saved_adapter_config(tiny_base, tmp_path / "lora")) == []
    dora = vllm_problems(_saved_adapter_config(tiny_base, tmp_path / "dora", use_dora=True))
    assert len(dora) == 1 and "DoRA" in dora[0]
    bias = vllm_problems(_saved_adapter_config(tiny_base, tmp_path / "bias", bias="all"))
    assert len(bias) == 1 and "bias: 'all'" in bias[0]
    saved = _saved_adapter_config(tiny_base, tmp_path / "head", modules_to_save=["lm_head"])
    assert "lm_head" in vllm_problems(saved)[0]


def test_train_warns_before_training_an_adapter_vllm_cannot_serve(tmp_path, tiny_base, task_data):
    from cluster.store.servability import config_warning

    def warning(**over):
        return config_warning(job_config(tmp_path, tiny_base, task_data["train"], **over))

    assert warning() is None
    assert warning(**METHOD_CONFIGS["full"]) is None  # a whole model, served as a base
    dora = warning(**{"adapter.use_dora": True})
    assert "DoRA" in dora and "lorafleet merge" in dora
    assert "lorafleet merge" in warning(**{"adapter.bias": "all"})
    assert "cannot be merged" in warning(**METHOD_CONFIGS["prompt_tuning"])


def test_serve_refuses_at_start_an_adapter_vllm_cannot_serve(tmp_path, tiny_base):
    """`lorafleet serve` (serve.app.run) stops before Ray starts when an experiment names a DoRA
    adapter, naming the adapter, the reason and `lorafleet merge`; the ingress's rule for a
    version published later is the same store check (serve/store.py version_refusal)."""
    from cluster.config.serve import ServeAppConfig
    from cluster.store import layout, versions
    from serve.app import Unservable, run
    from serve.store import AdapterStore, version_refusal

    root = layout.adapters_root(str(tmp_path / "store"))
    _saved_adapter_config(tiny_base, tmp_path / "dora", use_dora=True)
    _saved_adapter_config(tiny_base, tmp_path / "plain")
    dora = versions.publish(tmp_path / "dora", root, "wide", {"base_model": str(tiny_base)})
    versions.publish(tmp_path / "plain", root, "ok", {"base_model": str(tiny_base)})
    cfg = ServeAppConfig.model_validate(
        {
            "models": [{"id": "m", "base": str(tiny_base)}],
            "experiments": [
                {
                    "name": "exp",
                    "variants": [
                        {"name": "a", "model": "m", "adapter": "wide", "weight": 1},
                        {"name": "b", "model": "m", "adapter": "ok", "weight": 1},
                    ],
                }
            ],
            "http": {"mode": "throughput"},
            "storage": {"root": str(tmp_path / "store")},
        }
    )
    with pytest.raises(Unservable) as err:
        run(cfg, blocking=False, log=lambda *_: None, environ={})
    message = str(err.value)
    assert "'wide'" in message and "DoRA" in message and "lorafleet merge" in message
    assert "'ok'" not in message
    assert version_refusal(root, "wide", dora) in message
    # the ingress's check for an adapter published into a running app: the same reason (a 400)
    store = AdapterStore(root)
    assert asyncio.run(store.refusal(asyncio.run(store.get("wide")))) in message
    assert asyncio.run(store.refusal(asyncio.run(store.get("ok")))) is None


@pytest.fixture(scope="module")
def one_process_group():
    """A one-process gloo group, as Ray Train sets up for DeepSpeed, torn down after this file's
    tests (once: DeepSpeed keeps the first group it sees for the process)."""
    import os
    import socket

    import torch.distributed as dist

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}  # what Ray Train's workers have
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("name", ["full", "p_tuning"])
def test_zero3_checkpoint_of_a_method_resumes_at_the_same_losses(
    name, one_process_group, tmp_path, tiny_base, task_data
):
    """Under DeepSpeed ZeRO-3 (partitioned parameters) a full fine-tune's weights and P-tuning's
    prompt encoder are gathered to save and to restore: a resumed run gives the same losses."""
    from train import zero
    from train.checkpoint import load_checkpoint, save_checkpoint
    from train.loop import _wrap_deepspeed, train_step

    over = METHOD_CONFIGS[name] | {
        "scaling.strategy": "deepspeed",
        "scaling.deepspeed.stage": 3,
        "quantization.mode": "none",
    }

    def start():
        run = _in_process_run(tmp_path, tiny_base, task_data, **over)
        _wrap_deepspeed(run, None)
        return run

    run = start()
    for _ in range(3):
        train_step(run)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    zero.save_shard(run.engine, ckpt)
    with zero.gathered(run.model, 3):
        save_checkpoint(ckpt, run.model, None, run.scheduler, {"step": 3, "position": 3})
    want = [train_step(run)[0] for _ in range(2)]
    resumed = start()
    load_checkpoint(ckpt, resumed.model, resumed.optimizer, resumed.scheduler, resumed.engine)
    resumed.step, resumed.position = 3, 3
    assert [train_step(resumed)[0] for _ in range(2)] == pytest.approx(want, rel=1e-5)
