"""The data pipeline: formats, loss masks, packing without leaks, bad rows by file and row."""

from __future__ import annotations

import json

import pytest
import torch

from cluster.job_config import DataConfig
from train.data import (
    IGNORE,
    DataError,
    build_examples,
    collate,
    pack,
    prepare,
)


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _decode_trained(tokenizer, ids, labels):
    return tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])


def test_completion_loss_counts_only_the_response(tmp_path, tokenizer):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: two plus two?\n", "completion": "four"}])
    [(ids, labels)], _ = build_examples(DataConfig(path=str(p)), tokenizer)
    assert tokenizer.decode(ids) == "<|bos|>Q: two plus two?\nfour<|eos|>"
    assert _decode_trained(tokenizer, ids, labels) == "four<|eos|>"
    [(ids2, labels2)], _ = build_examples(DataConfig(path=str(p), train_on_prompt=True), tokenizer)
    assert ids2 == ids and labels2[1:] == ids2[1:]


def test_alpaca_with_and_without_input(tmp_path, tokenizer):
    p = _write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Upper-case it", "input": "abc", "output": "ABC"},
            {"instruction": "Say hi", "output": "hi"},
        ],
    )
    (ids, labels), (ids2, labels2) = build_examples(
        DataConfig(path=str(p), format="alpaca"), tokenizer
    )[0]
    assert "### Input:\nabc" in tokenizer.decode(ids)
    assert "### Input" not in tokenizer.decode(ids2)
    assert _decode_trained(tokenizer, ids, labels) == "ABC<|eos|>"
    assert _decode_trained(tokenizer, ids2, labels2) == "hi<|eos|>"


def test_chat_trains_on_every_assistant_turn_and_nothing_else(tmp_path, tokenizer):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    p = _write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    [(ids, labels)], _ = build_examples(DataConfig(path=str(p), format="chat"), tokenizer)
    # the tokenizer's own chat template renders the whole conversation
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(msgs, tokenize=False)
    assert _decode_trained(tokenizer, ids, labels) == "hello\n<|eos|>ciao\n<|eos|>"


def test_chat_without_a_template_uses_the_documented_default(tmp_path, tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    p = _write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    [(ids, labels)], _ = build_examples(DataConfig(path=str(p), format="chat"), tok)
    assert tok.decode(ids) == "<|bos|><|user|>\nhi\n<|assistant|>\nyo\n<|eos|>"
    assert _decode_trained(tok, ids, labels) == "yo\n<|eos|>"


def test_text_format_trains_on_everything(tmp_path, tokenizer):
    p = _write_jsonl(tmp_path / "t.jsonl", [{"text": "plain words"}])
    [(ids, labels)], _ = build_examples(DataConfig(path=str(p), format="text"), tokenizer)
    assert _decode_trained(tokenizer, ids, labels) == "plain words<|eos|>"


def test_csv_json_and_parquet_sources(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i} ", "completion": f"c{i}"} for i in range(3)]
    (tmp_path / "d.csv").write_text(
        "prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in rows)
    )
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.csv", "d.json", "d.parquet"):
        examples, report = build_examples(DataConfig(path=str(tmp_path / name)), tokenizer)
        assert report.rows == 3 and len(examples) == 3
        assert tokenizer.decode(examples[2][0]) == "<|bos|>p2 c2<|eos|>"


def test_bad_row_error_names_file_row_and_problem(tmp_path, tokenizer):
    p = _write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "a", "completion": "b"},
            {"prompt": "a", "completion": "b"},
            {"prompt": "a", "answer": "b"},
            "{not json",
            {"prompt": "a", "completion": 7},
        ],
    )
    with pytest.raises(DataError) as e:
        build_examples(DataConfig(path=str(p)), tokenizer)
    assert f"{p}: row 3: missing field 'completion'" in str(e.value)
    assert "data.on_bad_row=skip" in str(e.value)


