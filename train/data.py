"""Data: file or hub rows -> formatted segments -> tokens with loss mask -> packed sequences.

    python -m train.data configs/demo.yaml        # prints the data report for a config

Row numbers in errors are 1-based: the line for JSONL, the data row (header not counted) for
CSV, the record index for JSON and Parquet.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cluster.errors import LorafleetError
from cluster.store import storage
from cluster.text.prompt_format import alpaca_prompt, chat_template_for, prepends_bos

IGNORE = -100
LOCAL_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

CHAT_ROLES = {"system", "user", "assistant"}


class DataError(LorafleetError, ValueError):
    """A data problem that names its file and row."""


class RowError(ValueError):
    """What is wrong with one row (the caller adds file and row)."""


@dataclass
class DataReport:
    rows: int = 0
    bad_rows: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    examples: int = 0
    sequences: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    first_bad: list[str] = field(default_factory=list)
    duplicates: int = 0  # exact duplicate examples (after formatting) dropped
    eval_examples: int = 0
    shared_with_eval: int = 0  # eval examples that are also training examples
    shared_example: str = ""
    lengths: dict = field(default_factory=dict)  # tokens per training example: p50, p90, p99, max
    sources: list[dict] = field(default_factory=list)  # per source: rows, examples, share, ...
    plan: dict = field(default_factory=dict)  # steps, epochs, steps per epoch (train/trainer.py)

    def summary(self) -> str:
        parts = [
            f"{self.rows} rows",
            f"{self.examples} examples",
            f"{self.sequences} sequences",
            f"{self.tokens} tokens ({self.trainable_tokens} trained on)",
        ]
        if self.bad_rows:
            parts.append(f"{self.bad_rows} bad rows skipped")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length")
        if self.dropped_overlong:
            parts.append(f"{self.dropped_overlong} over max_length dropped")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicates dropped")
        return ", ".join(parts)

    def lines(self) -> list[str]:
        """The data report printed before training: one line per source, then the totals."""
        out = []
        for src in self.sources:
            out.append(
                f"[data] source {src['path']} ({src['format']}, weight {src['weight']:g}): "
                f"{src['rows']} rows, {src['bad_rows']} bad, {src['duplicates']} duplicates "
                f"dropped, {src['train']} train + {src['eval']} eval examples; drawn "
                f"{src['drawn']} ({src['share']:.1%} of training examples)"
            )
        L = self.lengths
        if L:
            out.append(
                f"[data] tokens per example: p50 {L['p50']}, p90 {L['p90']}, p99 {L['p99']}, "
                f"max {L['max']}"
            )
        out.append(f"[data] train: {self.summary()}; eval: {self.eval_examples} examples")
        if self.shared_with_eval:
            out.append(
                f"[data] warning: {self.shared_with_eval} of {self.eval_examples} eval examples "
                f"also appear in the training data, e.g. {self.shared_example!r}; the eval loss "
                "overstates how well the adapter generalizes"
            )
        return out

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Reading rows


def read_rows(path: str, split: str = "train") -> Iterator[tuple[int, object, str]]:
    """(row number, row, source) for a local file, an s3:// or gs:// file (read from this node's
    cache; errors name the remote URI), or a hub dataset id."""
    remote = storage.is_remote(path)
    p = Path(path if remote else Path(path).expanduser())
    suffix = p.suffix.lower()
    if suffix in LOCAL_SUFFIXES:
        try:
            local = storage.local_copy(path) if remote else p
        except FileNotFoundError:
            local = None
        except OSError as e:  # the bucket unreachable, or access denied: one line that says so
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"{path}: cannot read the data file ({reason})") from None
        if local is None or not local.is_file():
            raise DataError(f"{path}: data file not found")
        yield from _file_rows(local, LOCAL_SUFFIXES[suffix], path if remote else str(p))
        return
    if remote or p.exists():
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'}; expected one of {sorted(LOCAL_SUFFIXES)}"
        )
    # a hub dataset id such as "tatsu-lab/alpaca"
    import datasets

    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # network, auth or unknown id: say which, in one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"data.path: '{path}' is not a local file and could not be loaded from the hub as a "
            f"dataset ({reason}); give a local path ending in one of {sorted(LOCAL_SUFFIXES)}"
        ) from None
    for n, row in enumerate(ds, 1):
        yield n, row, f"{path}[{split}]"


def _file_rows(p: Path, kind: str, source: str) -> Iterator[tuple[int, object, str]]:
    """Rows of the local file `p`, reported as coming from `source` (its path or remote URI)."""
    if kind == "jsonl":
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line), source
                except json.JSONDecodeError as e:
                    yield n, RowError(f"invalid JSON ({e.msg} at column {e.colno})"), source
    elif kind == "json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f'{source}: expected a JSON list of rows (or {{"data": [...]}})')
        for n, row in enumerate(data, 1):
            yield n, row, source
    elif kind == "csv":
        with p.open(encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.DictReader(f), 1):
                yield n, row, source
    else:
        import pyarrow.parquet as pq

        for n, row in enumerate(pq.read_table(p).to_pylist(), 1):
            yield n, row, source


# ---------------------------------------------------------------------------------------------
# Formats: a row -> [(text, trainable)]


def _field(row: dict, key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing field '{key}' (has: {sorted(row)})")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def format_row(row: object, fmt: str, tokenizer) -> list[tuple[str, bool]]:
    """Segments of text, each marked trainable (response) or not (prompt)."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(f"expected an object with named fields, got {type(row).__name__}")
    eos = tokenizer.eos_token or ""
    if fmt == "completion":
        prompt, completion = _field(row, "prompt"), _field(row, "completion")
        if not completion:
            raise RowError("field 'completion' is empty")
        return [(prompt, False), (completion + eos, True)]
    if fmt == "alpaca":
        instruction, inp, output = (
            _field(row, "instruction"),
            _field(row, "input", False),
            _field(row, "output"),
        )
        if not output:
            raise RowError("field 'output' is empty")
        return [(alpaca_prompt(instruction, inp), False), (output + eos, True)]
    if fmt == "text":
        text = _field(row, "text")
        if not text:
            raise RowError("field 'text' is empty")
        return [(text + eos, True)]
    if fmt == "chat":
        return _chat_segments(row, tokenizer)
    raise ValueError(f"unknown format {fmt!r}")


