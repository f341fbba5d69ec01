"""`lorafleet eval`: the base model and each adapter on a held-out set, before and after, plus a
forgetting check on general text; a table (printed), JSON and a bar chart.

    lorafleet eval configs/demo.yaml
    lorafleet eval configs/demo.yaml eval.adapters='[demo-last, demo-swap]' eval.limit=100

Metrics: loss and perplexity, teacher-forced on the answer tokens (as training counts its loss),
on the base loaded as training saw it (4-bit when `quantization.mode` says so); exact match,
token F1, ROUGE-L and BLEU of greedy answers (`cluster.text.scoring`). Answers for the base and for
LoRA adapters come from vLLM in this process (`LoRARequest` per adapter, as `lorafleet serve`
runs them); adapters vLLM cannot load (prompt/prefix tuning, IA3, DoRA, adapter bias, full
models) answer through PEFT with HF generate, and then so does the base, so every row is
compared on one engine where it can be.

Everything runs in this process, on its GPU when `scaling.use_gpu` and one is here, else on CPU.
Outputs go to `<storage.root>/runs/<name>/eval-<time>/` (eval.json, eval.md, eval.png).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster.errors import ConfigError
from cluster.store import layout, storage, versions
from cluster.text.scoring import score_answers
from train.generation import Prompted, examples_from_sequences, hf_answers

LOSS_METRICS = ("loss", "perplexity")
TEXT_METRICS = ("exact_match", "f1", "rouge_l", "bleu")
METRIC_NAMES = {
    "loss": "loss",
    "perplexity": "perplexity",
    "exact_match": "exact match",
    "f1": "token F1",
    "rouge_l": "ROUGE-L",
    "bleu": "BLEU",
}
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank choices


@dataclass
class EvalSet:
    name: str  # "task" or "general"
    source: str
    items: list[Prompted]

    @property
    def prompted(self) -> list[Prompted]:
        return [e for e in self.items if e.prompt_ids]


@dataclass
class Candidate:
    """The base, or one adapter (or full model) to compare with it."""

    label: str
    uri: str | None = None  # None: the base
    kind: str = "base"  # base | peft | full
    peft_type: str | None = None
    rank: int = 0
    vllm_ok: bool = True
    engine: str = "hf"
    local: str | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------
# What is evaluated


def _guess_format(path: str, fallback: str) -> str:
    from train.data import read_rows

    for _, row, _ in read_rows(path):
        if isinstance(row, dict):
            for key, fmt in (
                ("messages", "chat"),
                ("instruction", "alpaca"),
                ("prompt", "completion"),
            ):
                if key in row:
                    return fmt
            if "text" in row:
                return "text"
        break
    return fallback


def _file_items(cfg, tokenizer, path: str, fmt: str, log) -> list[Prompted]:
    from train.data import build_examples

    data = cfg.data.model_copy(update={"format": fmt, "train_on_prompt": False})
    examples, _ = build_examples(data, tokenizer, path=path, log=log)
    seqs = [{"input_ids": ids, "labels": labels} for ids, labels in examples]
    return examples_from_sequences(seqs, tokenizer.eos_token_id)


def load_sets(cfg, tokenizer, log=print) -> list[EvalSet]:
    """The task's held-out set (eval.path, else data.eval_path, else the rows training split off
    with data.eval_ratio: the same split, so no row trained on is scored) and the general set."""
    from train.data import prepare

    e, limit = cfg.eval, cfg.eval.limit
    path = e.path or cfg.data.eval_path
    if path:
        items = _file_items(cfg, tokenizer, path, _guess_format(path, cfg.data.format), log)
        source = path
    else:
        data = cfg.data.model_copy(update={"packing": False, "train_on_prompt": False})
        held = prepare(data, tokenizer, log=lambda *_: None).eval
        if not held:
            raise ConfigError(
                [
                    "eval.path: no held-out rows: data.eval_ratio is 0 and neither eval.path nor "
                    "data.eval_path is set. Got eval.path=None instead"
                ]
            )
        items = examples_from_sequences(held, tokenizer.eos_token_id)
        source = f"{cfg.data.path} (held out by data.eval_ratio={cfg.data.eval_ratio})"
    sets = [EvalSet("task", source, items[:limit])]
    if e.general_path:
        fmt = _guess_format(e.general_path, "text")
        general = _file_items(cfg, tokenizer, e.general_path, fmt, log)
        sets.append(EvalSet("general", f"{e.general_path} ({fmt} rows)", general[:limit]))
    return sets


def _describe(label: str, uri: str) -> Candidate:
    local = str(storage.local_copy(uri)) if storage.is_remote(uri) else uri
    conf = Path(local, layout.ADAPTER_CONFIG)
    if conf.is_file():
        a = json.loads(conf.read_text())
        peft_type = a.get("peft_type", "LORA")
        # what vLLM loads: plain LoRA weights only (no DoRA magnitudes, biases or saved modules)
        ok = (
            peft_type == "LORA"
            and not a.get("use_dora")
            and a.get("bias", "none") == "none"
            and not a.get("modules_to_save")
        )
        rank = int(a.get("r") or 0)
        return Candidate(label, uri, "peft", peft_type, rank, ok, local=local)
    if Path(local, "config.json").is_file():
        return Candidate(label, uri, "full", None, 0, False, local=local)
    raise ConfigError([f"eval.adapters: {uri} holds no adapter_config.json or config.json"])


def candidates(cfg) -> list[Candidate]:
    """The base, then each of eval.adapters (default: this job's published adapter): a store
    name (its current version), `name@version`, or a folder."""
    from cluster.config.base import name_problem
    from cluster.config.job import FULL_WEIGHTS
    from train.export import full_models_root

    root = layout.adapters_root(cfg.storage.root)
    out, problems = [Candidate("base")], []
    if not cfg.eval.adapters and cfg.adapter.method in FULL_WEIGHTS:
        # a full / partial fine-tune is published as a whole model: its latest version
        models = storage.join(full_models_root(cfg.storage.root), cfg.name, "versions")
        latest = sorted(v for v in storage.listdir(models) if versions.is_version_id(v))
        if not latest:
            raise ConfigError(
                [
                    f"eval.adapters: unset, and {cfg.name} ({cfg.adapter.method}) has no published "
                    f"model in {models} yet; train it first, or name a model folder"
                ]
            )
        return out + [_describe(f"{cfg.name}@{latest[-1]}", storage.join(models, latest[-1]))]
    for entry in cfg.eval.adapters or [cfg.name]:
        if "/" in entry or Path(entry).expanduser().exists():
            out.append(_describe(Path(entry.rstrip("/")).name, storage.absolute(entry)))
            continue
        name, _, version = entry.partition("@")
        bad = name_problem(name) or (
            version and not versions.is_version_id(version) and f"not a version id: {version!r}"
        )
        if bad:
            problems.append(f"eval.adapters: expected NAME or NAME@VERSION. Got {entry!r}: {bad}")
            continue
        version = version or versions.current(root, name)
        if not version or versions.read_meta(root, name, version) is None:
            problems.append(
                f"eval.adapters: expected a published adapter (`lorafleet adapters list --root "
                f"{cfg.storage.root}`) or an adapter folder. Got {entry!r} instead: no such "
                f"{'version' if '@' in entry else 'adapter'} in {root}"
            )
            continue
        out.append(_describe(f"{name}@{version}", versions.version_uri(root, name, version)))
    if problems:
        raise ConfigError(problems)
    return out


# ---------------------------------------------------------------------------------------------
# Loss and HF generation


@torch.no_grad()
def loss_metrics(model, items: list[Prompted], pad_id: int, batch_size: int) -> dict:
    """Mean loss per trained token (teacher-forced), and its perplexity."""
    from train.data import collate

    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    for i in range(0, len(items), batch_size):
        rows = [
            {"input_ids": list(e.ids), "labels": list(e.labels)} for e in items[i : i + batch_size]
        ]
        batch = collate(rows, pad_id)
        batch.pop("num_tokens")
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss_sum += model(**batch, use_cache=False).loss.item() * n
            tokens += n
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


def _attach(base, c: Candidate):
    """The model a candidate runs as: the base itself, the base + its PEFT adapter, or a full
    model of its own."""
    if c.kind == "base":
        return base
    if c.kind == "full":
        from transformers import AutoModelForCausalLM

        device = next(base.parameters()).device
        return AutoModelForCausalLM.from_pretrained(c.local, dtype=torch.float32).to(device)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, c.local)


def _detach(model, base, c: Candidate):
    """The bare base back, for the next candidate (adapter layers taken out again)."""
    if c.kind == "base" or c.kind == "full":
        return base
    if model.active_peft_config.is_prompt_learning:
        return model.base_model
    return model.unload()


def hf_pass(cfg, sets, cands, tokenizer, hf_labels: set[str], max_new_tokens: int, log) -> dict:
    """Loss for every candidate on every set, and HF-generated answers for those in hf_labels:
    {label: {set: {metric: value, "answers": [ids]}}}."""
    from train.model import load_base

    device = "cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu"
    base = load_base(cfg, device).eval()
    pad, eos, bs = tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.eval.batch_size
    out: dict = {}
    for c in cands:
        t0 = time.perf_counter()
        model = _attach(base, c).eval()
        out[c.label] = {}
        for s in sets:
            res = loss_metrics(model, s.items, pad, bs)
            if c.label in hf_labels and s.prompted:
                prompts = [e.prompt_ids for e in s.prompted]
                res["answers"] = hf_answers(
                    model,
                    prompts,
                    pad_id=pad,
                    eos_id=eos,
                    max_new_tokens=max_new_tokens,
                    batch_size=bs,
                )
            out[c.label][s.name] = res
        base = _detach(model, base, c)
        log(
            f"[eval] {c.label}: loss{' and answers' if c.label in hf_labels else ''} in {time.perf_counter() - t0:.1f}s"
        )
    return out


# ---------------------------------------------------------------------------------------------
# vLLM generation


def vllm_answers(cfg, sets, cands, max_new_tokens: int, log) -> dict:
    """Greedy answers from vLLM in this process: the base, and each LoRA adapter through its own
    `LoRARequest`. {label: {set: [ids]}}. On CPU the KV cache is VLLM_CPU_KVCACHE_SPACE GiB (1
    unless set) and vLLM's memory share is left alone (it means CPU memory there)."""
    from train.model import base_path

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    base = base_path(cfg)
    loras = [c for c in cands if c.kind == "peft"]
    longest = max(len(e.prompt_ids) for s in sets for e in s.prompted)
    max_pos = getattr(AutoConfig.from_pretrained(base), "max_position_embeddings", None) or 4096
    rank = max([c.rank for c in loras], default=8)
    if torch.cuda.is_available():  # the HF passes' cached blocks would count against vLLM's share
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    llm = LLM(
        model=base,
        enable_lora=bool(loras),
        max_lora_rank=next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1]),
        max_loras=max(1, len(loras)),
        max_model_len=min(max_pos, longest + max_new_tokens + 8),
        dtype="float32" if on_cpu else "auto",
        enforce_eager=on_cpu,
        seed=0,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    log(f"[eval] vLLM started in {time.perf_counter() - t0:.0f}s")
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    out: dict = {}
    try:
        for i, c in enumerate(cands, 1):
            request = LoRARequest(c.label, i, c.local) if c.kind == "peft" else None
            out[c.label] = {}
            for s in sets:
                prompts = [{"prompt_token_ids": list(e.prompt_ids)} for e in s.prompted]
                if prompts:
                    done = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
                    out[c.label][s.name] = [list(o.outputs[0].token_ids) for o in done]
    finally:
        _shutdown(llm)
    return out


