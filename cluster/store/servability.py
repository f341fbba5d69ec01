"""What vLLM can serve as a LoRA adapter, read from PEFT's adapter_config.json: one rule for
training's warning (`lorafleet train` / `tune`, at config time) and serving's refusal
(`lorafleet serve` at start, and the ingress when an adapter is published into a running app).

vLLM 0.32 (vllm/lora/peft_helper.py) loads LoRA adapters only, and refuses DoRA, adapter bias
and `modules_to_save`; other PEFT methods (AdaLoRA, (IA)^3, prompt/prefix/P-tuning) are not
LoRA weights at all. `lorafleet merge` folds a mergeable adapter into a full model, which vLLM
serves as a base.
"""

from __future__ import annotations

MERGE_HINT = (
    "merge it into a full model with `lorafleet merge <adapter> --out <dir>` and serve that "
    "directory as a model's base"
)
# PEFT's names (adapter_config.json peft_type) of the methods `lorafleet merge` can fold in
MERGEABLE = ("LORA", "ADALORA", "IA3")


def vllm_problems(adapter_config: dict) -> list[str]:
    """Why vLLM cannot serve the adapter whose adapter_config.json is `adapter_config`, one
    reason each; [] when it can."""
    # vLLM reads any adapter_config.json as LoRA's: a config without peft_type is taken as one
    peft_type = str(adapter_config.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        return [f"it is a {peft_type} adapter (peft_type), and vLLM serves only LoRA adapters"]
    problems = []
    if adapter_config.get("use_dora"):
        problems.append("it is a DoRA adapter (use_dora: true), which vLLM does not support")
    bias = adapter_config.get("bias") or "none"
    if bias != "none" or adapter_config.get("lora_bias"):
        problems.append(f"it trains biases (bias: {bias!r}), which vLLM does not support")
    # vLLM loads a saved classifier or score head, no other module
    saved = [
        m for m in adapter_config.get("modules_to_save") or [] if m not in ("classifier", "score")
    ]
    if saved:
        problems.append(
            f"it saves whole modules ({saved}, modules_to_save), which vLLM does not load"
        )
    return problems


def config_problems(cfg) -> list[str]:
    """vllm_problems for the adapter a JobConfig will produce; [] for full and partial
    fine-tunes, which publish a whole model (served as a base)."""
    a = cfg.adapter
    if a.method in ("full", "partial"):
        return []
    if a.method != "lora":
        return [f"adapter.method is {a.method!r}, and vLLM serves only LoRA adapters"]
    return vllm_problems({"peft_type": "LORA", "use_dora": a.use_dora, "bias": a.bias})


def config_warning(cfg) -> str | None:
    """The line `lorafleet train` / `tune` prints before training an adapter vLLM cannot serve."""
    problems = config_problems(cfg)
    if not problems:
        return None
    how = MERGE_HINT
    if cfg.adapter.method not in ("lora", "adalora", "ia3"):
        how = "serve it with PEFT (HF generate) instead: it cannot be merged into the weights"
    return (
        f"warning: `lorafleet serve` (vLLM) will not serve adapter {cfg.name!r}: "
        + "; ".join(problems)
        + f". To serve it, {how}"
    )


def refusal(name: str, version: str, problems: list[str], mergeable: bool = True) -> str:
    """The message serving gives for an adapter vLLM cannot serve."""
    how = MERGE_HINT if mergeable else "it cannot be merged: serve it with PEFT instead"
    return (
        f"adapter {name!r} (version {version}) cannot be served by vLLM: "
        + "; ".join(problems)
        + f". To serve it, {how}"
    )
