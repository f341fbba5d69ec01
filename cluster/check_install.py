"""Import every package of the stack once, so a broken install fails at setup, not mid-run.

python -m cluster.check_install
"""

import importlib
import sys

PACKAGES = [
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "datasets",
    "safetensors",
    "pydantic",
    "ray",
    "ray.train",
    "ray.tune",
    "ray.serve",
    "deepspeed",
    "vllm",
    "ray.serve.llm",
]


def main() -> int:
    failed = []
    for name in PACKAGES:
        try:
            mod = importlib.import_module(name)
            print(f"  ok  {name} {getattr(mod, '__version__', '')}")
        except Exception as e:  # report every broken import, not just the first
            failed.append(name)
            print(f"  FAILED  {name}: {type(e).__name__}: {e}")
    if failed:
        print(f"setup is broken: {failed} do not import", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
