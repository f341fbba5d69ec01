"""Several task adapters on one base, mixed in one batch: every row names its own adapter.

    .venv/bin/python -m train.multitask lorafleet-runs demo-last='last: cat dog emu' demo-swap='swap: cat dog'

    from train.multitask import load_adapters, generate_mixed
    mt = load_adapters("lorafleet-runs", ["demo-last", "demo-swap"])
    generate_mixed(mt, [("demo-last", "last: cat dog\\n"), ("demo-swap", "swap: cat dog\\n")])

The base is loaded once, as the adapters were trained against it (4-bit when training was), and
every adapter is loaded beside it under its own name (`PeftModel.from_pretrained` for the first,
`load_adapter` for the rest). One `generate` call then runs the whole batch, left-padded, with
PEFT's per-row `adapter_names`: each LoRA layer adds, to each row, only that row's adapter
(peft/tuners/lora/layer.py `_mixed_batch_forward`). A row whose adapter is None (or `__base__`)
runs the base alone. Greedy decoding; prompts are tokenized as training tokenized completion
rows (BOS + the prompt text).

PEFT mixes LoRA-family adapters only, and not DoRA (`_check_forward_args`): other methods, or
adapters of another base, are refused when they are loaded, with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster.errors import LorafleetError
from cluster.store import layout, storage, versions

BASE = "__base__"  # PEFT's name for rows that run the base alone


class MultiTaskError(LorafleetError):
    """Adapters that cannot share one batch: unknown, another base, or a method PEFT cannot mix."""


@dataclass
class MultiTask:
    """The base with every named adapter loaded beside it."""

    model: object  # peft.PeftModel
    tokenizer: object
    adapters: dict[str, str] = field(default_factory=dict)  # name -> the version folder loaded


def adapter_dir(storage_root: str, name: str) -> str:
    """`name` (its current version) or `name@version` -> the version's local folder."""
    root = layout.adapters_root(storage_root)
    bare, _, version = name.partition("@")
    version = version or versions.current(root, bare)
    if not version or versions.read_meta(root, bare, version) is None:
        known = ", ".join(versions.names(root)) or "none"
        raise MultiTaskError(
            f"adapter {name!r}: no complete version in {root} (adapters there: {known})"
        )
    uri = versions.version_uri(root, bare, version)
    return str(storage.local_copy(uri)) if storage.is_remote(uri) else uri


def _check_mixable(name: str, folder: str) -> dict:
    """The adapter's lorafleet.json, after checking PEFT can mix it per row."""
    peft_cfg = json.loads(Path(folder, layout.ADAPTER_CONFIG).read_text())
    kind = peft_cfg.get("peft_type")
    if kind != "LORA" or peft_cfg.get("use_dora"):
        what = "DoRA" if kind == "LORA" else kind
        raise MultiTaskError(
            f"adapter {name!r} is {what}: PEFT mixes LoRA adapters per row in one batch, "
            "not DoRA or other methods; generate with it alone"
        )
    return json.loads(Path(folder, layout.ADAPTER_META).read_text())


def load_adapters(storage_root: str, names: list[str], device: str = "cpu") -> MultiTask:
    """The base of the named adapters (all must share it), with each adapter loaded by name."""
    if not names:
        raise MultiTaskError("load_adapters: expected at least one adapter name. Got [] instead")
    folders = {n: adapter_dir(storage_root, n) for n in names}
    metas = {n: _check_mixable(n, f) for n, f in folders.items()}
    first = names[0]
    prints = {n: m.get("base_fingerprint") for n, m in metas.items()}
    other = [n for n in names if prints[n] != prints[first]]
    if other:
        raise MultiTaskError(
            f"adapters {first!r} and {other[0]!r} were trained on different bases "
            f"({metas[first]['base_model']} vs {metas[other[0]]['base_model']}); one batch shares one base"
        )
    from peft import PeftModel  # here: the checks above refuse a batch before any model loads

    from cluster.config.job import JobConfig
    from train.model import load_base, load_tokenizer

    cfg = JobConfig.model_validate(metas[first]["config"])
    model = PeftModel.from_pretrained(
        load_base(cfg, device), folders[first], adapter_name=first, is_trainable=False
    )
    for n in names[1:]:
        model.load_adapter(folders[n], adapter_name=n, is_trainable=False)
    tok = load_tokenizer(cfg)
    tok.padding_side = "left"  # generation continues every row from its own last token
    return MultiTask(model.eval(), tok, folders)


