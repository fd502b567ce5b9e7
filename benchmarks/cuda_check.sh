#!/usr/bin/env bash
# The GPU checks for a lent machine, in two parts that each fit one 10-minute command (run them back to back, so
# the machine stays warm): the CUDA tests (~1 minute), then benchmarks/generate.py --device cuda on every shape
# (~9 minutes on an H200), most important runs first, so that a run cut short keeps them (the JSON is rewritten
# after every run). From the repository root on the GPU machine:
#   OUT=results-dir bash benchmarks/cuda_check.sh tests    # cuda-tests.log
#   OUT=results-dir bash benchmarks/cuda_check.sh bench    # generate-cuda.json and generate-cuda.log
#   OUT=results-dir bash benchmarks/cuda_check.sh          # both, one after the other
set -o pipefail
part=${1:-all}
case $part in tests | bench | all) ;; *) echo "usage: $0 [tests|bench|all]" >&2; exit 2 ;; esac
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD:$PWD/tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
if [ "$part" != bench ]; then
    timeout 300 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tee "$out/cuda-tests.log" | tail -15
fi
if [ "$part" != tests ]; then
    # 256M and 2.2B carry the goals. At 2.2B ours-attention-kernel (cuBLAS projections) measures decode_linear.py's
    # kernels in the same run, and ours-compiled (no Triton kernels) is the path that came closest to the roofline
    # goal before them. transformers' compiled path (in no goal) runs last.
    python3 benchmarks/generate.py --device cuda --shapes 256M 2.2B 500M --kernel-shapes 256M 2.2B 500M \
        --impls transformers ours-kernel ours-attention-kernel ours-compiled-kernel ours-compiled \
        transformers-compiled --skip 256M:ours-attention-kernel 256M:ours-compiled 500M:ours-attention-kernel \
        --worker-timeout 150 --out "$out/generate-cuda.json" 2>&1 | tee "$out/generate-cuda.log" | cut -c1-400
fi
