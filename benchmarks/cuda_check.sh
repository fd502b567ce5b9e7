#!/usr/bin/env bash
# The GPU checks of one lent-machine call (~9.5 minutes on an H200, inside one 10-minute command): the CUDA tests,
# then benchmarks/generate.py --device cuda on every shape, most important runs first, so that a run cut short
# keeps them (the JSON is rewritten after every run). Run from the repository root on the GPU machine:
#   OUT=results-dir bash benchmarks/cuda_check.sh        # writes cuda-tests.log, generate-cuda.json, .log there
set -o pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD:$PWD/tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout 150 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tee "$out/cuda-tests.log" | tail -15
# 256M and 2.2B carry the goals. At 2.2B ours-attention-kernel (cuBLAS projections) measures decode_linear.py's
# kernels in the same run, and ours-compiled (no Triton kernels) is the path that came closest to the roofline goal
# before them. transformers' compiled path (in no goal) runs last.
python3 benchmarks/generate.py --device cuda --shapes 256M 2.2B 500M --kernel-shapes 256M 2.2B 500M \
  --impls transformers ours-kernel ours-attention-kernel ours-compiled-kernel ours-compiled transformers-compiled \
  --skip 256M:ours-attention-kernel 256M:ours-compiled 500M:ours-attention-kernel --worker-timeout 150 \
  --out "$out/generate-cuda.json" 2>&1 | tee "$out/generate-cuda.log" | cut -c1-400
