#!/usr/bin/env bash
# Check and benchmark fedsim's DoRA layer on one CUDA GPU, in under 5 minutes.
#
# 1. The gpu-marked kernel tests: the Triton epilogues against the PyTorch path in float32, float16
#    and bfloat16 on CUDA (bfloat16 within one unit in the last place), and the full layer.
# 2. The layer benchmark (benchmarks/dora_layer.py) in bfloat16 at d = 4096, r in {16, 384},
#    tokens in {1, 2048, 8192}: fedsim fused (Triton), fedsim with PyTorch epilogues, fedsim with the
#    dense norm, PEFT DoRA and PEFT LoRA.
#
# Usage: benchmarks/dora_gpu.sh [RESULTS_DIR]   (default: $OUT if set, else benchmarks/results)
# Writes RESULTS_DIR/dora_gpu_tests.txt and RESULTS_DIR/dora_layer_cuda.json; exits non-zero if a
# step fails or times out.

set -euo pipefail

cd "$(dirname "$0")/.."
results_dir="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$results_dir"

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to torch; this script needs one GPU" >&2
    exit 2
fi
python -c "import triton" || { echo "error: triton is not installed (pip install -e '.[gpu]')" >&2; exit 2; }
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

status=0

echo "== DoRA kernel tests on CUDA"
timeout 120 python -m pytest -q -m gpu -rs tests/test_dora_kernels.py 2>&1 | tee "$results_dir/dora_gpu_tests.txt" || status=1

echo "== DoRA layer benchmark on CUDA"
timeout 150 python benchmarks/dora_layer.py --device cuda --ranks 16 384 --tokens 1 2048 8192 \
    --repeats 20 --json "$results_dir/dora_layer_cuda.json" || status=1

exit "$status"
