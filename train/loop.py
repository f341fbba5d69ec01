"""The per-worker training loop that Ray Train runs on each worker: DDP over gloo or NCCL, or
DeepSpeed ZeRO over the same process group (`scaling.strategy`, train/zero.py).

Every worker builds the same data deterministically and takes its own slice of each global
batch; rank 0 writes checkpoints (train/checkpoint.py: adapter, optimizer, scheduler, data
position and every RNG) and prints progress, so a resumed run continues at the next step on the
same batches it would have seen.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from train.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from train.model import after_step


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


@dataclass
class Run:
    """One worker's training state: what setup builds, and what fit, validate and save share."""

    cfg: object
    rank: int
    world: int
    device: torch.device
    run_dir: str
    data: object = None
    batches: object = None
    pad_id: int = 0
    model: object = None
    ddp_model: object = None
    engine: object = None  # the DeepSpeed engine under scaling.strategy=deepspeed
    zero_stage: int = 0
    params: list = field(default_factory=list)
    optimizer: object = None
    scheduler: object = None
    amp: torch.dtype | None = None
    step: int = 0
    position: int = 0
    best_eval: float = math.inf
    bad_evals: int = 0
    stop_early: bool = False
    history: list[dict] = field(default_factory=list)
    scaler: object = None  # torch's GradScaler under precision fp16
    # a Ray Train report at every log step, not only at checkpoints: Tune's schedulers decide on
    # them. Each report waits for Train's controller to poll (every 2 s): a plain run logs
    # through its tracker instead, and its fast steps are not held to that pace
    report_logs: bool = False
    tracker: object = None  # train/tracking.py: metrics.jsonl, TensorBoard, MLflow / W&B
    overfit: object = None  # train/tracking.py OverfitWatch

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)


def train_loop_per_worker(loop_config: dict) -> None:
    _quiet_ray_train_reports()
    run = setup(loop_config)
    fit(run)
    if run.tracker is not None:
        run.tracker.close()
    if run.world > 1:
        dist.barrier()


def _quiet_ray_train_reports() -> None:
    """One line per report from us is enough (train/internals.py checks the private logger)."""
    from train.internals import quiet_report_logger

    quiet_report_logger()