@torch.no_grad()
def generate_mixed(
    mt: MultiTask, rows: list[tuple[str | None, str]], max_new_tokens: int = 32
) -> list[dict]:
    """Greedy answers for (adapter name, prompt) rows, in one batched `generate` call.
    Returns per row: adapter, prompt, text (special tokens dropped), token_ids (new tokens)."""
    unknown = sorted({a for a, _ in rows if a not in (None, BASE) and a not in mt.adapters})
    if unknown:
        raise MultiTaskError(
            f"rows name adapters {unknown} that are not loaded; loaded: {sorted(mt.adapters)}"
        )
    if not rows:
        return []
    names = [a or BASE for a, _ in rows]
    new = _generate(mt, [p for _, p in rows], max_new_tokens, adapter_names=names)
    return _answers(mt, rows, new)


@torch.no_grad()
def generate_alone(
    mt: MultiTask, adapter: str | None, prompts: list[str], max_new_tokens: int = 32
) -> list[dict]:
    """The same answers through PEFT's ordinary single-adapter path (the adapter made active,
    no per-row names; None: the base, adapters disabled): what a mixed batch must reproduce."""
    if adapter is None:
        with mt.model.disable_adapter():
            new = _generate(mt, prompts, max_new_tokens)
    else:
        mt.model.set_adapter(adapter)
        new = _generate(mt, prompts, max_new_tokens)
    return _answers(mt, [(adapter, p) for p in prompts], new)


def _generate(mt: MultiTask, prompts: list[str], max_new_tokens: int, **kw) -> torch.Tensor:
    """The new tokens of one batched greedy `generate` (BOS + prompt, left-padded)."""
    tok, model = mt.tokenizer, mt.model
    enc = tok(
        [(tok.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    ).to(next(model.parameters()).device)
    out = model.generate(
        **enc,
        **kw,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return out[:, enc["input_ids"].shape[1] :]


def _answers(mt: MultiTask, rows, new: torch.Tensor) -> list[dict]:
    tok = mt.tokenizer
    answers = []
    for (adapter, prompt), ids in zip(rows, new.tolist(), strict=True):
        ids = _until_eos(ids, tok.eos_token_id, tok.pad_token_id)
        text = tok.decode(ids, skip_special_tokens=True)
        answers.append({"adapter": adapter, "prompt": prompt, "text": text, "token_ids": ids})
    return answers


def _until_eos(ids: list[int], eos: int | None, pad: int | None) -> list[int]:
    """A row's new tokens up to its end: generate pads a row that finished before the others."""
    for i, t in enumerate(ids):
        if t == eos:
            return ids[: i + 1]
        if t == pad and pad != eos:
            return ids[:i]
    return ids


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("storage_root", help="storage.root of the adapter store")
    ap.add_argument("rows", nargs="+", help="ADAPTER=PROMPT (a newline is added to the prompt)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    rows = [
        (a or None, p.replace("\\n", "\n") + "\n")
        for a, _, p in (r.partition("=") for r in args.rows)
    ]
    names = list(dict.fromkeys(a for a, _ in rows if a))
    mt = load_adapters(args.storage_root, names)
    for r in generate_mixed(mt, rows, args.max_new_tokens):
        print(f"{r['adapter'] or BASE}\t{r['prompt'].strip()!r} -> {r['text']!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