def _chat_segments(row: dict, tokenizer) -> list[tuple[str, bool]]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowError("field 'messages' must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or m.get("role") not in CHAT_ROLES
        ):
            raise RowError(
                f"messages[{i}] must be {{role: system|user|assistant, content: string}}, got {m!r}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no assistant message to learn from")
    template, _ = chat_template_for(tokenizer)  # the tokenizer's own, else the fallback

    def render(msgs, gen):
        return tokenizer.apply_chat_template(
            msgs, chat_template=template, tokenize=False, add_generation_prompt=gen
        )

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before = render(messages[:i], True) if i else render([], True)
            upto = render(messages[: i + 1], False)
            if not before.startswith(done) or not upto.startswith(before):
                # a template that rewrites earlier turns: train on the whole conversation instead
                return [(render(messages, False), True)]
            segments += [(before[len(done) :], False), (upto[len(before) :], True)]
            done = upto
    tail = render(messages, False)[len(done) :]
    if tail:
        segments.append((tail, False))
    return [s for s in segments if s[0]]


# ---------------------------------------------------------------------------------------------
# Tokens


def tokenize_segments(segments, tokenizer, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    if prepends_bos(segments[0][0], tokenizer):  # the rule serving follows too
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)
    for text, trainable in segments:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += toks
        labels += toks if (trainable or train_on_prompt) else [IGNORE] * len(toks)
    return ids, labels


def build_examples(
    data_cfg, tokenizer, path: str | None = None, log=print, source=None
) -> tuple[list, DataReport]:
    """Read, validate, format and tokenize every row of one source: `path` (the eval file), or
    `source` (a `data.sources` entry), or `data.path`."""
    report = DataReport()
    examples = []
    source_path = path or (source.path if source else data_cfg.path)
    split = source.split if source else data_cfg.split
    fmt = (source.format if source else None) or data_cfg.format
    for n, row, where in read_rows(source_path, split):
        report.rows += 1
        try:
            segments = format_row(row, fmt, tokenizer)
        except RowError as e:
            msg = f"{where}: row {n}: {e}"
            if data_cfg.on_bad_row == "error":
                raise DataError(msg + " (set data.on_bad_row=skip to skip bad rows)") from None
            report.bad_rows += 1
            if len(report.first_bad) < 5:
                report.first_bad.append(msg)
            continue
        ids, labels = tokenize_segments(segments, tokenizer, data_cfg.train_on_prompt)
        if len(ids) > data_cfg.max_length:
            if data_cfg.overlong == "drop":
                report.dropped_overlong += 1
                continue
            ids, labels = ids[: data_cfg.max_length], labels[: data_cfg.max_length]
            report.truncated += 1
            if all(label == IGNORE for label in labels[1:]):
                # nothing left to learn from once cut: dropping it is the only honest choice
                report.truncated -= 1
                report.dropped_overlong += 1
                continue
        examples.append((ids, labels))
    if report.bad_rows:
        log(f"[data] {source_path}: skipped {report.bad_rows} bad rows, e.g. {report.first_bad[0]}")
    if report.truncated or report.dropped_overlong:
        log(
            f"[data] {source_path}: {report.truncated} examples truncated and "
            f"{report.dropped_overlong} dropped at data.max_length={data_cfg.max_length} "
            f"(data.overlong={data_cfg.overlong})"
        )
    if not examples:
        raise DataError(f"{source_path}: no usable examples ({report.summary()})")
    report.examples = len(examples)
    return examples, report


