"""Greedy answers with HF `generate` to eval prompts, and their scores: the generation eval at
every eval step (`training.generation_eval_rows`) and `lorafleet eval` for adapters vLLM cannot
serve (prompt tuning, prefix tuning, IA3, DoRA, full models).

    lorafleet train configs/demo.yaml training.generation_eval_rows=50   # eval_exact_match, eval_f1

Prompts and answers come from the tokenized eval examples themselves: the prompt is every token
before the first one training computes the loss on, the expected answer is the tokens the loss
is on. So the prompt is token for token what training fed the model, in every data format.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from cluster.text.scoring import is_exact_match, normalize_answer, token_f1

IGNORE = -100


@dataclass(frozen=True)
class Prompted:
    """One eval example: its tokens and labels (for the loss), its prompt and expected answer
    tokens (empty when the whole example is trained on, as `text` rows are)."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


def split_example(ids: list[int], labels: list[int], eos_id: int | None) -> Prompted:
    """The prompt is the tokens before the first trained one (a packed example's first label is
    masked too, but that token is the prompt's start anyway); the answer is the first run of
    trained tokens, without its EOS (a chat row's first assistant turn)."""
    first = next((i for i, label in enumerate(labels) if label != IGNORE and i > 0), len(ids))
    end = first
    while end < len(ids) and labels[end] != IGNORE:
        end += 1
    answer = list(ids[first:end])
    if answer and answer[-1] == eos_id:
        answer.pop()
    # a BOS alone is no prompt: text rows are trained on from their first token
    prompt = tuple(ids[:first]) if 1 < first < len(ids) else ()
    return Prompted(tuple(ids), tuple(labels), prompt, tuple(answer) if prompt else ())


def examples_from_sequences(seqs: list[dict], eos_id: int | None) -> list[Prompted]:
    """Eval examples back out of training's eval sequences: unpacked ones are one example each;
    packed ones are cut where the position ids restart (the padding tail, never trained on, is
    left out)."""
    out = []
    for seq in seqs:
        ids, labels = seq["input_ids"], seq["labels"]
        n = seq.get("num_tokens", len(ids))
        pos = seq.get("position_ids") or [0] + [1] * (n - 1)
        starts = [i for i in range(n) if pos[i] == 0] + [n]
        for a, b in zip(starts, starts[1:], strict=False):
            if any(label != IGNORE for label in labels[a + 1 : b]):
                out.append(split_example(ids[a:b], labels[a:b], eos_id))
    return out


@torch.no_grad()
def hf_answers(
    model,
    prompts: list[tuple[int, ...]],
    *,
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    batch_size: int = 16,
    amp: torch.dtype | None = None,
) -> list[list[int]]:
    """Greedy answer tokens (EOS and what follows cut) for each prompt, in batches left-padded
    so every row's answer starts at the same column. The model is left in the mode it had."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, p in enumerate(chunk):
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                gen = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                    eos_token_id=eos_id,
                    use_cache=True,
                )
            for row in gen[:, width:].tolist():
                out.append(row[: row.index(eos_id)] if eos_id in row else row)
    finally:
        model.train(was_training)
    return out


@lru_cache(maxsize=4)
def _tokenizer(cfg_json: str):
    from cluster.config.job import JobConfig
    from train.model import load_tokenizer

    return load_tokenizer(JobConfig.model_validate_json(cfg_json))


def generation_eval(run, all_sum) -> dict:
    """`eval_exact_match` and `eval_f1` of greedy answers to the first
    `training.generation_eval_rows` eval examples, shared out over the workers (each answers
    every world-th one) and summed by `all_sum` (the loop's all-reduce). Runs on the training model itself, in eval mode; the 4-bit
    layers keep their training layout (train.model.keep_cpu_4bit_trainable), so training goes on
    from the same weights."""
    tokenizer = _tokenizer(run.cfg.model_dump_json())
    eos = tokenizer.eos_token_id
    examples = [e for e in examples_from_sequences(run.data.eval, eos) if e.prompt_ids]
    examples = examples[: run.cfg.training.generation_eval_rows]
    mine = examples[run.rank :: run.world]
    hits = f1 = 0.0
    if mine:
        answers = hf_answers(
            run.model,
            [e.prompt_ids for e in mine],
            pad_id=run.pad_id,
            eos_id=eos,
            max_new_tokens=max(len(e.answer_ids) for e in examples) + 2,
            batch_size=run.cfg.training.batch_size,
            amp=run.amp,
        )
        for got, e in zip(answers, mine, strict=True):
            text = normalize_answer(tokenizer.decode(got, skip_special_tokens=True))
            want = tokenizer.decode(list(e.answer_ids), skip_special_tokens=True)
            hits += is_exact_match(text, want)
            f1 += token_f1(text, want)
    hits, f1, n = all_sum([hits, f1, float(len(mine))], run.device)
    return {"eval_exact_match": hits / max(n, 1.0), "eval_f1": f1 / max(n, 1.0)}