def _shutdown(llm) -> None:
    """Stop vLLM's engine process now rather than at interpreter exit."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # older or newer vLLM: the process goes with ours anyway
        pass


# ---------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate(cfg, log=print) -> dict:
    """Score the base and every adapter on the held-out (and general) set; write the report to
    `<storage.root>/runs/<name>/eval-<time>/`; return it (its `out` says where it went)."""
    from train.model import load_tokenizer, resolve_base
    from train.trainer import absolute_paths

    cfg = absolute_paths(resolve_base(cfg))
    tokenizer = load_tokenizer(cfg)
    cands = candidates(cfg)  # a missing adapter fails before any data is read
    sets = load_sets(cfg, tokenizer, log)
    for s in sets:
        log(f"[eval] {s.name} set: {s.source}: {len(s.items)} rows, {len(s.prompted)} with answers")
    prompted = [e for s in sets for e in s.prompted]
    max_new = cfg.eval.max_new_tokens or max((len(e.answer_ids) for e in prompted), default=0) + 8
    use_vllm = (
        cfg.eval.engine == "auto"
        and prompted
        and any(c.vllm_ok and c.kind == "peft" for c in cands)
    )
    by_vllm = [c for c in cands if use_vllm and c.vllm_ok]
    for c in cands:
        c.engine = "vllm" if c in by_vllm else "hf"
    hf_labels = {c.label for c in cands if c.engine == "hf"} if prompted else set()
    results = hf_pass(cfg, sets, cands, tokenizer, hf_labels, max_new, log)
    if by_vllm:
        for label, per_set in vllm_answers(cfg, sets, by_vllm, max_new, log).items():
            for name, answers in per_set.items():
                results[label][name]["answers"] = answers
    report = build_report(cfg, sets, cands, results, tokenizer)
    report["out"] = write_outputs(cfg, report)
    log(render(report))
    log(f"[eval] written to {report['out']} (eval.json, eval.md, eval.png)")
    return report


def build_report(cfg, sets, cands, results, tokenizer) -> dict:
    """Per set and candidate, every metric (answers decoded and scored); per adapter, its change
    against the base on the general set (the forgetting check)."""
    eos = tokenizer.eos_token_id

    def text(ids):
        return tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True)

    table: dict = {}
    for s in sets:
        table[s.name] = {}
        expected = [text(e.answer_ids) for e in s.prompted]
        for c in cands:
            res = dict(results[c.label][s.name])
            answers = res.pop("answers", None)
            if answers is not None:
                said = [text(a) for a in answers]
                res |= score_answers(said, expected)
                res["examples"] = [
                    {"prompt": text(e.prompt_ids), "expected": x, "answer": a}
                    for e, x, a in list(zip(s.prompted, expected, said, strict=True))[:3]
                ]
            table[s.name][c.label] = res
    report = {
        "name": cfg.name,
        "base": cfg.model.base,
        "sets": {
            s.name: {"source": s.source, "rows": len(s.items), "answered": len(s.prompted)}
            for s in sets
        },
        "models": [
            {
                "label": c.label,
                "uri": c.uri,
                "kind": c.kind,
                "peft_type": c.peft_type,
                "engine": c.engine,
            }
            for c in cands
        ],
        "results": table,
    }
    if "general" in table:
        base = table["general"]["base"]
        report["forgetting"] = {
            label: {
                m: row[m] - base[m]
                for m in (*LOSS_METRICS, *TEXT_METRICS)
                if m in row and m in base
            }
            for label, row in table["general"].items()
            if label != "base"
        }
    return report


# ---------------------------------------------------------------------------------------------
# Outputs


def _cell(metric: str, value: float) -> str:
    if metric == "exact_match":
        return f"{value:.1%}"
    if metric == "bleu":
        return f"{value:.1f}"
    if metric == "perplexity":
        return f"{value:.2f}"
    return f"{value:.3f}"


def _delta(metric: str, value: float) -> str:
    if metric == "exact_match":
        return f"{value * 100:+.1f} pts"
    return f"{value:+.1f}" if metric in ("bleu", "perplexity") else f"{value:+.3f}"


def render(report: dict) -> str:
    """The before/after tables, markdown: one per set, one row per model, every metric; on the
    general set each adapter's change against the base in brackets."""
    lines = []
    engines = {m["label"]: m["engine"] for m in report["models"]}
    for name, rows in report["results"].items():
        info = report["sets"][name]
        title = "held-out task set" if name == "task" else "forgetting check, general set"
        lines += [
            "",
            f"{title}: {info['source']}: {info['rows']} rows, {info['answered']} answered",
        ]
        metrics = [m for m in (*LOSS_METRICS, *TEXT_METRICS) if any(m in r for r in rows.values())]
        lines.append(
            "| model | answers by | " + " | ".join(METRIC_NAMES[m] for m in metrics) + " |"
        )
        lines.append("|---" * (len(metrics) + 2) + "|")
        for label, row in rows.items():
            delta = report.get("forgetting", {}).get(label, {}) if name == "general" else {}
            cells = [
                _cell(m, row[m]) + (f" ({_delta(m, delta[m])})" if m in delta else "")
                for m in metrics
            ]
            lines.append(f"| {label} | {engines[label]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    """One bar group per metric, one bar per model; a row of panels per set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(report["results"])
    metrics = [
        m
        for m in (*LOSS_METRICS, *TEXT_METRICS)
        if any(m in r for s in sets for r in report["results"][s].values())
    ]
    labels = [m["label"] for m in report["models"]]
    fig, axes = plt.subplots(
        len(sets), len(metrics), figsize=(2.6 * len(metrics), 2.8 * len(sets)), squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(sets):
        for j, m in enumerate(metrics):
            ax = axes[i][j]
            values = [report["results"][s][label].get(m, float("nan")) for label in labels]
            ax.bar(
                range(len(labels)),
                values,
                color=[colors[k % len(colors)] for k in range(len(labels))],
            )
            ax.set_xticks(
                range(len(labels)),
                [label.split("@")[0] for label in labels],
                rotation=30,
                fontsize=7,
            )
            ax.set_title(f"{s}: {METRIC_NAMES[m]}", fontsize=9)
    fig.suptitle(f"lorafleet eval: {report['name']} (base vs adapters)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(cfg, report: dict) -> str:
    """eval.json, eval.md and eval.png into `<storage.root>/runs/<name>/eval-<time>/`."""
    out = storage.join(
        layout.runs_root(cfg.storage.root), cfg.name, time.strftime("eval-%Y%m%d-%H%M%S")
    )
    with tempfile.TemporaryDirectory(prefix="lorafleet-eval-") as tmp:
        os.chmod(tmp, 0o755)  # the folder is copied with its mode: readable like a run's
        Path(tmp, "eval.json").write_text(json.dumps(report | {"out": out}, indent=2))
        Path(tmp, "eval.md").write_text(render(report).lstrip() + "\n")
        chart(report, Path(tmp, "eval.png"))
        storage.upload_dir(tmp, out)
    return out
