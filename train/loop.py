"""The per-worker training loop that Ray Train runs on each worker (DDP over gloo or NCCL).

Every worker builds the same data deterministically and takes its own slice of each global
batch; rank 0 writes checkpoints and prints progress. A checkpoint holds the adapter (PEFT
safetensors), optimizer and scheduler state (`torch.load(weights_only=True)` loads it), the
step, the data position and the RNG state, so a resumed run continues at the next step on the
same batches it would have seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

CHECKPOINT_STATE = "trainer_state.pt"
CHECKPOINT_META = "state.json"
ADAPTER_DIR = "adapter"


def _autocast_dtype(precision: str, device: torch.device):
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _scheduler(optimizer, t):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        t.lr_scheduler
    ]
    return get_scheduler(
        name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps
    )


def _optimizer(params, t):
    if t.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb  # CUDA only, so imported only when asked for

        return bnb.optim.PagedAdamW8bit(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def _all_sum(values: list[float], device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def save_checkpoint(dirpath: Path, model, optimizer, scheduler, meta: dict) -> None:
    model.save_pretrained(dirpath / ADAPTER_DIR, safe_serialization=True)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
        dirpath / CHECKPOINT_STATE,
    )
    (dirpath / CHECKPOINT_META).write_text(json.dumps(meta, indent=2))


def load_checkpoint(dirpath: Path, model, optimizer, scheduler) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(dirpath / ADAPTER_DIR / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(
            f"checkpoint {dirpath} does not fit this adapter: {result.unexpected_keys[:3]}"
        )
    state = torch.load(dirpath / CHECKPOINT_STATE, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return json.loads((dirpath / CHECKPOINT_META).read_text())


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from cluster import storage
    from cluster.config import JobConfig
    from train.data import ShardedBatches, collate, prepare
    from train.model import count_params, load_for_training, load_tokenizer

    # one line per report from us is enough; Ray's own per-report INFO line repeats the metrics
    try:
        from ray.train.v2._internal.execution import context as _train_context

        _train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # internal module: fine to miss on other Ray versions
        pass
    cfg = JobConfig.model_validate(loop_config["cfg"])
    t = cfg.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.scaling.resources_per_worker.get("CPU", 1))))
    is_main = rank == 0

    def log(msg):
        if is_main:
            print(msg, flush=True)

    torch.manual_seed(t.seed)
    tokenizer = load_tokenizer(cfg)
    data = prepare(cfg.data, tokenizer, log=log)
    log(f"[data] train: {data.report.summary()}; eval: {len(data.eval)} sequences")
    pad_id = tokenizer.pad_token_id
    batches = ShardedBatches(data.train, t.batch_size, rank, world, cfg.data.seed, pad_id)

    model = load_for_training(cfg, device)
    trainable, total = count_params(model)
    log(
        f"[model] {cfg.model.base}: {trainable:,} trainable of {total:,} parameters "
        f"({cfg.quantization.mode}, LoRA r={cfg.adapter.r}) on {world} worker(s), device {device}"
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, t)
    scheduler = _scheduler(optimizer, t)

    step, position, best_eval, bad_evals = 0, 0, math.inf, 0
    history: list[dict] = []
    resume = ray.train.get_checkpoint()
    resume_dir = None
    if resume is not None:
        resume_dir = resume.to_directory()
    elif t.resume_from:
        resume_dir = tempfile.mkdtemp(prefix="lorafleet-resume-")
        storage.download_dir(t.resume_from, resume_dir)
    if resume_dir is not None:
        meta = load_checkpoint(Path(resume_dir), model, optimizer, scheduler)
        step, position = meta["step"], meta["position"]
        best_eval, bad_evals = meta.get("best_eval_loss", math.inf), meta.get("bad_evals", 0)
        history = [h for h in meta.get("history", []) if h["step"] <= step]
        log(f"[train] resumed from a checkpoint at step {step}; continuing at step {step + 1}")

    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    run_dir = loop_config["run_dir"]
    amp = _autocast_dtype(t.precision, device)

    def forward_loss(batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return ddp_model(**batch, use_cache=False).loss

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        loss_sum, tok_sum = 0.0, 0.0
        shard = data.eval[rank::world]
        limit = t.eval_max_batches * t.batch_size if t.eval_max_batches else None
        shard = shard[:limit] if limit else shard
        for i in range(0, len(shard), t.batch_size):
            batch = collate(shard[i : i + t.batch_size], pad_id)
            batch.pop("num_tokens")
            n = (batch["labels"][:, 1:] != -100).sum().item()
            if n:
                loss_sum += forward_loss(batch).item() * n
                tok_sum += n
        model.train()
        loss_sum, tok_sum = _all_sum([loss_sum, tok_sum], device)
        return loss_sum / max(tok_sum, 1.0)

    def write_history():
        if is_main:
            storage.write_text(
                storage.join(run_dir, "metrics.jsonl"),
                "".join(json.dumps(h) + "\n" for h in history),
            )

    model.train()
    if step == 0 and data.eval:
        # the baseline every later eval is measured against
        eval0 = evaluate()
        history.append({"step": 0, "eval_loss": eval0, "eval_perplexity": math.exp(min(eval0, 50))})
        log(
            f"[train] step 0/{t.max_steps} eval_loss {eval0:.4f} ppl {history[-1]['eval_perplexity']:.2f}"
        )
    window_loss, window_n, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
    run_t0, run_start_step = time.perf_counter(), step
    stop_early = False
    while step < t.max_steps and not stop_early:
        step_loss = 0.0
        for micro in range(t.grad_accum_steps):
            batch = batches.batch(position)
            position += 1
            window_tokens += int(batch.pop("num_tokens"))
            last = micro == t.grad_accum_steps - 1
            sync = ddp_model.no_sync() if (world > 1 and not last) else contextlib.nullcontext()
            with sync:
                loss = forward_loss(batch) / t.grad_accum_steps
                loss.backward()
            step_loss += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf")).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_loss += step_loss
        window_n += 1

        is_eval = step % t.eval_every_steps == 0 or step == t.max_steps
        if step % t.log_every_steps == 0 or is_eval:
            loss_avg, tokens = _all_sum(
                [window_loss / max(window_n, 1), float(window_tokens)], device
            )
            elapsed = time.perf_counter() - window_t0
            metrics = {
                "step": step,
                "loss": loss_avg / world,
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / max(elapsed, 1e-9),
                "epoch": position / max(batches.per_epoch, 1),
            }
            window_loss, window_n, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
            checkpoint = None
            if is_eval and data.eval:
                eval_loss = evaluate()
                metrics["eval_loss"] = eval_loss
                metrics["eval_perplexity"] = math.exp(min(eval_loss, 50))
                if eval_loss < best_eval - t.early_stopping_min_delta:
                    best_eval, bad_evals = eval_loss, 0
                else:
                    bad_evals += 1
                if t.early_stopping_patience and bad_evals >= t.early_stopping_patience:
                    stop_early = True
                    metrics["early_stopped"] = True
            history.append(metrics)
            done_steps = step - run_start_step
            eta = (time.perf_counter() - run_t0) / max(done_steps, 1) * (t.max_steps - step)
            log(
                f"[train] step {step}/{t.max_steps} loss {metrics['loss']:.4f} "
                f"lr {metrics['learning_rate']:.2e} grad_norm {grad_norm:.3f} "
                f"tok/s {metrics['tokens_per_s']:,.0f}"
                + (
                    f" eval_loss {metrics['eval_loss']:.4f} ppl {metrics['eval_perplexity']:.2f}"
                    if "eval_loss" in metrics
                    else ""
                )
                + f" eta {_fmt_eta(eta)}"
                + (f" (early stop: no eval improvement in {bad_evals} evals)" if stop_early else "")
            )
            write_history()
            if is_eval:
                with tempfile.TemporaryDirectory(prefix="lorafleet-ckpt-") as tmp:
                    if is_main:
                        meta = {
                            "step": step,
                            "position": position,
                            "eval_loss": metrics.get("eval_loss"),
                            "best_eval_loss": best_eval,
                            "bad_evals": bad_evals,
                            "history": history,
                            "base_model": cfg.model.base,
                        }
                        save_checkpoint(Path(tmp), model, optimizer, scheduler, meta)
                        checkpoint = ray.train.Checkpoint.from_directory(tmp)
                    ray.train.report(
                        # Tune tells our patience stop from its own by early_stopped; with no eval
                        # data, checkpoints are ranked on the training loss
                        metrics | {"eval_loss": metrics.get("eval_loss", metrics["loss"])},
                        checkpoint=checkpoint,
                        checkpoint_dir_name=f"checkpoint_{step:06d}",
                    )
            else:
                ray.train.report(metrics)
            window_t0 = time.perf_counter()  # tokens/s counts training time, not eval or saving
    if world > 1:
        dist.barrier()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
