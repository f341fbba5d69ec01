"""Benchmarks of the training spine. Each prints a ratio against its anchor, measured side by
side in this one run (the machine is shared and noisy: absolute numbers mean little).

    make bench            # = python -m bench.run [ray_overhead hf_trainer packing nf4_bits report_wait tune_asha train_actors]

- ray_overhead: training tokens/s of `lorafleet train` (1 Ray Train worker) / a plain
  single-process transformers+peft loop on the same model, data, batch and steps. Target >= 0.95.
- hf_trainer: real (non-padding) training tokens/s of `lorafleet train` (1 worker) /
  `transformers.Trainer` + PEFT (what Axolotl and LLaMA-Factory train through) on the same QLoRA
  job, model, examples, tokens per step and steps, packed on both (`DataCollatorWithFlattening`
  for the Trainer). Target >= 1.0.
- packing: useful (non-padding) tokens/s with packing / padding every example to max_length, on
  skewed lengths. Target >= 2.
- nf4_bits: storage bits per parameter of NF4 + double-quant linear layers / the QLoRA paper's
  4.127. Target within 3%.
- report_wait: wall seconds of a whole 1-worker training run (Ray Train, one local Ray) that sends
  Ray Train a report at every log step (every 2 steps; what lorafleet did before, and what a Tune
  trial does) / the same run reporting at checkpoints only (lorafleet's plain runs), interleaved
  over 3 repeats. A report waits for Train's controller to poll, every 2 s. Target >= 1.5.
- tune_asha: total training steps of a search run to completion / the same search (space, seed)
  under ASHA, and the best eval loss of each. Target >= 3x less compute, best within 2%.
  `python -m bench.tune_asha` runs the same search under several scheduler settings against one
  FIFO anchor and prints the table (bench/results/tune_asha.txt).
- train_actors: the whole machine's CPU-seconds per short 1-worker run with Ray Train's stock
  actors (a DatasetManager and a preemption watcher per run) / lorafleet's local runs, which start
  neither (bench/train_actors.py; each side in a local Ray of its own, interleaved). Target > 1.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/run.py` too

from bench.common import STEPS, THREADS, demo_cfg  # noqa: E402


def plain_qlora_model(cfg, device: str = "cpu", gradient_checkpointing: bool = False):
    """The QLoRA model built with transformers + peft alone: the 4-bit NF4 double-quant base,
    prepare_model_for_kbit_training, and a LoraConfig of the config's r, alpha, dropout and
    target modules."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, cfg.quantization.compute_dtype),
    )
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.base, quantization_config=q, device_map={"": device}
    )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing
    )
    a = cfg.adapter
    return get_peft_model(
        model,
        LoraConfig(
            r=a.r,
            lora_alpha=a.alpha,
            lora_dropout=a.dropout,
            target_modules=a.target_modules,
            task_type="CAUSAL_LM",
        ),
    )


def plain_loop_tokens_per_s(cfg, device: str = "cpu") -> float:
    """The anchor: transformers + peft + bitsandbytes in one process, nothing of lorafleet's in
    the step (the same prepared sequences, so the same data). On CUDA it computes in the config's
    compute dtype under bf16 autocast, as lorafleet's loop does there."""
    from transformers import AutoTokenizer

    from train.data import ShardedBatches, prepare

    torch.set_num_threads(THREADS)
    torch.manual_seed(cfg.training.seed)
    tok = AutoTokenizer.from_pretrained(cfg.model.base)
    data = prepare(cfg.data, tok, log=lambda *_: None)
    batches = ShardedBatches(
        data.train, cfg.training.batch_size, 0, 1, cfg.data.seed, tok.pad_token_id
    )
    model = plain_qlora_model(cfg, device)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.training.learning_rate
    )
    model.train()
    tokens, t0 = 0, None
    for step in range(STEPS):
        if step == 10:  # the same warm-up our first report window absorbs
            tokens, t0 = 0, time.perf_counter()
        b = batches.batch(step)
        tokens += int(b.pop("num_tokens"))
        b = {k: v.to(device) for k, v in b.items()}
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            loss = model(**b, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0)


def bench_ray_overhead() -> float:
    from train.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_cfg(Path(tmp))
        # alternate the two, twice, so drift in machine load hits both alike
        ours, plain = [], []
        for _ in range(2):
            summary = train(
                cfg.model_copy(update={"name": f"bench{len(ours)}"}), log=lambda *_: None
            )
            reports = [h["tokens_per_s"] for h in summary["history"] if "tokens_per_s" in h][1:]
            ours.append(statistics.mean(reports))
            plain.append(plain_loop_tokens_per_s(cfg))
    o, p = statistics.median(ours), statistics.median(plain)
    ratio = o / p
    print(
        f"ray_overhead: lorafleet train {o:,.0f} tok/s vs plain loop {p:,.0f} tok/s -> ratio {ratio:.3f} (target >= 0.95)"
    )
    return ratio


