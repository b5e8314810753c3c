#!/usr/bin/env bash
# On a CUDA machine: build holokv in place against the local torch, run the whole
# test suite with its CUDA tests, compute-sanitizer memcheck over the CUDA tests,
# and the benchmarks (holokv bench decode, src, stream and e2e). Usage: gpu_check.sh [OUT_DIR
# [TEST_PATH...]]; logs and results go to OUT_DIR (default bench/results).
set -uo pipefail
out=$(realpath -m "${1:-bench/results}")
shift || true
tests=("${@:-tests}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
# The system compiler, whose libstdc++ python and torch load: a toolchain named
# by CC/CXX may link its own static libstdc++ into _C, which then crashes.
unset CC CXX
python3 -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -20 || exit 1
python3 -c "import holokv, json; print(json.dumps(holokv.build_info()))"
status=0
python3 -m pytest -q -ra "${tests[@]}" 2>&1 | tee "$out/pytest_gpu.log" | tail -25 || status=1
# memcheck over every CUDA test (about 7 minutes on an H100: the sanitizer slows kernels ~100x; a tenth of
# the fuzz examples)
HOLOKV_FUZZ_SCALE=0.1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
  python3 -m pytest -q "${tests[@]}" -k cuda 2>&1 | tee "$out/memcheck.log" | tail -6 || status=1
python3 -m holokv.cli bench decode --out "$out" 2>&1 | tee "$out/decode_bench.log" || status=1
python3 -m holokv.cli bench src --out "$out" 2>&1 | tee "$out/src_linalg_bench.log" || status=1
python3 -m holokv.cli bench stream --out "$out" 2>&1 | tee "$out/src_stream_bench.log" || status=1
# the runtime issue's table: B=16/N=16K and B=1/N=32K in one run (several minutes: each run builds the model)
python3 -m holokv.cli bench e2e --batch 16 1 --context 16384 32768 --out "$out" 2>&1 | tee "$out/e2e_bench.log" \
  || status=1
exit $status