def setup(loop_config: dict) -> Run:
    """Config, data, quantized model + adapter, optimizer; restored from a checkpoint if any."""
    import ray.train
    import ray.train.torch

    from cluster.config.job import JobConfig

    cfg = JobConfig.model_validate(loop_config["cfg"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    run = build_run(cfg, ctx.get_world_rank(), ctx.get_world_size(), device, loop_config["run_dir"])
    run.report_logs = bool(loop_config.get("report_logs"))
    if cfg.scaling.strategy == "deepspeed":
        _wrap_deepspeed(run, loop_config.get("deepspeed"))
        restore(run)  # into the engine: ZeRO's partitions exist only after initialize
    else:
        restore(run)
        _wrap_ddp(run)
    _start_tracking(run)
    return run


def _start_tracking(run: Run) -> None:
    from train.tracking import OverfitWatch, Tracker

    run.tracker = Tracker(run.cfg, run.run_dir, run.is_main, run.step, run.history)
    run.overfit = OverfitWatch.from_history(run.cfg.training.overfit_patience, run.history)


def build_run(cfg, rank: int, world: int, device, run_dir: str) -> Run:
    """This worker's data, model (quantized base + adapter, or the base for full / partial),
    optimizer and schedule; no Ray needed (tests drive train_step on it in process)."""
    from train.data import ShardedBatches, prepare
    from train.model import count_params, load_for_training, load_tokenizer

    t = cfg.training
    run = Run(cfg, rank, world, torch.device(device), run_dir)
    torch.set_num_threads(max(1, int(cfg.scaling.resources_per_worker.get("CPU", 1))))
    seed_everything(t.seed)
    tokenizer = load_tokenizer(cfg)
    run.data = prepare(cfg.data, tokenizer, log=run.log)
    run.log(f"[data] train: {run.data.report.summary()}; eval: {len(run.data.eval)} sequences")
    run.pad_id = tokenizer.pad_token_id
    run.batches = ShardedBatches(
        run.data.train, t.batch_size, run.rank, run.world, cfg.data.seed, run.pad_id
    )
    run.model = load_for_training(cfg, device)
    trainable, total = count_params(run.model)
    run.log(
        f"[model] {cfg.model.base}: {trainable:,} trainable of {total:,} parameters "
        f"({cfg.quantization.mode}, {cfg.adapter.method}) on {run.world} worker(s), "
        f"device {device}"
    )
    run.params = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = _optimizer(run.params, t)
    run.scheduler = _scheduler(run.optimizer, t)
    run.amp = _autocast_dtype(t.precision, run.device)
    if run.amp == torch.float16:
        # fp16's narrow range underflows small gradients: the scaler multiplies the loss up
        # before backward and skips a step whose gradients overflowed
        run.scaler = torch.amp.GradScaler(run.device.type)
    run.ddp_model = run.model  # until setup wraps it (DDP, DeepSpeed)
    return run


def _wrap_ddp(run: Run) -> None:
    run.ddp_model = run.model
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        device = run.device
        run.ddp_model = DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None
        )


def _wrap_deepspeed(run: Run, override: dict | None) -> None:
    from train import zero

    config = zero.ds_config(run.cfg, run.world, run.amp, override)
    run.engine = run.ddp_model = zero.initialize(run.model, run.optimizer, config)
    run.zero_stage = run.engine.zero_optimization_stage()
    run.amp = None  # DeepSpeed's torch_autocast casts inside the engine's forward
    run.log(f"[deepspeed] ZeRO-{run.zero_stage} on {run.world} worker(s): {json.dumps(config)}")


def restore(run: Run) -> None:
    """Ray's checkpoint (a restarted worker group, a resumed run) or training.resume_from."""
    import ray.train

    from cluster.store import storage

    resume = ray.train.get_checkpoint()
    if resume is not None:
        resume_dir = resume.to_directory()
    elif run.cfg.training.resume_from:
        resume_dir = tempfile.mkdtemp(prefix="lorafleet-resume-")
        storage.download_dir(run.cfg.training.resume_from, resume_dir)
    else:
        return
    meta = load_checkpoint(Path(resume_dir), run.model, run.optimizer, run.scheduler, run.engine)
    run.step, run.position = meta["step"], meta["position"]
    run.best_eval, run.bad_evals = meta.get("best_eval_loss", math.inf), meta.get("bad_evals", 0)
    run.history = [h for h in meta.get("history", []) if h["step"] <= run.step]
    if run.scaler is not None and meta.get("grad_scaler"):
        run.scaler.load_state_dict(meta["grad_scaler"])
    run.log(
        f"[train] resumed from a checkpoint at step {run.step}; continuing at step {run.step + 1}"
    )


def forward_loss(run: Run, batch: dict) -> torch.Tensor:
    batch = {k: v.to(run.device) for k, v in batch.items()}
    amp = run.amp
    with torch.autocast(run.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return run.ddp_model(**batch, use_cache=False).loss


@torch.no_grad()
def validate(run: Run) -> float:
    """Mean eval loss per trained token, over every worker's shard of the eval sequences."""
    from train.data import collate

    run.model.eval()
    loss_sum, tok_sum = 0.0, 0.0
    for rows, weight in _eval_rows(run):
        batch = collate(rows, run.pad_id)
        batch.pop("num_tokens")
        n = (batch["labels"][:, 1:] != -100).sum().item() * weight
        if n or run.zero_stage == 3:  # ZeRO-3: every forward is collective, so none is skipped
            loss = forward_loss(run, batch).item()
            if n:
                loss_sum, tok_sum = loss_sum + loss * n, tok_sum + n
    run.model.train()
    loss_sum, tok_sum = _all_sum([loss_sum, tok_sum], run.device)
    return loss_sum / max(tok_sum, 1.0)


def _eval_rows(run: Run) -> list[tuple[list, int]]:
    """This worker's eval batches, each with a weight (1, or 0 for padding). Under ZeRO-3 every
    worker runs as many forwards as worker 0 (whose shard is the largest), repeating a batch
    with weight 0 where its own shard is shorter."""
    t = run.cfg.training
    limit = t.eval_max_batches * t.batch_size if t.eval_max_batches else None

    def batches(rank: int) -> list[tuple[list, int]]:
        shard = run.data.eval[rank :: run.world][:limit]
        return [(shard[i : i + t.batch_size], 1) for i in range(0, len(shard), t.batch_size)]

    own = batches(run.rank)
    if run.zero_stage == 3:
        most = batches(0)
        filler = (own or most)[0][0]
        own += [(filler, 0)] * (len(most) - len(own))
    return own


def _next_batch(run: Run) -> tuple[dict, int]:
    """This worker's next micro-batch and its count of real tokens; the data position moves on."""
    batch = run.batches.batch(run.position)
    run.position += 1
    return batch, int(batch.pop("num_tokens"))


def train_step(run: Run) -> tuple[float, float, int]:
    """One optimizer step over grad_accum_steps micro-batches: (loss, grad norm, real tokens)."""
    if run.engine is not None:
        return _zero_step(run)
    t = run.cfg.training
    step_loss, tokens = 0.0, 0
    for micro in range(t.grad_accum_steps):
        batch, n = _next_batch(run)
        tokens += n
        last = micro == t.grad_accum_steps - 1
        sync = run.ddp_model.no_sync() if (run.world > 1 and not last) else contextlib.nullcontext()
        with sync:
            loss = forward_loss(run, batch) / t.grad_accum_steps
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        step_loss += loss.item()
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(run.params, t.max_grad_norm or float("inf")).item()
    if run.scaler is not None:
        run.scaler.step(run.optimizer)  # skipped when the gradients overflowed
        run.scaler.update()
    else:
        run.optimizer.step()
    if math.isfinite(norm):  # an fp16 overflow (a skipped step) must not poison AdaLoRA's scores
        after_step(run.model, run.step)  # AdaLoRA's rank allocation reads the gradients
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return step_loss, norm, tokens


def _zero_step(run: Run) -> tuple[float, float, int]:
    """train_step under DeepSpeed: the engine scales the loss for accumulation, clips, and
    steps its optimizer only at the last micro-batch."""
    t = run.cfg.training
    step_loss, tokens = 0.0, 0
    for _ in range(t.grad_accum_steps):
        batch, n = _next_batch(run)
        tokens += n
        loss = forward_loss(run, batch)
        run.engine.backward(loss)
        run.engine.step()
        step_loss += loss.item() / t.grad_accum_steps
    run.scheduler.step()
    run.step += 1
    norm = run.engine.get_global_grad_norm()
    return step_loss, float(norm if norm is not None else 0.0), tokens


def fit(run: Run) -> None:
    """Steps until max_steps or an early stop; metrics every log_every_steps, an eval and a
    checkpoint every eval_every_steps and at the end."""
    t = run.cfg.training
    run.model.train()
    if run.step == 0 and run.data.eval:
        eval0 = validate(run)  # the baseline every later eval is measured against
        run.history.append(
            {"step": 0, "eval_loss": eval0, "eval_perplexity": math.exp(min(eval0, 50))}
        )
        ppl = run.history[-1]["eval_perplexity"]
        run.log(f"[train] step 0/{t.max_steps} eval_loss {eval0:.4f} ppl {ppl:.2f}")
        _track(run, run.history[-1])
    window = _Window(time.perf_counter())
    run_t0, run_start_step = time.perf_counter(), run.step
    while run.step < t.max_steps and not run.stop_early:
        loss, grad_norm, tokens = train_step(run)
        window.add(loss, tokens)
        is_eval = run.step % t.eval_every_steps == 0 or run.step == t.max_steps
        if run.step % t.log_every_steps == 0 or is_eval:
            metrics = _step_metrics(run, window, grad_norm)
            if is_eval and run.data.eval:
                _eval_and_early_stop(run, metrics)
            run.history.append(metrics)
            seconds_per_step = (time.perf_counter() - run_t0) / max(run.step - run_start_step, 1)
            _log_report(run, metrics, seconds_per_step * (t.max_steps - run.step))
            _track(run, metrics)
            if is_eval:
                save(run, metrics)
            elif run.report_logs:
                import ray.train

                ray.train.report(metrics)
            window = _Window(time.perf_counter())  # tokens/s counts training, not eval or saving


@dataclass
class _Window:
    """Training since the last report: its loss, steps, tokens and start time."""

    t0: float
    loss: float = 0.0
    steps: int = 0
    tokens: int = 0

    def add(self, loss: float, tokens: int) -> None:
        self.loss, self.steps, self.tokens = self.loss + loss, self.steps + 1, self.tokens + tokens


def _step_metrics(run: Run, window: _Window, grad_norm: float) -> dict:
    from train.tracking import peak_memory_mb

    loss_avg, tokens = _all_sum(
        [window.loss / max(window.steps, 1), float(window.tokens)], run.device
    )
    metrics = {
        "step": run.step,
        "loss": loss_avg / run.world,
        "learning_rate": run.scheduler.get_last_lr()[0],
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / max(time.perf_counter() - window.t0, 1e-9),
        "epoch": run.position / max(run.batches.per_epoch, 1),
        # the largest worker's: CUDA's peak allocation on a GPU, else the process's peak RSS
        "peak_memory_mb": _all_max(peak_memory_mb(run.device), run.device),
    }
    if run.overfit is not None and run.overfit.flagged_at is not None:
        metrics["overfitting"] = True
    return metrics


def _all_max(value: float, device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _eval_and_early_stop(run: Run, metrics: dict) -> None:
    t = run.cfg.training
    eval_loss = validate(run)
    metrics["eval_loss"] = eval_loss
    metrics["eval_perplexity"] = math.exp(min(eval_loss, 50))
    if t.generation_eval_rows:  # greedy answers to eval prompts: eval_exact_match, eval_f1
        from train.generation import generation_eval

        metrics.update(generation_eval(run, _all_sum))
    if eval_loss < run.best_eval - t.early_stopping_min_delta:
        run.best_eval, run.bad_evals = eval_loss, 0
    else:
        run.bad_evals += 1
    if t.early_stopping_patience and run.bad_evals >= t.early_stopping_patience:
        run.stop_early = True
        metrics["early_stopped"] = True
    said = run.overfit.add(run.step, metrics["loss"], eval_loss) if run.overfit else None
    if said:  # beside early stopping: it says so, and the run goes on
        metrics["overfitting"] = True
        run.log(said)


def _log_report(run: Run, metrics: dict, eta: float) -> None:
    evals = ""
    if "eval_loss" in metrics:
        evals = f" eval_loss {metrics['eval_loss']:.4f} ppl {metrics['eval_perplexity']:.2f}"
    if "eval_exact_match" in metrics:
        evals += f" exact_match {metrics['eval_exact_match']:.1%} f1 {metrics['eval_f1']:.3f}"
    stop = f" (early stop: no eval improvement in {run.bad_evals} evals)" if run.stop_early else ""
    run.log(
        f"[train] step {run.step}/{run.cfg.training.max_steps} loss {metrics['loss']:.4f} "
        f"lr {metrics['learning_rate']:.2e} grad_norm {metrics['grad_norm']:.3f} "
        f"tok/s {metrics['tokens_per_s']:,.0f}{evals} mem {metrics['peak_memory_mb']:,.0f}MB "
        f"eta {_fmt_eta(eta)}{stop}"
    )


def _track(run: Run, metrics: dict) -> None:
    """One report to metrics.jsonl (appended), TensorBoard and MLflow / W&B (rank 0)."""
    if run.tracker is not None:
        run.tracker.log(metrics)


def save(run: Run, metrics: dict) -> None:
    """Rank 0 writes the checkpoint; every worker reports, as Ray Train requires."""
    import ray.train

    if run.tracker is not None:
        run.tracker.flush()  # TensorBoard events on disk (uploaded, on a remote root)
    with tempfile.TemporaryDirectory(prefix="lorafleet-ckpt-") as tmp:
        checkpoint = _write_checkpoint(run, Path(tmp), metrics)
        ray.train.report(
            # Tune tells our patience stop from its own by early_stopped; with no eval data,
            # checkpoints are ranked on the training loss
            metrics | {"eval_loss": metrics.get("eval_loss", metrics["loss"])},
            checkpoint=checkpoint,
            checkpoint_dir_name=f"checkpoint_{run.step:06d}",
        )


def _write_checkpoint(run: Run, tmp: Path, metrics: dict):
    """Rank 0 writes the adapter and the loop's state. Under DeepSpeed every rank also writes
    its ZeRO shard into the same checkpoint (Ray merges the ranks' files), and under ZeRO-3 the
    adapter is gathered first: a plain save would write empty tensors."""
    import ray.train

    from train import zero

    if run.engine is not None:
        zero.save_shard(run.engine, tmp)
    with zero.gathered(run.model, run.zero_stage):
        if run.is_main:
            meta = {
                "step": run.step,
                "position": run.position,
                "eval_loss": metrics.get("eval_loss"),
                "best_eval_loss": run.best_eval,
                "bad_evals": run.bad_evals,
                "history": run.history,
                "base_model": run.cfg.model.base,
                "grad_scaler": run.scaler.state_dict() if run.scaler is not None else None,
            }
            optimizer = None if run.engine is not None else run.optimizer
            save_checkpoint(tmp, run.model, optimizer, run.scheduler, meta)
    if run.is_main or run.engine is not None:
        return ray.train.Checkpoint.from_directory(tmp)
    return None


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
