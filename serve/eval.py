"""Exact match (and token F1, ROUGE-L, BLEU) of a served model, adapter or experiment on held-out
rows, through the HTTP API.

    lorafleet serve eval configs/serve-demo.yaml tiny-demo:demo-last \\
        lorafleet-runs/demo/data/last/test.jsonl

Each row is `{"prompt": ..., "completion": ...}` (the demo's test files, or any completion-format
JSONL). Greedy decoding, scored by `cluster.text.scoring` (the rule `lorafleet demo` scores adapters by
in-process), over `cluster.cli.http_client` (the client of every lorafleet command).
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cluster.cli.http_client import Client, HttpError
from cluster.errors import LorafleetError
from cluster.text.scoring import is_exact_match, normalize_answer, score_answers
from serve.experiments import VARIANT_HEADER


class RowFailed(LorafleetError):
    """The server failed a row (an HTTP error) or answered it with something not a completion."""


def read_rows(path: str | Path, limit: int | None = None) -> list[dict]:
    """Completion rows from a JSONL file; a bad row raises ValueError naming the file and row."""
    with open(path) as f:
        return parse_rows(f, path, limit)


def parse_rows(lines, path: str | Path, limit: int | None = None) -> list[dict]:
    """Completion rows from the JSONL `lines` of `path`; a bad row raises ValueError naming the
    file and row."""
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: row {i}: not JSON ({e.msg})") from None
        if not (
            isinstance(row, dict)
            and isinstance(row.get("prompt"), str)
            and isinstance(row.get("completion"), str)
        ):
            raise ValueError(f"{path}: row {i}: expected string fields 'prompt' and 'completion'")
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def exact_match(
    url: str,
    model: str,
    rows: list[dict],
    *,
    key: str | None = None,
    max_tokens: int = 32,
    clients: int = 8,
    log=None,
) -> dict:
    """Send each row's prompt to `model` at `url`; return exact match, answers and, for an
    experiment, each variant's rows and exact match (the user id is the row number). The first
    row the server fails raises RowFailed; no server at `url`, ServerUnreachable."""
    client = Client(url, key=key, pool_size=clients)

    def ask(i_row):
        i, row = i_row
        body = {
            "model": model,
            "prompt": row["prompt"],
            "max_tokens": max_tokens,
            "temperature": 0,
            "user": f"eval-{i}",
        }
        try:
            r = client.post("/v1/completions", body)
        except HttpError as e:
            raise RowFailed(f"row {i + 1}: {e}") from None
        try:
            text = normalize_answer(r.json()["choices"][0]["text"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise RowFailed(f"row {i + 1}: not a completion: {r.text[:300]}") from None
        return text, r.headers.get(VARIANT_HEADER)

    answers, seen, hit = [], Counter(), Counter()
    pool = ThreadPoolExecutor(clients)
    try:
        results = pool.map(ask, enumerate(rows))
        for n, ((text, variant), row) in enumerate(zip(results, rows, strict=True), 1):
            answers.append(text)
            if variant:
                seen[variant] += 1
                hit[variant] += is_exact_match(text, row["completion"])
            if log and (n % 50 == 0 or n == len(rows)):
                log(f"[eval] {n}/{len(rows)} answered")
    finally:  # the first failed row stops the rest
        pool.shutdown(wait=True, cancel_futures=True)
    hits = sum(is_exact_match(a, r["completion"]) for a, r in zip(answers, rows, strict=True))
    # the other answer metrics of `lorafleet eval`, scored by the same functions
    scores = score_answers(answers, [r["completion"] for r in rows])
    return {
        "model": model,
        "rows": len(rows),
        "exact_match": hits / len(rows),
        "f1": scores["f1"],
        "rouge_l": scores["rouge_l"],
        "bleu": scores["bleu"],
        "answers": answers,
        "variants": {v: {"rows": n, "exact_match": hit[v] / n} for v, n in sorted(seen.items())},
    }
