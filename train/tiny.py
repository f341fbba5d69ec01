"""A tiny Llama-shaped base model and byte-level tokenizer, built locally with no download.

    python -m train.tiny lorafleet-runs/models/demo          # build (and pretrain) one by hand

`model.base: tiny://<name>` in a config resolves here: the model is built once under
`<storage.root>/models/<name>/` in the same Hugging Face format that `from_pretrained` reads
from the hub, so every later step (4-bit loading, PEFT, vLLM) runs the real loading code.

A random base is too weak for LoRA to learn much in a demo's time, so the base gets a short
full-parameter pretraining on a "copy" task written in the same prompt format as the demo tasks
(both in `train.tasks`): it learns the format and to copy, and the adapters learn to transform.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from cluster.errors import ModelError
from cluster.store.layout import TINY_MARKER, TINY_SCHEME
from train.chat_template import CHAT_TEMPLATE
from train.tasks import PRETRAIN_TASKS, TASKS, make_rows, render_completion

# Byte-level vocabulary: 256 bytes (GPT-2's printable mapping) + 3 specials. Every string
# tokenizes, one token per byte, so the demo tasks are character-level.
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]
TINY_SHAPES = {
    # name: (layers, width, heads, intermediate, max_positions)
    "demo": (4, 128, 4, 384, 512),
    # head_dim 32, as the demo model's: a size vLLM's CPU attention supports
    "test": (2, 64, 2, 128, 256),
}


def _bytes_to_unicode() -> dict[int, str]:
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for b in range(256):
        vocab[byte_chars[b]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    # BOS first, as Llama tokenizers do: servers (vLLM's /v1/completions) encode with special
    # tokens and must see the sequence start that training put there
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        model_max_length=TINY_SHAPES["demo"][4],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(shape: str = "demo", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, width, heads, inter, max_pos = TINY_SHAPES[shape]
    cfg = LlamaConfig(
        vocab_size=256 + len(SPECIALS),
        hidden_size=width,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_pos,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    return model


def pretrain(
    model, tokenizer, steps: int, seed: int = 0, batch_size: int = 32, log=print
) -> list[float]:
    """Full fine-tuning of the tiny base on the tasks' prompt format with the identity task."""
    import random

    per_task = steps * batch_size // len(PRETRAIN_TASKS) + 1
    rng_rows = [r for t in PRETRAIN_TASKS for r in make_rows(TASKS[t], per_task, seed=seed + 1)]
    random.Random(seed).shuffle(rng_rows)
    texts = [render_completion(r) for r in rng_rows]
    prompt_lens = [
        len(tokenizer(r["prompt"], add_special_tokens=False).input_ids) for r in rng_rows
    ]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps)
    )
    losses = []
    t0 = time.time()
    for step in range(steps):
        batch = texts[step * batch_size : (step + 1) * batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = torch.cat([torch.full((len(batch), 1), tokenizer.bos_token_id), enc.input_ids], 1)
        att = torch.cat(
            [torch.ones(len(batch), 1, dtype=enc.attention_mask.dtype), enc.attention_mask], 1
        )
        labels = ids.masked_fill(att == 0, -100)
        for row, n_prompt in enumerate(prompt_lens[step * batch_size : (step + 1) * batch_size]):
            labels[row, : 1 + n_prompt] = -100  # the prompt is random letters: nothing to learn
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            log(
                f"[pretrain] step {step + 1}/{steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f} ({time.time() - t0:.0f}s)"
            )
    model.eval()
    return losses


def ensure_tiny_base(
    name: str, out_dir: str | Path, pretrain_steps: int | None = None, log=print
) -> Path:
    """Build `tiny://<name>` into out_dir once; later calls reuse it. Returns the directory."""
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / TINY_MARKER).is_file():
        return out
    shape = name if name in TINY_SHAPES else None
    if shape is None:
        known = ", ".join(TINY_SCHEME + n for n in sorted(TINY_SHAPES))
        raise ModelError(f"model.base: unknown tiny model '{TINY_SCHEME}{name}'; expected {known}")
    if pretrain_steps is None:
        pretrain_steps = int(
            os.environ.get("LORAFLEET_TINY_PRETRAIN_STEPS", 500 if shape == "demo" else 0)
        )
    log(f"building tiny://{name} locally in {out} ({pretrain_steps} pretraining steps)")
    t0 = time.time()
    tokenizer = build_tokenizer()
    model = build_model(shape)
    if pretrain_steps:
        pretrain(model, tokenizer, pretrain_steps, log=log)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / TINY_MARKER).write_text(json.dumps({"shape": shape, "pretrain_steps": pretrain_steps}))
    try:
        tmp.rename(out)
    except OSError:  # another process built it first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built tiny://{name} in {time.time() - t0:.0f}s")
    return out


if __name__ == "__main__":
    import sys

    ensure_tiny_base("demo", sys.argv[1] if len(sys.argv) > 1 else "lorafleet-runs/models/demo")