def _unpacked_examples(packed: list[dict]) -> list[dict]:
    """lorafleet's packed rows split back into their examples at the position-id restarts."""
    examples = []
    for seq in packed:
        n, pos = seq["num_tokens"], seq["position_ids"]
        starts = [i for i in range(n) if pos[i] == 0] + [n]
        for a, b in zip(starts, starts[1:], strict=False):
            examples.append({"input_ids": seq["input_ids"][a:b], "labels": seq["labels"][a:b]})
    return examples


def _trainer_args(t, out: str, per_step: int):
    """`TrainingArguments` of the job's training section `t` (optimizer, schedule, warmup, weight
    decay, clipping, seed): STEPS steps of `per_step` examples on CPU in fp32, nothing saved,
    evaluated or reported."""
    from transformers import TrainingArguments

    scheduler = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    return TrainingArguments(
        output_dir=out,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=t.log_every_steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        per_device_train_batch_size=per_step,
        gradient_accumulation_steps=t.grad_accum_steps,
        max_steps=STEPS,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        optim="adamw_torch",
        lr_scheduler_type=scheduler[t.lr_scheduler],
        warmup_steps=t.warmup_steps,
        max_grad_norm=t.max_grad_norm or 0.0,  # lorafleet's null: no clipping
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=False,  # precision auto on CPU: fp32, no autocast, as lorafleet's loop runs
        fp16=False,
        seed=t.seed,
    )


def hf_trainer_tokens_per_s(cfg, packed_rows: bool = False) -> tuple[float, float, int]:
    """The anchor Axolotl and LLaMA-Factory stand on: `transformers.Trainer` + PEFT on the same
    QLoRA job (4-bit NF4 double-quant base, prepare_model_for_kbit_training, the config's
    LoraConfig, AdamW torch, learning rate, schedule, warmup, weight decay and clipping) and the
    same tokenized examples, packed by `DataCollatorWithFlattening` (one row, no padding).
    With `packed_rows`, the Trainer steps lorafleet's own padded packed rows instead (the same
    tensors lorafleet's step sees): the framework alone, the data layout held equal.
    Returns (real tokens/s over steps 11..STEPS, real tokens per step there, rows/step)."""
    from transformers import AutoTokenizer, DataCollatorWithFlattening, Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from train.data import collate as collate_packed
    from train.data import prepare

    t = cfg.training
    torch.set_num_threads(THREADS)
    torch.manual_seed(t.seed)
    tok = AutoTokenizer.from_pretrained(cfg.model.base)
    data = prepare(cfg.data, tok, log=lambda *_: None)
    examples = _unpacked_examples(data.train)
    # as many examples per step as lorafleet's batch holds on average (examples per packed row x
    # batch_size), so the real tokens per step match; flattening puts them in one unpadded row
    per_step = round(len(examples) / len(data.train) * t.batch_size)
    model = plain_qlora_model(cfg, "cpu", t.gradient_checkpointing)
    flatten = DataCollatorWithFlattening()
    seen: list[int] = []  # real tokens of each batch, in the order the steps take them

    def collate(features):
        if packed_rows:
            batch = collate_packed(features, tok.pad_token_id)
            seen.append(int(batch.pop("num_tokens")))
            return batch
        batch = flatten(features)
        seen.append(batch["input_ids"].numel())  # one row, no padding: every token is real
        return batch

    if packed_rows:
        examples, per_step = data.train, t.batch_size

    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (10, STEPS):  # after the same 10-step warm-up as lorafleet's
                marks[state.global_step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model,
            args=_trainer_args(t, out, per_step),
            train_dataset=examples,
            data_collator=collate,
            callbacks=[Clock()],
        )
        trainer.remove_callback(PrinterCallback)  # it still logs every log_every_steps, silently
        trainer.train()
    tokens = sum(seen[10 * t.grad_accum_steps : STEPS * t.grad_accum_steps])
    return tokens / (marks[STEPS] - marks[10]), tokens / (STEPS - 10), per_step


