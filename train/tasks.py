"""Generated tasks in the completion format: `name: words\n` -> an answer, one token per byte.

Read by the tiny base's pretraining (`train.tiny`, the `copy` task: the prompt format, and
copying) and by the demo (`train.demo`, the adapter tasks). Nothing here imports the trainer,
so building a tiny base never depends on the demo.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass


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