def pack(examples, max_length: int, pad_id: int) -> list[dict]:
    """Greedy packing in order. Position ids restart at 0 for each example (and for the padding
    tail), which is how the model tells examples apart: transformers' mask builder turns restarts
    into a block-diagonal causal mask, so no example attends to another."""
    seqs = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_pos: list[int] = []

    def flush():
        if not cur_ids:
            return
        pad = max_length - len(cur_ids)
        seqs.append(
            {
                "input_ids": cur_ids + [pad_id] * pad,
                "labels": cur_labels + [IGNORE] * pad,
                "position_ids": cur_pos + list(range(pad)),
                "num_tokens": len(cur_ids),
            }
        )

    for ids, labels in examples:
        if len(cur_ids) + len(ids) > max_length:
            flush()
            cur_ids, cur_labels, cur_pos = [], [], []
        cur_ids += ids
        # the first label of each example would predict it from the previous one: mask it
        cur_labels += [IGNORE] + labels[1:]
        cur_pos += list(range(len(ids)))
    flush()
    return seqs


def unpacked(examples) -> list[dict]:
    return [{"input_ids": ids, "labels": labels} for ids, labels in examples]


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Tensors for the model, plus `num_tokens`: the real (non-padding) tokens in the batch."""
    if "position_ids" in batch[0]:
        # packed: equal lengths, no attention_mask (so the position-id restarts separate examples)
        out = {
            k: torch.tensor([b[k] for b in batch]) for k in ("input_ids", "labels", "position_ids")
        }
        out["num_tokens"] = torch.tensor(sum(b["num_tokens"] for b in batch))
        return out
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), IGNORE)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "num_tokens": mask.sum()}


def split_eval(examples, ratio: float, seed: int):
    if ratio <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(examples) * ratio)))
    if n_eval >= len(examples):
        raise DataError(f"data.eval_ratio={ratio} leaves no training rows out of {len(examples)}")
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


@dataclass
class Prepared:
    train: list[dict]
    eval: list[dict]
    report: DataReport


def prepare(data_cfg, tokenizer, log=print) -> Prepared:
    """Everything from the config's data section to training and eval sequences: every source
    read, deduplicated and split, the training examples mixed by weight, then packed."""
    report = DataReport()
    seen: set = set()
    parts, eval_ex = [], []
    for src in data_cfg.source_list():
        examples, r = build_examples(data_cfg, tokenizer, log=log, source=src)
        examples, dups = drop_duplicates(examples, seen)
        if dups:
            log(f"[data] {src.path}: dropped {dups} exact duplicate examples")
        if dups and not examples:
            raise DataError(
                f"{src.path}: every one of its {dups} examples duplicates an example of an "
                "earlier source or of itself, so it adds nothing to the mix; drop the source or "
                "give it other rows"
            )
        if data_cfg.eval_path:
            train_part, eval_part = examples, []
        else:
            train_part, eval_part = split_eval(examples, data_cfg.eval_ratio, data_cfg.seed)
        parts.append(train_part)
        eval_ex += eval_part
        report.rows, report.bad_rows = report.rows + r.rows, report.bad_rows + r.bad_rows
        report.truncated += r.truncated
        report.dropped_overlong += r.dropped_overlong
        report.first_bad += r.first_bad[: 5 - len(report.first_bad)]
        report.examples += len(examples)
        report.duplicates += dups
        report.sources.append(
            {"path": src.path, "format": src.format, "weight": src.weight, "rows": r.rows}
            | {"bad_rows": r.bad_rows, "duplicates": dups, "examples": len(examples)}
            | {"train": len(train_part), "eval": len(eval_part)}
        )
    if data_cfg.eval_path:
        eval_ex, _ = build_examples(data_cfg, tokenizer, path=data_cfg.eval_path, log=log)
    train_ex, drawn = mix_sources(parts, [s["weight"] for s in report.sources], data_cfg.seed)
    for src, n in zip(report.sources, drawn, strict=True):
        src["drawn"], src["share"] = n, n / max(len(train_ex), 1)
    report.lengths = length_percentiles([len(ids) for part in parts for ids, _ in part])
    report.eval_examples = len(eval_ex)
    _check_overlap(report, parts, eval_ex, tokenizer)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    rng = random.Random(data_cfg.seed)
    rng.shuffle(train_ex)  # pack a mix of lengths (and sources), not sorted runs
    build = (lambda ex: pack(ex, data_cfg.max_length, pad_id)) if data_cfg.packing else unpacked
    train_seqs, eval_seqs = build(train_ex), build(eval_ex)
    report.sequences = len(train_seqs)
    report.tokens = sum(len(ids) for ids, _ in train_ex)
    report.trainable_tokens = sum(
        sum(label != IGNORE for label in labels) for _, labels in train_ex
    )
    return Prepared(train_seqs, eval_seqs, report)


def _key(example) -> tuple:
    ids, labels = example
    return tuple(ids), tuple(labels)


def drop_duplicates(examples, seen: set) -> tuple[list, int]:
    """Examples whose tokens and loss mask were not seen before (in this or an earlier source),
    and how many were dropped. Tokens after formatting: two rows that render the same text are
    duplicates even when their fields differ in ways the format ignores."""
    kept = []
    for ex in examples:
        key = _key(ex)
        if key not in seen:
            seen.add(key)
            kept.append(ex)
    return kept, len(examples) - len(kept)


def mix_sources(parts: list[list], weights: list[float], seed: int) -> tuple[list, list[int]]:
    """Training examples drawn from each source by weight: as many in all as the sources hold
    together, source i contributing round(total * w_i / sum(w)): a seeded sample of a larger
    source, whole repeats plus a seeded sample of a smaller one. Returns (examples, drawn)."""
    if len(parts) == 1:
        return list(parts[0]), [len(parts[0])]
    total, weight_sum = sum(len(p) for p in parts), sum(weights)
    rng = random.Random(seed * 7_919 + 1)
    mixed, drawn = [], []
    for part, w in zip(parts, weights, strict=True):
        k = max(1, round(total * w / weight_sum))
        whole, rest = divmod(k, len(part))
        mixed += list(part) * whole + rng.sample(list(part), rest)
        drawn.append(k)
    return mixed, drawn


def length_percentiles(lengths: list[int]) -> dict:
    """Nearest-rank p50, p90, p99 and the max of tokens per example."""
    if not lengths:
        return {}
    xs = sorted(lengths)

    def rank(q: float) -> int:
        return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": xs[-1]}


def _check_overlap(report: DataReport, parts, eval_ex, tokenizer) -> None:
    """Eval examples that are also training examples: possible only with data.eval_path (a
    split of rows deduplicated across all sources cannot overlap)."""
    train_keys = {_key(ex) for part in parts for ex in part}
    shared = [ex for ex in eval_ex if _key(ex) in train_keys]
    report.shared_with_eval = len(shared)
    if shared:
        text = tokenizer.decode(shared[0][0], skip_special_tokens=True)
        report.shared_example = text if len(text) <= 80 else text[:77] + "..."


def steps_for_epochs(sequences: int, epochs: float, batch_size: int, world: int, accum: int):
    """Optimizer steps for `epochs` passes over `sequences`, as ShardedBatches cuts them: one
    micro-batch per worker takes batch_size * world sequences (a smaller set is repeated to one
    full batch). Returns (steps, micro-batches per epoch)."""
    per_epoch = max(1, sequences // (batch_size * world))
    return max(1, math.ceil(epochs * per_epoch / accum)), per_epoch


class ShardedBatches:
    """Deterministic batches for one worker: epoch e is a seeded permutation of all sequences,
    cut into global batches of batch_size * world_size; worker r takes its slice. A position is
    the number of micro-batches already consumed, which is all a checkpoint needs to resume."""

    def __init__(self, seqs, batch_size: int, rank: int, world: int, seed: int, pad_id: int):
        if len(seqs) < batch_size * world:
            # repeat a tiny dataset so every worker gets a full batch
            seqs = seqs * math.ceil(batch_size * world / max(1, len(seqs)))
        self.seqs, self.bs, self.rank, self.world, self.seed, self.pad_id = (
            seqs,
            batch_size,
            rank,
            world,
            seed,
            pad_id,
        )
        self.per_epoch = len(seqs) // (batch_size * world)
        self._epoch, self._order = -1, []

    def batch(self, position: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            self._order = list(range(len(self.seqs)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._epoch = epoch
        order = self._order
        start = (i * self.world + self.rank) * self.bs
        return collate([self.seqs[j] for j in order[start : start + self.bs]], self.pad_id)


if __name__ == "__main__":
    import sys

    from cluster.config.load import load_config
    from train.model import load_tokenizer, resolve_base

    cfg = load_config(sys.argv[1], sys.argv[2:])
    cfg = resolve_base(cfg)
    prepared = prepare(cfg.data, load_tokenizer(cfg))
    print("\n".join(prepared.report.lines()))
