"""The data pipeline: formats, loss masks, packing without leaks, bad rows by file and row."""

from __future__ import annotations

import json

import pytest
import torch

from cluster.config.sections import DataConfig
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


# --- prompt formats: what serving renders equals what training tokenized (cluster/prompt_format)


def _prompt_ids(ids, labels) -> list[int]:
    """An example's tokens up to where its response (the first trained token) starts."""
    return ids[: next(i for i, lab in enumerate(labels) if lab != IGNORE)]


def _served_ids(tok, rec, endpoint: str, request) -> list[int]:
    """The tokens a server following record `rec` gives the engine, rendered as vLLM renders
    (the chat template through the tokenizer, then no special tokens added)."""
    if endpoint == "completions":
        text = rec.completion_prompt(request)
    else:
        text = tok.apply_chat_template(
            rec.chat_messages(request),
            chat_template=rec.serving_chat_template(),
            tokenize=False,
            add_generation_prompt=True,
        )
    return tok(text, add_special_tokens=False).input_ids


CHATML_NO_BOS = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    ("fmt", "template", "row", "endpoint", "request_"),
    [
        ("alpaca", None, {"instruction": "Say hi", "output": "hi"}, "completions", "Say hi"),
        ("alpaca", None, {"instruction": "Say hi", "output": "hi"}, "chat", "Say hi"),
        ("completion", None, {"prompt": "greet: ab\n", "completion": "hi"}, "completions", None),
        ("completion", None, {"prompt": "greet: ab\n", "completion": "hi"}, "chat", None),
        ("chat", "own", None, "chat", None),
        ("chat", "fallback", None, "chat", None),
        ("chat", CHATML_NO_BOS, None, "chat", None),
        ("chat", "fallback", None, "completions", None),
    ],
    ids=["alpaca-completions", "alpaca-chat", "completion-completions", "completion-chat"]
    + ["chat-own-template", "chat-fallback", "chat-template-without-bos"]
    + ["chat-completions-rendered-by-the-client"],
)
def test_served_prompt_tokens_equal_the_tokens_training_saw(
    tmp_path, tokenizer, fmt, template, row, endpoint, request_
):
    import copy

    from cluster.text.prompt_format import Recorded, record

    tok = copy.deepcopy(tokenizer)
    if template == "fallback":
        tok.chat_template = None
    elif template not in (None, "own"):
        tok.chat_template = template
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "greet: ab"},
        {"role": "assistant", "content": "hi"},
    ]
    row = row or {"messages": msgs}
    p = _write_jsonl(tmp_path / "r.jsonl", [row])
    [(ids, labels)], _ = build_examples(DataConfig(path=str(p), format=fmt), tok)
    rec = Recorded.from_meta(json.loads(json.dumps(record(fmt, tok, False))))
    if request_ is None:
        request_ = row.get("prompt") if endpoint == "completions" else msgs[:-1]
    if endpoint == "chat" and isinstance(request_, str):
        request_ = [{"role": "user", "content": request_}]
    if fmt == "completion" and endpoint == "chat":
        request_ = [{"role": "user", "content": row["prompt"]}]
    if fmt == "chat" and endpoint == "completions":
        # a client that renders the conversation itself, without BOS (the template writes it)
        request_ = tok.decode(_prompt_ids(ids, labels)).removeprefix(tok.bos_token)
    assert _served_ids(tok, rec, endpoint, request_) == _prompt_ids(ids, labels)
    if fmt == "chat":
        source = "fallback" if template == "fallback" else "tokenizer"
        assert record(fmt, tok, False)["chat_template_source"] == source


def test_prompt_format_records_and_refusals():
    from cluster.text.prompt_format import PromptFormatError, Recorded, conversation_text

    # versions published before formats were recorded (or with the earlier partial record)
    assert Recorded.from_meta(None) is None
    assert Recorded.from_meta({"data_format": "alpaca", "chat_template": None}) is None
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert conversation_text(convo) == "be brief\n\nhi"
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert conversation_text(parts) == "a\nb"
    with pytest.raises(PromptFormatError, match=r"messages\[1\]: role 'assistant'"):
        conversation_text([convo[1], {"role": "assistant", "content": "yo"}, convo[1]])


