"""The embedded default: small tasks generated here, adapters trained on them, base vs adapter.

    lorafleet demo                      # = make demo: build the tiny base, train, print tables

Each task maps a prompt like `upper: cat dog` to an answer like `CAT DOG`. The tiny base is
pretrained on `copy` only (see train.tiny), so it knows the format but not the tasks; each
adapter must learn its own task. Exact match on held-out prompts, greedy decoding.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Task:
    name: str
    answer: Callable[[str], str]
    max_words: int = 3
    letters: str = string.ascii_lowercase


TASKS = {
    # the base's pretraining (train.tiny): the prompt format, and copying
    "copy": Task("copy", lambda s: s),
    # the demo's adapter tasks: new to the base
    "last": Task("last", lambda s: s.split()[-1], max_words=4),
    "swap": Task("swap", lambda s: " ".join(reversed(s.split())), max_words=3),
    # Character-mapping tasks (upper-case, reverse, shift letters) were tried and left out:
    # a copy-pretrained base copies by matching the last output token against the prompt, which
    # a mapped token no longer matches, so a LoRA adapter does not learn them in a demo's time.
}
PRETRAIN_TASKS = ("copy",)


def _words(rng: random.Random, task: Task) -> str:
    n = rng.randint(1, task.max_words)
    return " ".join(
        "".join(rng.choice(task.letters) for _ in range(rng.randint(2, 6))) for _ in range(n)
    )


def make_rows(task: Task, n: int, seed: int) -> list[dict]:
    """`n` completion rows for a task; the seed picks a disjoint stream per split."""
    rng = random.Random(f"{task.name}:{seed}")
    rows = []
    for _ in range(n):
        s = _words(rng, task)
        rows.append({"prompt": f"{task.name}: {s}\n", "completion": task.answer(s)})
    return rows


def render_completion(row: dict) -> str:
    return row["prompt"] + row["completion"] + "<|eos|>"


def write_task_data(
    task_name: str, out_dir: str | Path, n_train: int = 4000, n_test: int = 200
) -> dict:
    """Train and held-out test JSONL for a task. Test prompts never appear in train."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = TASKS[task_name]
    test = make_rows(task, n_test, seed=10_000)
    test_prompts = {r["prompt"] for r in test}
    train = [r for r in make_rows(task, n_train, seed=0) if r["prompt"] not in test_prompts]
    paths = {}
    for split, rows in (("train", train), ("test", test)):
        p = out / f"{split}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[split] = p
    return paths


@torch.no_grad()
def exact_match(
    model, tokenizer, rows: list[dict], max_new_tokens: int = 32, batch_size: int = 50
) -> float:
    """Greedy decoding; an answer counts when it equals the expected completion exactly."""
    model.eval()
    device = next(model.parameters()).device
    hits = 0
    tokenizer.padding_side = "left"
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [tokenizer.bos_token + r["prompt"] for r in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            device
        )
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        hits += sum(t.strip("\n") == r["completion"] for t, r in zip(texts, chunk, strict=True))
    return hits / len(rows)


DEMO_TASKS = ("last", "swap")


def run_demo(
    config_path: str = "configs/demo.yaml",
    overrides: list[str] | None = None,
    tasks: tuple[str, ...] = DEMO_TASKS,
    log=print,
) -> dict:
    """Train one adapter per task on the tiny base and compare exact match, base vs adapter."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster import storage
    from cluster.config import load_config, with_overrides
    from train.export import load_adapter_model
    from train.model import resolve_base
    from train.trainer import train

    t0 = time.time()
    cfg = resolve_base(load_config(config_path, overrides or []))
    root = Path(storage.absolute(cfg.storage.root))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.base)
    base_model = AutoModelForCausalLM.from_pretrained(cfg.model.base, dtype=torch.float32)
    rows = []
    for name in tasks:
        paths = write_task_data(name, root / "demo" / "data" / name)
        task_cfg = with_overrides(cfg, {"name": f"demo-{name}", "data.path": str(paths["train"])})
        summary = train(task_cfg, log=log)
        test = [json.loads(x) for x in paths["test"].read_text().splitlines()]
        adapted = load_adapter_model(summary["adapter"], base=cfg.model.base)
        rows.append(
            {
                "task": name,
                "adapter": summary["adapter"],
                "base_exact_match": exact_match(base_model, tokenizer, test),
                "adapter_exact_match": exact_match(adapted, tokenizer, test),
                "eval_loss": summary["history"][-1].get("eval_loss"),
                "train_seconds": summary["seconds"],
                "held_out": len(test),
                "example": (ex := next(r for r in test if len(r["prompt"].split()) > 3))
                | {"adapter_says": _answer(adapted, tokenizer, ex["prompt"])},
            }
        )
    seconds = time.time() - t0
    # evaluated on held-out prompts with greedy decoding; the same prompts for base and adapter
    lines = [
        "",
        "| task | held-out prompts | base exact match | adapter exact match | example prompt -> adapter |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ex = r["example"]
        lines.append(
            f"| {r['task']} | {r['held_out']} | {r['base_exact_match']:.1%} | {r['adapter_exact_match']:.1%} "
            f"| `{ex['prompt'].strip()}` -> `{ex['adapter_says']}` |"
        )
    lines.append(f"\ndemo finished in {seconds:.0f}s; adapters in {root / 'adapters'}")
    log("\n".join(lines))
    passed = all(r["adapter_exact_match"] >= r["base_exact_match"] + 0.3 for r in rows)
    if not passed:
        log("[demo] FAILED: an adapter did not beat the base by 30 points of exact match")
    return {"tasks": rows, "seconds": seconds, "passed": passed}


def _answer(model, tokenizer, prompt: str) -> str:
    enc = tokenizer(tokenizer.bos_token + prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(
        **enc,
        max_new_tokens=32,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True).strip("\n")
