"""Greedy answers from real vLLM for the base and with a LoRA adapter (`LoRARequest`).

    python tests/helpers/vllm_lora.py BASE_DIR ADAPTER_DIR PROMPTS_JSON [ENGINE_JSON]
        -> one JSON line: {"base": [...], "lora": [...]}

ADAPTER_DIR `-`: the base alone (a whole fine-tuned model served as a base), "lora" is [].

ENGINE_JSON: engine arguments over the defaults below (a quantization, tensor_parallel_size).

Runs in its own process: vLLM's engine starts worker processes and must own its main module.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def main(base: str, adapter: str, prompts_path: str, engine_json: str = "{}") -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    prompts = json.loads(open(prompts_path).read())
    engine = {
        "enable_lora": True,
        "max_lora_rank": 16,
        "max_loras": 1,
        "max_model_len": 256,
        "dtype": "float32",
        "enforce_eager": True,
        "seed": 0,
    }
    llm = LLM(model=base, **(engine | json.loads(engine_json)))
    params = SamplingParams(temperature=0.0, max_tokens=32)
    base_out = [o.outputs[0].text for o in llm.generate(prompts, params)]
    lora_out = [
        o.outputs[0].text
        for o in (
            llm.generate(prompts, params, lora_request=LoRARequest("a", 1, adapter))
            if adapter != "-"
            else []
        )
    ]
    print(json.dumps({"base": base_out, "lora": lora_out}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
