"""The embedded default: small tasks generated here, adapters trained on them, base vs adapter.

    lorafleet demo                      # = make demo: build the tiny base, train, print tables

Each task maps a prompt like `upper: cat dog` to an answer like `CAT DOG`. The tiny base is
pretrained on `copy` only (see train.tiny; the tasks are in train.tasks), so it knows the format but not the tasks; each
adapter must learn its own task. Exact match on held-out prompts, greedy decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cluster.text.scoring import is_exact_match, normalize_answer
from train.tasks import TASKS, make_rows


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


def write_general_data(out_dir: str | Path, n: int = 200) -> Path:
    """`general.jsonl`: what the tiny base was pretrained on (the `copy` task, train.tiny), held
    out from its pretraining rows: `lorafleet eval`'s forgetting check (`eval.general_path`) shows
    how much of it an adapter lost while learning its own task."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "general.jsonl"
    rows = make_rows(TASKS["copy"], n, seed=20_000)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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
        hits += sum(is_exact_match(t, r["completion"]) for t, r in zip(texts, chunk, strict=True))
    return hits / len(rows)


DEMO_TASKS = ("last", "swap")


def run_demo(
    config_path: str = "configs/demo.yaml",
    overrides: list[str] | None = None,
    tasks: tuple[str, ...] = DEMO_TASKS,
    log=print,
    n_train: int = 4000,
    n_test: int = 200,
) -> dict:
    """Train one adapter per task on the tiny base and compare exact match, base vs adapter, on
    `n_test` held-out prompts (`n_train` rows generated to train on)."""
    import time

    from transformers import AutoModelForCausalLM

    from cluster.config.load import load_config
    from cluster.config.validation import with_overrides
    from cluster.store import storage
    from train.export import load_adapter_model
    from train.model import base_path, load_tokenizer, resolve_base
    from train.trainer import train

    t0 = time.time()
    cfg = load_config(config_path, overrides or [])
    if storage.is_remote(cfg.storage.root):
        from cluster.errors import ConfigError

        raise ConfigError(
            [
                "storage.root: the demo writes its data and reads its adapters on this machine; "
                f"expected a local path. Got {cfg.storage.root!r} instead"
            ]
        )
    cfg = resolve_base(cfg)
    root = Path(storage.absolute(cfg.storage.root))
    tokenizer = load_tokenizer(cfg)
    base = base_path(cfg)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    write_general_data(root / "demo" / "data")  # for `lorafleet eval`'s forgetting check
    rows = []
    for name in tasks:
        paths = write_task_data(name, root / "demo" / "data" / name, n_train, n_test)
        task_cfg = with_overrides(cfg, {"name": f"demo-{name}", "data.path": str(paths["train"])})
        summary = train(task_cfg, log=log)
        test = [json.loads(x) for x in paths["test"].read_text().splitlines()]
        adapted = load_adapter_model(summary["adapter"], base=base)
        rows.append(
            {
                "task": name,
                "adapter": summary["adapter"],
                "base_exact_match": exact_match(base_model, tokenizer, test),
                "adapter_exact_match": exact_match(adapted, tokenizer, test),
                "eval_loss": summary["history"][-1].get("eval_loss"),
                "train_seconds": summary["seconds"],
                "held_out": len(test),
                "example": (ex := next((r for r in test if len(r["prompt"].split()) > 3), test[0]))
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
    answer = tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return normalize_answer(answer)
