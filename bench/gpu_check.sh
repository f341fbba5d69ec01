#!/usr/bin/env bash
# The GPU lane, on a GPU node with lorafleet and its `gpu` extra installed (the cluster image,
# cluster/Dockerfile, has both): the `gpu` tests (bf16 autocast, paged AdamW 8-bit, NCCL DDP on
# one GPU, 4-bit on CUDA, vLLM on GPU), then QLoRA tokens/s on a 1B-shaped model against a plain
# transformers+PEFT loop. Under 5 minutes on one GPU; each half has its own time limit.
#
#   bash bench/gpu_check.sh            # PY=/path/to/python to pick the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA GPU here; run this on a GPU node" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch, bitsandbytes, peft, transformers, ray; print("torch", torch.__version__, "cuda", torch.version.cuda, "| bitsandbytes", bitsandbytes.__version__, "| peft", peft.__version__, "| transformers", transformers.__version__, "| ray", ray.__version__)'

timeout 180 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
tests=$?
timeout 110 "$PY" -m bench.gpu_qlora
bench=$?
echo "gpu_check: tests exit $tests, bench exit $bench"
exit $((tests || bench))
