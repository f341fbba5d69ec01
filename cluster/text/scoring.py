"""The exact-match rule, one place for everything that scores answers (the demo's table in
`train.demo`, `lorafleet serve eval` over HTTP): greedy output and expected answer, leading and
trailing newlines dropped from both (a chat template may end a turn with one), then equal
character for character."""

from __future__ import annotations


def normalize_answer(text: str) -> str:
    return text.strip("\n")


def is_exact_match(answer: str, expected: str) -> bool:
    return normalize_answer(answer) == normalize_answer(expected)


# Text metrics for `lorafleet eval` and generation eval during training. ROUGE-L and BLEU come
# from maintained implementations (rouge-score, sacrebleu), imported when asked for; both run
# offline. Every metric is a share in [0, 1] except BLEU, which is sacreBLEU's 0-100 scale.
GENERATION_METRICS = ("exact_match", "f1", "rouge_l", "bleu")


def _f1_tokens(text: str) -> list[str]:
    """SQuAD's answer normalization: lower case, punctuation and articles dropped, split on
    whitespace."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(answer: str, expected: str) -> float:
    """SQuAD-style token F1: the harmonic mean of precision and recall of the shared tokens
    (counted with multiplicity). Two empty answers agree (1.0); one empty answer scores 0."""
    from collections import Counter

    got, want = _f1_tokens(answer), _f1_tokens(expected)
    if not got or not want:
        return float(got == want)
    same = sum((Counter(got) & Counter(want)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(got), same / len(want)
    return 2 * precision * recall / (precision + recall)


class _WordTokenizer:
    """Lower-cased unicode words: rouge-score's default tokenizer drops every non-ASCII letter,
    which would score any non-English answer 0."""

    def tokenize(self, text: str) -> list[str]:
        import re

        return re.findall(r"\w+", text.lower())


def rouge_l(answers: list[str], expected: list[str]) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence of words), rouge-score's."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    scores = [scorer.score(e, a)["rougeL"].fmeasure for a, e in zip(answers, expected, strict=True)]
    return sum(scores) / max(len(scores), 1)


def bleu(answers: list[str], expected: list[str]) -> float:
    """Corpus BLEU (0-100), sacreBLEU's, with effective order: n-gram orders longer than an
    answer are left out instead of zeroing the score, so one- to three-word answers count."""
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True).corpus_score(answers, [expected]).score


def score_answers(answers: list[str], expected: list[str]) -> dict[str, float]:
    """Every generation metric of `answers` against `expected` (each answer normalized as
    exact match normalizes it)."""
    answers = [normalize_answer(a) for a in answers]
    expected = [normalize_answer(e) for e in expected]
    n = max(len(answers), 1)
    return {
        "exact_match": sum(map(is_exact_match, answers, expected)) / n,
        "f1": sum(map(token_f1, answers, expected)) / n,
        "rouge_l": rouge_l(answers, expected),
        "bleu": bleu(answers, expected),
    }