def test_bad_rows_skipped_are_counted_and_reported(tmp_path, tokenizer):
    p = _write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "a", "completion": "b"},
            "{not json",
            {"prompt": "a", "completion": 7},
            {"prompt": "c", "completion": "d"},
        ],
    )
    said = []
    examples, report = build_examples(
        DataConfig(path=str(p), on_bad_row="skip"), tokenizer, log=said.append
    )
    assert len(examples) == 2 and report.bad_rows == 2
    assert report.first_bad[0].endswith(
        "row 2: invalid JSON (Expecting property name enclosed in double quotes at column 2)"
    )
    assert "must be a string, got int" in report.first_bad[1]
    assert "skipped 2 bad rows" in said[0]


def test_bad_chat_row_is_explained(tmp_path, tokenizer):
    p = _write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(
        DataError, match=r"row 1: messages\[0\] must be \{role: system\|user\|assistant"
    ):
        build_examples(DataConfig(path=str(p), format="chat"), tokenizer)


def test_missing_file_and_unsupported_type(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data file not found"):
        build_examples(DataConfig(path=str(tmp_path / "nope.jsonl")), tokenizer)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type .txt"):
        build_examples(DataConfig(path=str(tmp_path / "d.txt")), tokenizer)


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    rows = [
        {"prompt": "p", "completion": "x" * 40},
        {"prompt": "p", "completion": "short"},
        {"prompt": "y" * 60, "completion": "z"},
    ]
    p = _write_jsonl(tmp_path / "d.jsonl", rows)
    said = []
    ex, rep = build_examples(DataConfig(path=str(p), max_length=16), tokenizer, log=said.append)
    # row 1 is cut to 16 tokens; row 3 loses its whole response when cut, so it is dropped
    assert (
        [len(ids) for ids, _ in ex] == [16, 8] and rep.truncated == 1 and rep.dropped_overlong == 1
    )
    assert "1 examples truncated and 1 dropped" in said[0]
    ex, rep = build_examples(
        DataConfig(path=str(p), max_length=16, overlong="drop"), tokenizer, log=said.append
    )
    assert len(ex) == 1 and rep.dropped_overlong == 2 and rep.truncated == 0


def test_packing_restarts_positions_and_masks_boundaries(tmp_path, tokenizer):
    a = ([1, 10, 11, 12], [IGNORE, IGNORE, 11, 12])
    b = ([1, 20, 21], [IGNORE, 20, 21])
    c = ([1, 30, 31, 32, 33], [IGNORE, IGNORE, IGNORE, 32, 33])
    seqs = pack([a, b, c], max_length=8, pad_id=0)
    assert len(seqs) == 2
    assert seqs[0]["input_ids"] == [1, 10, 11, 12, 1, 20, 21, 0]
    assert seqs[0]["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 0]
    assert seqs[0]["labels"] == [IGNORE, IGNORE, 11, 12, IGNORE, 20, 21, IGNORE]
    assert seqs[0]["num_tokens"] == 7


def test_packed_examples_do_not_see_each_other(tiny_base, tokenizer):
    """The logits of an example inside a pack equal its logits alone: no cross-example leak."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    first = tokenizer("<|bos|>last: abc def\ndef<|eos|>", add_special_tokens=False).input_ids
    second = tokenizer("<|bos|>swap: gh ij\nij gh<|eos|>", add_special_tokens=False).input_ids
    seqs = pack([(first, first), (second, second)], max_length=64, pad_id=0)
    batch = collate(seqs, pad_id=0)
    batch.pop("num_tokens")
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits[0]
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    span = slice(len(first), len(first) + len(second))
    assert torch.allclose(packed[span], alone, atol=1e-4)
    # and the check has teeth: without position-id restarts the second example sees the first
    assert not torch.allclose(leaky[span], alone, atol=1e-2)


def test_eval_split_by_ratio_and_by_file(tmp_path, tokenizer):
    rows = [{"prompt": f"q{i} ", "completion": f"a{i}"} for i in range(40)]
    p = _write_jsonl(tmp_path / "d.jsonl", rows)
    e = _write_jsonl(tmp_path / "e.jsonl", rows[:5])
    by_ratio = prepare(DataConfig(path=str(p), eval_ratio=0.25, packing=False), tokenizer)
    assert len(by_ratio.train) == 30 and len(by_ratio.eval) == 10
    by_file = prepare(DataConfig(path=str(p), eval_path=str(e), packing=False), tokenizer)
    assert len(by_file.train) == 40 and len(by_file.eval) == 5
