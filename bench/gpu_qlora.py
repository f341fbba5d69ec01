"""QLoRA tokens/s on one GPU: `lorafleet train` (one Ray Train worker, NF4 base, bf16) against a
plain transformers+PEFT+bitsandbytes loop on the same 1B-shaped model, data, batch and steps,
measured side by side in this one run. Prints the ratio (target >= 0.95). Run by
bench/gpu_check.sh; needs CUDA.

The model has Llama-3.2-1B's shape (16 layers, width 2048, 32 heads, 8 KV heads, MLP 8192) with
random weights, built locally: nothing is downloaded. Its vocabulary is the tiny byte-level one,
so the embedding is small and the time goes where a real 1B model spends it, in the blocks.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import STEPS  # noqa: E402
from bench.run import plain_loop_tokens_per_s  # noqa: E402

SHAPE_1B = {"layers": 16, "width": 2048, "heads": 32, "kv_heads": 8, "mlp": 8192}


def build_1b(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.tiny import SPECIALS, build_tokenizer

    s = SHAPE_1B
    config = LlamaConfig(
        vocab_size=256 + len(SPECIALS),
        hidden_size=s["width"],
        intermediate_size=s["mlp"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer().save_pretrained(out)
    print(f"gpu_qlora: built a {n / 1e9:.2f}B-parameter model in {out}")
    return out


def gpu_cfg(tmp: Path):
    from cluster.config.load import load_config
    from cluster.config.validation import with_overrides
    from train.demo import write_task_data

    data = write_task_data("last", tmp / "data")
    return with_overrides(
        load_config(ROOT / "configs" / "demo.yaml"),
        {
            "name": "gpu-bench",
            "model.base": str(build_1b(tmp / "model")),
            "data.path": str(data["train"]),
            "data.max_length": 512,
            "data.packing": True,
            "quantization.compute_dtype": "bfloat16",
            "training.precision": "bf16",
            "training.batch_size": 8,
            "training.max_steps": STEPS,
            "training.eval_every_steps": STEPS,
            "training.log_every_steps": 10,
            "training.eval_max_batches": 1,
            "scaling.num_workers": 1,
            "scaling.use_gpu": True,
            "storage.root": str(tmp / "store"),
        },
    )


def main() -> int:
    from train.trainer import train

    if not torch.cuda.is_available():
        print("gpu_qlora: no CUDA GPU here; run it on a GPU node")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        cfg = gpu_cfg(Path(tmp))
        summary = train(cfg, log=lambda *_: None)
        # the first report window holds CUDA's warm-up; the plain loop skips its first 10 steps
        ours = statistics.mean(
            h["tokens_per_s"] for h in summary["history"] if "tokens_per_s" in h and h["step"] > 10
        )
        plain = plain_loop_tokens_per_s(cfg, device="cuda")
    print(
        f"gpu_qlora: lorafleet train {ours:,.0f} tok/s vs plain transformers+PEFT loop "
        f"{plain:,.0f} tok/s on {torch.cuda.get_device_name()} -> ratio {ours / plain:.3f} "
        "(target >= 0.95)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
