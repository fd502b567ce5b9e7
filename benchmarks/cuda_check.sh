#!/usr/bin/env bash
# The GPU checks for a lent machine, sized for one 10-minute device command (a session has 15 minutes of device
# time, the machine's start included: give the call timeout_s 600). From the repository root on the GPU machine:
#   OUT=results-dir bash benchmarks/cuda_check.sh          # all of it inside BUDGET seconds (default 570)
#   OUT=results-dir bash benchmarks/cuda_check.sh tests    # the CUDA tests alone (cuda-tests.log)
#   OUT=results-dir bash benchmarks/cuda_check.sh bench    # the benchmark alone in BUDGET s (generate-cuda.json, .log)
# All of it: the CUDA tests that compile nothing (the GPU-vs-CPU parity tests among them), then
# benchmarks/generate.py --device cuda, the runs the goals rest on first and each run cut off at the budget (the JSON
# is rewritten after every run and lists those left out), then the tests of the compiled step in the time left.
set -o pipefail
part=${1:-all}
case $part in tests | bench | all) ;; *) echo "usage: $0 [all|tests|bench]" >&2; exit 2 ;; esac
out=${OUT:-benchmarks/results}
budget=${BUDGET:-570}
compiled_tests_s=100  # what "all" keeps back for the compiled-step tests (three compiles of a tiny model)
mkdir -p "$out"
export PYTHONPATH=$PWD:$PWD/tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
left() { echo $((budget - SECONDS)); }
cuda_tests() {  # $1: seconds, $2: pytest -k expression, $3: log file
    echo "== tests/test_cuda.py -k '$2' (at most $1 s)"
    timeout "$1" python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider -k "$2" 2>&1 | tee "$out/$3" | tail -15
}
case $part in
    tests) cuda_tests 300 "" cuda-tests.log; exit ;;
    all) cuda_tests 150 "not compiled" cuda-tests.log; tests_status=$? ;;
esac
# The runs the goals rest on first: 256M carries the batch-1 and batch-32 goals, 2.2B the roofline goal (ours-compiled,
# with cuBLAS projections, came closest to it before the projection kernels); then the rest of the comparison
# (transformers at every shape, its compiled path at 256M), then ours-attention-kernel: ours-kernel without the
# batch-1 projection kernels (decode_linear.py), to show what they gain.
deadline=$(left)
[ "$part" = all ] && deadline=$((deadline - compiled_tests_s))
echo "== benchmarks/generate.py --device cuda (deadline ${deadline} s)"
python3 benchmarks/generate.py --device cuda --runs 256M:transformers 256M:ours-kernel 256M:ours-compiled-kernel \
    2.2B:ours-kernel 2.2B:ours-compiled-kernel 2.2B:ours-compiled 2.2B:transformers 500M:transformers 500M:ours-kernel \
    256M:transformers-compiled 2.2B:ours-attention-kernel 256M:ours-attention-kernel \
    --worker-timeout 150 --deadline "$deadline" --out "$out/generate-cuda.json" 2>&1 | tee "$out/generate-cuda.log" \
    | cut -c1-400
status=$((${tests_status:-0} || $?))  # non-zero if the tests or the benchmark failed
if [ "$part" = all ] && [ "$(left)" -gt 20 ]; then
    cuda_tests "$(left)" "compiled" cuda-tests-compiled.log || status=1
fi
exit $status