def bench_hf_trainer() -> float:
    """Real (non-padding) tokens/s of `lorafleet train` on 1 worker against `transformers.Trainer`
    with PEFT on the same QLoRA job, both packed. lorafleet pads each packed row to max_length
    (the padding costs compute but is not counted); flattening has no padding, but puts a whole
    step in one row. Also printed, not the target: the Trainer stepping lorafleet's own packed
    rows, which holds the data layout equal and leaves the frameworks alone."""
    from transformers import AutoTokenizer

    from train.data import ShardedBatches, prepare
    from train.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_cfg(Path(tmp))
        t = cfg.training
        tok = AutoTokenizer.from_pretrained(cfg.model.base)
        data = prepare(cfg.data, tok, log=lambda *_: None)
        batches = ShardedBatches(data.train, t.batch_size, 0, 1, cfg.data.seed, tok.pad_token_id)
        ours_step = statistics.mean(int(batches.batch(i)["num_tokens"]) for i in range(10, STEPS))
        ours, hf, rows = [], [], []
        for _ in range(2):  # alternate, twice, so drift in machine load hits all alike
            summary = train(cfg.model_copy(update={"name": f"hf{len(ours)}"}), log=lambda *_: None)
            reports = [h["tokens_per_s"] for h in summary["history"] if "tokens_per_s" in h][1:]
            ours.append(statistics.mean(reports))
            rate, hf_step, per_step = hf_trainer_tokens_per_s(cfg)
            hf.append(rate)
            rows.append(hf_trainer_tokens_per_s(cfg, packed_rows=True)[0])
    o, h, r = statistics.median(ours), statistics.median(hf), statistics.median(rows)
    ratio = o / h
    width = cfg.data.max_length
    print(
        f"hf_trainer: lorafleet train {o:,.0f} tok/s vs transformers.Trainer {h:,.0f} tok/s -> "
        f"ratio {ratio:.3f} (target >= 1.0); real tokens/step: lorafleet {ours_step:,.0f} "
        f"({t.batch_size} packed rows x {width} = {t.batch_size * width} with padding), "
        f"Trainer {hf_step:,.0f} ({per_step} examples flattened into one row, no padding); "
        f"Trainer on lorafleet's packed rows {r:,.0f} tok/s -> ratio {o / r:.3f}"
    )
    return ratio


def bench_packing() -> float:
    """Useful tokens/s, packed vs padded to max_length, on a long-tailed length mix."""
    from transformers import AutoTokenizer

    from cluster.config.sections import DataConfig
    from train.data import collate, pack, tokenize_segments, unpacked
    from train.model import load_for_training

    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_cfg(Path(tmp))
    torch.set_num_threads(THREADS)
    tok = AutoTokenizer.from_pretrained(cfg.model.base)
    rng = random.Random(0)
    max_len = 256
    examples = []
    for _ in range(2000):  # 80% short (10-40 tokens), 20% long (100-250)
        n = rng.randint(10, 40) if rng.random() < 0.8 else rng.randint(100, 250)
        text = "".join(rng.choice("abcdefgh ") for _ in range(n))
        examples.append(tokenize_segments([("q: ", False), (text, True)], tok, False))
    packed = pack(examples, max_len, tok.pad_token_id)
    padded = unpacked(examples)
    model = load_for_training(
        cfg.model_copy(update={"data": DataConfig(path="x.jsonl", max_length=max_len)}), "cpu"
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    bs, steps = 4, 12

    def run(seqs, steps=steps):
        useful, t0 = 0, time.perf_counter()
        for i in range(steps):
            b = collate(seqs[i * bs : (i + 1) * bs], tok.pad_token_id)
            useful += int(b.pop("num_tokens"))
            if "attention_mask" in b:  # pad every example to max_length, as the anchor does
                extra = max_len - b["input_ids"].shape[1]
                b["input_ids"] = torch.nn.functional.pad(
                    b["input_ids"], (0, extra), value=tok.pad_token_id
                )
                b["labels"] = torch.nn.functional.pad(b["labels"], (0, extra), value=-100)
                b["attention_mask"] = torch.nn.functional.pad(
                    b["attention_mask"], (0, extra), value=0
                )
            model(**b, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return useful / (time.perf_counter() - t0)

    run(packed, steps=2)  # warm-up
    rates = {"packed": [], "padded": []}
    for _ in range(2):
        rates["packed"].append(run(packed))
        rates["padded"].append(run(padded))
    p, q = statistics.median(rates["packed"]), statistics.median(rates["padded"])
    ratio = p / q
    print(
        f"packing: {p:,.0f} useful tok/s packed vs {q:,.0f} padded to {max_len} -> ratio {ratio:.2f} (target >= 2)"
    )
    return ratio


def bench_nf4_bits() -> float:
    """Bytes actually held by bitsandbytes for NF4 + double-quant Linear layers of a 7B-shaped
    block (4096 x 4096 and 4096 x 11008), counted from the tensors themselves."""
    import bitsandbytes as bnb

    total_bits, total_params = 0, 0
    for shape in ((4096, 4096), (11008, 4096)):
        w = torch.randn(*shape) * 0.02
        qw, state = bnb.functional.quantize_4bit(
            w, quant_type="nf4", compress_statistics=True, blocksize=64
        )
        held = [qw, state.absmax, state.state2.absmax, state.state2.code, state.code]
        total_bits += (
            sum(t.numel() * t.element_size() * 8 for t in held) + 32
        )  # + the nested offset
        total_params += w.numel()
    bits = total_bits / total_params
    ratio = bits / 4.127
    print(
        f"nf4_bits: {bits:.4f} bits/parameter vs the QLoRA paper's 4.127 -> ratio {ratio:.4f} (target 0.97-1.03)"
    )
    return ratio


def main(names: list[str]) -> int:
    results = {}
    for name in names or list(BENCHES):
        results[name] = BENCHES[name]()
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))
    return 0


