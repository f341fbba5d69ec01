"""`lorafleet eval` and the generation eval during training (#9, part 3).

Quick: the metrics on strings whose scores are worked out by hand, the config checks, prompts and
answers recovered from packed eval sequences. Slow: a real training run with generation eval
at its eval steps (the session's shared 2-worker run: Ray Train, 4-bit tiny base), then
`lorafleet eval` on its adapter, with vLLM in the command's own process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import ROOT, job_config

from cluster.errors import ConfigError
from cluster.text.scoring import bleu, rouge_l, score_answers, token_f1

# ---------------------------------------------------------------------------------------------
# Metrics


def test_token_f1_known_values():
    assert token_f1("cat dog", "cat dog") == 1.0
    assert token_f1("cat", "dog") == 0.0
    assert token_f1("The Cat!", "cat") == 1.0  # case, punctuation and articles do not count
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0
    # answer [cat sat on mat] vs expected [cat sat down]: 2 shared, P 2/4, R 2/3 -> F1 4/7
    assert token_f1("the cat sat on mat", "cat sat down") == pytest.approx(4 / 7)
    # multiplicity: [a a b] (articles aside: x x y) vs [x y y]: shared x, y -> P 2/3, R 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)


def test_rouge_l_and_bleu_known_values():
    assert rouge_l(["cat dog bird"], ["cat dog bird"]) == 1.0
    assert rouge_l(["cat dog"], ["emu yak"]) == 0.0
    # LCS of [the cat sat on the mat] and [the cat on mat] is 4: P 4/6, R 4/4 -> F 0.8
    assert rouge_l(["the cat sat on the mat"], ["the cat on mat"]) == pytest.approx(0.8)
    assert rouge_l(["Größe wächst"], ["größe wächst"]) == 1.0  # non-ASCII words count
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    assert bleu(["cat"], ["cat"]) == pytest.approx(100)  # one-word answers score (effective order)
    assert bleu(["cat dog"], ["emu yak"]) == 0.0


def test_score_answers_normalizes_like_exact_match():
    got = score_answers(["cat\n", "cow"], ["cat", "dog"])
    assert got["exact_match"] == 0.5 and got["f1"] == 0.5 and got["rouge_l"] == 0.5
    assert set(got) == {"exact_match", "f1", "rouge_l", "bleu"}
    # a chat template that ends a turn with a newline (the fallback does): the expected answer
    # decodes as "yo\n", and a right answer must still count
    chat = score_answers(["yo", "yo\n", "no"], ["yo\n", "yo\n", "yo\n"])
    assert chat["exact_match"] == pytest.approx(2 / 3) and chat["rouge_l"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------
# Config


def _cfg(tmp_path, **over):
    return job_config(tmp_path, tmp_path / "base", tmp_path / "d.jsonl", **over)


def test_tune_metric_exact_match_needs_generation_eval(tmp_path):
    with pytest.raises(ConfigError, match=r"tune.metric: eval_exact_match .*generation_eval_rows"):
        _cfg(tmp_path, **{"tune.metric": "eval_exact_match", "tune.mode": "max"})
    with pytest.raises(ConfigError, match=r"tune.mode: eval_f1 is better when larger"):
        _cfg(tmp_path, **{"tune.metric": "eval_f1", "training.generation_eval_rows": 8})
    cfg = _cfg(
        tmp_path,
        **{
            "tune.metric": "eval_exact_match",
            "tune.mode": "max",
            "training.generation_eval_rows": 8,
        },
    )
    assert cfg.tune.metric == "eval_exact_match"


def test_generation_eval_refused_where_prompts_cannot_be_told_from_answers(tmp_path):
    with pytest.raises(ConfigError, match=r"training.generation_eval_rows: .*data.format='text'"):
        _cfg(tmp_path, **{"training.generation_eval_rows": 4, "data.format": "text"})
    with pytest.raises(ConfigError, match=r"eval.limit: Input should be greater than 0"):
        _cfg(tmp_path, **{"eval.limit": 0})


def test_prompts_and_answers_come_back_out_of_packed_sequences():
    from train.data import IGNORE, pack
    from train.generation import examples_from_sequences

    bos, eos = 1, 2
    # two completion examples (BOS, prompt, answer, EOS) and one text example, packed together
    a = ([bos, 10, 11, 20, 21, eos], [IGNORE, IGNORE, IGNORE, 20, 21, eos])
    b = ([bos, 12, 30, eos], [IGNORE, IGNORE, 30, eos])
    text = ([bos, 40, 41, eos], [IGNORE, 40, 41, eos])
    got = examples_from_sequences(pack([a, b, text], 32, pad_id=0), eos)
    assert [(e.prompt_ids, e.answer_ids) for e in got] == [
        ((bos, 10, 11), (20, 21)),
        ((bos, 12), (30,)),
        ((), ()),  # trained on from its first token: loss only, nothing to answer
    ]
    assert [list(e.ids) for e in got] == [a[0], b[0], text[0]]


def test_generation_eval_scores_the_models_own_answers(tiny_base, tmp_path):
    """The generation eval on held-out rows whose expected answers are known to be right or wrong:
    for half the rows the expected answer is the base's own greedy answer, for the other half that
    answer with a letter more. Exact match is then exactly 0.5 (the tiny test adapters score ~0,
    which an eval that always says 0 would match too)."""
    import torch
    from transformers import AutoModelForCausalLM

    from train.data import IGNORE, pack
    from train.generation import generation_eval, hf_answers
    from train.model import load_tokenizer
    from train.tasks import TASKS, make_rows

    cfg = job_config(tmp_path, tiny_base, tmp_path / "d.jsonl", **{"training.batch_size": 4})
    tok, model = load_tokenizer(cfg), AutoModelForCausalLM.from_pretrained(tiny_base)
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else 0
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    prompts = [
        tuple(bos + tok.encode(r["prompt"], add_special_tokens=False))
        for r in make_rows(TASKS["copy"], 64, seed=5)
    ]
    said = hf_answers(model, prompts, pad_id=pad, eos_id=eos, max_new_tokens=16, batch_size=4)
    rows = [(p, a) for p, a in zip(prompts, said, strict=True) if 0 < len(a) < 12][:8]
    assert len(rows) == 8, said  # the base ends its answers: they are whole
    wrong = tok.encode("q", add_special_tokens=False)
    examples = []
    for i, (p, a) in enumerate(rows):
        answer = list(a) + ([] if i % 2 == 0 else wrong) + [eos]
        examples.append((list(p) + answer, [IGNORE] * len(p) + answer))
    run = types.SimpleNamespace(
        cfg=cfg.model_copy(
            update={"training": cfg.training.model_copy(update={"generation_eval_rows": 8})}
        ),
        data=types.SimpleNamespace(eval=pack(examples, 64, pad)),
        model=model,
        pad_id=pad,
        rank=0,
        world=1,
        amp=None,
        device=torch.device("cpu"),
    )
    got = generation_eval(run, lambda values, device: values)
    assert got["eval_exact_match"] == 0.5, got
    assert 0.5 <= got["eval_f1"] < 1, got  # a wrong answer shares some words at most


# ---------------------------------------------------------------------------------------------
# Training with generation eval, then `lorafleet eval` on its adapter


@pytest.fixture(scope="module")
def gen_run(two_worker_run):
    """The session's shared 2-worker run (tests/conftest.py `two_worker_run`, adapter t-last):
    it asks for generation eval on 8 held-out rows at its eval steps, so its adapter serves the
    training, serving and evaluation tests alike and is trained once per session."""
    cfg, summary = two_worker_run
    assert cfg.training.generation_eval_rows == 8
    return cfg, summary


@pytest.mark.slow
def test_generation_eval_reports_exact_match_at_eval_steps_and_training_goes_on(gen_run):
    _, summary = gen_run
    history = summary["history"]
    evals = [h for h in history if "eval_exact_match" in h]
    assert [h["step"] for h in evals] == [10, 20, 30]
    assert not any("eval_exact_match" in h for h in history if "eval_loss" not in h)
    # generating in eval mode between steps does not stop the adapter learning
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0] - 0.3
    assert evals[-1]["eval_loss"] < history[0]["eval_loss"] - 0.3
    assert "eval_exact_match" in summary["metrics"]  # what Ray Train (and Tune) received
    # the numbers are the adapter's own: the final step's exact match and F1 are those of the
    # published adapter's greedy answers to the same 8 held-out prompts, scored apart from
    # training (`lorafleet eval`'s HF path loads base and adapter afresh and scores with
    # cluster.text.scoring); one answer of 8 may differ (fresh 4-bit load vs the training layout)
    cfg, _ = gen_run
    check = _hf_eval(cfg, summary, limit=8)["results"]["task"][f"{cfg.name}@{summary['version']}"]
    print(f"training: {evals[-1]}; apart: {check}")
    assert summary["metrics"]["eval_exact_match"] == evals[-1]["eval_exact_match"]
    assert abs(evals[-1]["eval_exact_match"] - check["exact_match"]) <= 1 / 8 + 1e-9
    assert abs(evals[-1]["eval_f1"] - check["f1"]) <= 1 / 8 + 1e-9


def _hf_eval(cfg, summary, limit: int, general=None) -> dict:
    """`lorafleet eval` in this process with HF generate (no vLLM): the base and this run's
    published adapter, scored on the first `limit` held-out rows (and general ones)."""
    from train.evaluate import evaluate

    cfg = cfg.model_copy(
        update={
            "name": f"{cfg.name}-hf",  # its own report folder; the adapter is named in full
            "eval": cfg.eval.model_copy(
                update={
                    "engine": "hf",
                    "limit": limit,
                    "adapters": [f"{cfg.name}@{summary['version']}"],
                    "general_path": str(general) if general else None,
                }
            ),
        }
    )
    return evaluate(cfg, log=lambda *_: None)


@pytest.mark.slow
def test_lorafleet_eval_table_json_chart_and_forgetting(gen_run, tmp_path):
    from train.demo import write_general_data

    cfg, summary = gen_run
    general = write_general_data(tmp_path)
    config = tmp_path / "job.json"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "eval", str(config)]
        + [f"eval.general_path={general}", "eval.limit=24"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    label = f"{cfg.name}@{summary['version']}"
    assert "| base | vllm |" in proc.stdout and f"| {label} | vllm |" in proc.stdout
    out = Path(cfg.storage.root) / "runs" / cfg.name
    (folder,) = [p for p in out.iterdir() if p.name.startswith("eval-")]
    report = json.loads((folder / "eval.json").read_text())
    metrics = {"loss", "perplexity", "exact_match", "f1", "rouge_l", "bleu"}
    for name in ("task", "general"):
        assert set(report["results"][name]) == {"base", label}
        for row in report["results"][name].values():
            assert metrics <= set(row), row
    task = report["results"]["task"]
    assert task[label]["loss"] < task["base"]["loss"] - 0.3
    assert report["sets"]["task"]["rows"] == 24
    assert set(report["forgetting"][label]) == metrics
    loss_change = (
        report["results"]["general"][label]["loss"] - report["results"]["general"]["base"]["loss"]
    )
    assert report["forgetting"][label]["loss"] == pytest.approx(loss_change)
    assert "forgetting check" in proc.stdout
    # the table's answers are the adapter's own, as served: on the rows the report shows, the
    # adapter changes the base's answers (HF generate, both loaded afresh), vLLM's answers with the
    # adapter are not its answers for the base, and they agree with HF's adapter answers at least
    # as often as with the base's; every score is HF's within 2 rows of 24
    hf = _hf_eval(cfg, summary, limit=24, general=general)["results"]

    def answers(results, who):
        return [x["answer"] for x in results["task"][who]["examples"]]

    served, served_base = answers(report["results"], label), answers(report["results"], "base")
    apart, apart_base = answers(hf, label), answers(hf, "base")
    print(f"vLLM {served} (base {served_base}); HF {apart} (base {apart_base})")
    assert apart != apart_base and served != served_base, (served, served_base, apart, apart_base)
    same = sum(a == b for a, b in zip(served, apart, strict=True))
    assert same >= sum(a == b for a, b in zip(served, served_base, strict=True)), (served, apart)
    for name in ("task", "general"):
        for who in ("base", label):
            for m in ("exact_match", "f1", "rouge_l"):
                vllm, ref = report["results"][name][who][m], hf[name][who][m]
                assert abs(vllm - ref) <= 2 / 24 + 1e-9, (name, who, m, vllm, ref)
    png = (folder / "eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(folder / "eval.png").shape[0] > 100  # decodes as an image
    assert (folder / "eval.md").read_text().startswith("held-out task set")


@pytest.mark.slow
def test_lorafleet_eval_names_an_adapter_that_is_not_there(gen_run, tmp_path, capsys):
    from cluster.cli.main import main

    cfg, _ = gen_run
    config = tmp_path / "job.json"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert main(["eval", str(config), f"eval.adapters=[{cfg.name}, nope]"]) == 2
    err = capsys.readouterr().err
    assert "eval.adapters: expected a published adapter" in err and "Got 'nope' instead" in err
