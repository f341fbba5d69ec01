"""Two task adapters on one base, mixed row by row in one batch (train.multitask).

Two adapters are trained through Ray Train on the tiny base, each on its own task, published to
one store, loaded beside one base, and asked in ONE `generate` call whose rows alternate between
them. The two tasks read the same prompts (`greet: <words>`, `thank: ...`, `leave: ...`) and
answer them differently (`hi`/`ok`/`by` against `ok`/`by`/`hi`: the same answers, shifted),
so only the row's adapter decides its answer. Each row must be answered by its own adapter: right by its own task, where
the other adapter on the same prompt gives the other task's answer; and token for token what its
adapter says alone, through PEFT's ordinary single-adapter path.

Why not the demo's `last` and `swap` tasks (train.tasks): the 2-layer test base learns them too
slowly for a test. Measured, 60 steps at lr 1e-2 each: character F1 against the expected
answer 0.30 (`last`) and 0.26 (`swap`) for the row's own adapter, 0.21 for the other adapter.
"""

from __future__ import annotations

import json
import random
import string
import time

import pytest

from tests.conftest import job_config

# task -> prompt key -> answer: the same prompts and answers, mapped differently
TASKS = {
    "reply": {"greet": "hi", "thank": "ok", "leave": "by"},
    "shift": {"greet": "ok", "thank": "by", "leave": "hi"},
}
STEPS = 100
ROWS_PER_TASK = 8


def _rows(task: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{task}:{seed}")
    rows = []
    for _ in range(n):
        key = rng.choice(sorted(TASKS[task]))
        words = " ".join(
            "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6)))
            for _ in range(rng.randint(1, 3))
        )
        rows.append({"prompt": f"{key}: {words}\n", "completion": TASKS[task][key]})
    return rows


@pytest.fixture(scope="module")
def two_adapters(ray_local, tmp_path_factory, tiny_base):
    from train.trainer import train

    tmp = tmp_path_factory.mktemp("multitask")
    for task in TASKS:
        path = tmp / "data" / f"{task}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in _rows(task, 600, seed=0)))
        cfg = job_config(
            tmp,
            tiny_base,
            path,
            name=f"mt-{task}",
            **{
                "training.max_steps": STEPS,
                "training.learning_rate": 1e-2,
                "training.eval_every_steps": STEPS,
                "training.log_every_steps": STEPS,
            },
        )
        t0 = time.time()
        train(cfg, log=lambda *_: None)
        print(f"[multitask] trained mt-{task} in {time.time() - t0:.0f}s")
    return str(tmp / "store")


@pytest.mark.slow
def test_a_mixed_batch_answers_each_row_with_its_own_adapter(two_adapters):
    from cluster.text.scoring import is_exact_match
    from train.multitask import generate_alone, generate_mixed, load_adapters

    mt = load_adapters(two_adapters, [f"mt-{t}" for t in TASKS])
    # the same held-out prompts for both tasks; rows alternate adapters: reply, shift, reply, ...
    prompts = [r["prompt"] for r in _rows("reply", ROWS_PER_TASK * 2, seed=10_000)]
    names = list(TASKS)
    rows = [(names[i % 2], p) for i, p in enumerate(prompts)]
    other = {names[0]: names[1], names[1]: names[0]}
    mixed = generate_mixed(mt, [(f"mt-{t}", p) for t, p in rows])
    crossed = generate_mixed(mt, [(f"mt-{other[t]}", p) for t, p in rows])

    def answer(task, prompt):
        return TASKS[task][prompt.split(":")[0]]

    scores = {}
    for t in TASKS:
        mine = [i for i, (task, _) in enumerate(rows) if task == t]
        scores[t] = {
            "rows": len(mine),
            # right by the row's own task: its own adapter, and the other adapter on that row
            "own": sum(is_exact_match(mixed[i]["text"], answer(t, rows[i][1])) for i in mine),
            "other": sum(is_exact_match(crossed[i]["text"], answer(t, rows[i][1])) for i in mine),
            # the other adapter on that row, right by its own task
            "other_own_task": sum(
                is_exact_match(crossed[i]["text"], answer(other[t], rows[i][1])) for i in mine
            ),
            "answers": [mixed[i]["text"] for i in mine],
        }
    print("exact match per task:", scores)
    for t, s in scores.items():
        assert s["own"] >= 0.75 * s["rows"] and s["own"] > s["other"], (t, s)
        # the other adapter is not broken, it does its own task on the same prompt
        assert s["other_own_task"] > s["other"], (t, s)
    # the mixed batch changes nothing: each adapter alone gives the same tokens on its rows
    for t in TASKS:
        mine = [i for i, (task, _) in enumerate(rows) if task == t]
        alone = generate_alone(mt, f"mt-{t}", [rows[i][1] for i in mine])
        assert [a["token_ids"] for a in alone] == [mixed[i]["token_ids"] for i in mine], t


def test_adapters_that_cannot_share_a_batch_are_refused_by_name(tmp_path):
    """An adapter missing from the store, and a DoRA adapter (PEFT cannot mix DoRA per row),
    are refused before any model loads, each naming the adapter and the reason."""
    from cluster.store import layout, versions
    from train.multitask import MultiTaskError, load_adapters

    root = layout.adapters_root(str(tmp_path))
    with pytest.raises(MultiTaskError, match=r"adapter 'nope': no complete version .*none"):
        load_adapters(str(tmp_path), ["nope"])
    src = tmp_path / "dora"
    src.mkdir()
    (src / layout.ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    (src / layout.ADAPTER_WEIGHTS).write_bytes(b"")
    versions.publish(src, root, "t-dora", {"base_model": "b"})
    with pytest.raises(MultiTaskError, match=r"adapter 't-dora' is DoRA: PEFT mixes LoRA"):
        load_adapters(str(tmp_path), ["t-dora"])