def _run_wall_s(cfg, name: str, report_logs: bool) -> float:
    from train.trainer import build_trainer

    t0 = time.perf_counter()
    build_trainer(cfg.model_copy(update={"name": name}), run_id=name, report_logs=report_logs).fit()
    return time.perf_counter() - t0


def bench_report_wait(repeats: int = 3, eval_every: int = 20) -> float:
    from cluster.ray_connect import ensure_ray

    with tempfile.TemporaryDirectory() as tmp:
        over = {"training.log_every_steps": 2, "training.eval_every_steps": eval_every}
        cfg = demo_cfg(Path(tmp), **over)
        ensure_ray(cfg.ray, log=lambda *_: None)
        every, ckpt = [], []
        for i in range(repeats):  # interleaved: drift in machine load hits both alike
            every.append(_run_wall_s(cfg, f"every{i}", report_logs=True))
            ckpt.append(_run_wall_s(cfg, f"ckpt{i}", report_logs=False))
    ratios = sorted(e / c for e, c in zip(every, ckpt, strict=True))
    e, c = statistics.median(every), statistics.median(ckpt)
    print(
        f"report_wait: a {STEPS}-step run reporting every 2 steps {e:.1f}s vs at its "
        f"{STEPS // eval_every} checkpoints only {c:.1f}s -> ratio {e / c:.2f} (target >= 1.5); "
        f"per-repeat ratios {', '.join(f'{r:.2f}' for r in ratios)}"
    )
    return e / c


def bench_tune_asha(grace_steps: int = 5) -> float:
    """The same space and seed searched twice: ASHA, then every trial run to completion (FIFO).
    Compute is total training steps across trials; the best eval loss of each is printed."""
    from bench.tune_asha import base_config
    from cluster.config.validation import with_overrides
    from tune.tuner import tune_job

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # the one definition of the search (space, seed, trials) that bench.tune_asha sweeps
        base = with_overrides(
            base_config(Path(tmp)),
            {"tune.grace_period_steps": grace_steps, "tune.reduction_factor": 3},
        )
        for scheduler in ("asha", "fifo"):
            cfg = with_overrides(base, {"name": f"bench-{scheduler}", "tune.scheduler": scheduler})
            out = tune_job(cfg, log=lambda *_: None)
            results[scheduler] = (
                sum(r["steps"] for r in out["rows"]),
                out["best"]["best"],
                out["seconds"],
            )
    (a_steps, a_best, a_s), (f_steps, f_best, f_s) = results["asha"], results["fifo"]
    ratio = f_steps / a_steps
    print(
        f"tune_asha (grace {grace_steps}): ASHA {a_steps} trial steps ({a_s:.0f}s), best eval_loss {a_best:.4f}; "
        f"all to completion {f_steps} steps ({f_s:.0f}s), best {f_best:.4f} -> compute ratio {ratio:.2f} "
        f"(target >= 3), best-loss ratio {a_best / f_best:.4f} (target <= 1.02)"
    )
    return ratio


def bench_train_actors() -> float:
    from bench.train_actors import bench_train_actors as run

    return run()


BENCHES = {
    "ray_overhead": bench_ray_overhead,
    "hf_trainer": bench_hf_trainer,
    "packing": bench_packing,
    "nf4_bits": bench_nf4_bits,
    "report_wait": bench_report_wait,
    "tune_asha": bench_tune_asha,
    "train_actors": bench_train_actors,
}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