def _source_of(tokenizer, seq) -> str:
    return tokenizer.decode(seq["input_ids"], skip_special_tokens=True)[:2]


def test_sources_mix_by_weight_deterministically_and_bad_rows_name_their_source(
    tmp_path, tokenizer
):
    """Task data plus general text, weighted 3:1: a quarter of the training examples are text
    (the small source repeated to its share), the same order on every build (every worker)."""
    task = _write_jsonl(
        tmp_path / "task.jsonl", [{"prompt": f"t{i} ", "completion": f"x{i}"} for i in range(90)]
    )
    text = _write_jsonl(tmp_path / "text.jsonl", [{"text": f"g{i} words"} for i in range(30)])
    cfg = DataConfig(
        sources=[
            {"path": str(task), "weight": 3},
            {"path": str(text), "format": "text", "weight": 1},
        ],
        eval_ratio=0.1,
        packing=False,
    )
    prepared = prepare(cfg, tokenizer, log=lambda *_: None)
    kinds = [_source_of(tokenizer, s)[0] for s in prepared.train]
    assert len(kinds) == 81 + 27  # every source's training rows, in all
    assert kinds.count("g") / len(kinds) == pytest.approx(0.25, abs=0.01)
    assert [s["share"] for s in prepared.report.sources] == pytest.approx([0.75, 0.25], abs=0.01)
    assert len(prepared.eval) == 9 + 3  # each source holds out its eval_ratio; one pooled set
    again = prepare(cfg, tokenizer, log=lambda *_: None)
    assert [s["input_ids"] for s in again.train] == [s["input_ids"] for s in prepared.train]
    # a bad row in the second source names that file and row
    _write_jsonl(text, [{"text": "fine"}, {"prompt": "no text field"}])
    with pytest.raises(DataError, match=rf"{text}: row 2: missing field 'text'"):
        prepare(cfg, tokenizer, log=lambda *_: None)


def test_data_report_counts_duplicates_lengths_and_warns_of_train_eval_overlap(tmp_path, tokenizer):
    rows = [{"prompt": f"q{i} ", "completion": "a" * (i % 7 + 1)} for i in range(40)]
    p = _write_jsonl(tmp_path / "d.jsonl", rows + rows[:3])  # three exact duplicates
    e = _write_jsonl(tmp_path / "e.jsonl", rows[10:12] + [{"prompt": "new ", "completion": "b"}])
    said = []
    report = prepare(DataConfig(path=str(p), eval_path=str(e)), tokenizer, log=said.append).report
    assert report.rows == 43 and report.duplicates == 3 and report.examples == 40
    assert "dropped 3 exact duplicate examples" in said[0]
    texts = [f"q{i} " + "a" * (i % 7 + 1) for i in range(40)]
    # bos + prompt + completion + eos
    lengths = sorted(len(tokenizer(t, add_special_tokens=False).input_ids) + 2 for t in texts)
    assert report.lengths == {"p50": lengths[19], "p90": lengths[35], "p99": lengths[39]} | {
        "max": lengths[-1]
    }
    assert report.shared_with_eval == 2 and report.shared_example == "q10 aaaa"
    lines = report.lines()
    assert any("warning: 2 of 3 eval examples also appear in the training data" in x for x in lines)
    assert json.loads(json.dumps(report.to_dict()))["duplicates"] == 3


def test_epochs_become_steps_the_way_batches_are_cut(tokenizer):
    from train.data import ShardedBatches, steps_for_epochs

    seqs = [{"input_ids": [1], "labels": [1], "position_ids": [0], "num_tokens": 1}] * 100
    steps, per_epoch = steps_for_epochs(100, epochs=2, batch_size=4, world=2, accum=3)
    assert per_epoch == ShardedBatches(seqs, 4, 0, 2, 0, 0).per_epoch == 12
    assert steps == 8  # 2 epochs x 12 micro-batches / 3 per optimizer step
    assert steps_for_epochs(3, epochs=1, batch_size=8, world=1, accum=1) == (1, 1)
