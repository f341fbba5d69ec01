"""The exact-match rule, one place for everything that scores answers (the demo's table in
`train.demo`, `lorafleet serve eval` over HTTP): greedy output, leading and trailing newlines
dropped, then equal to the expected completion character for character."""

from __future__ import annotations


def normalize_answer(text: str) -> str:
    return text.strip("\n")


def is_exact_match(answer: str, expected: str) -> bool:
    return normalize_answer(answer) == expected
