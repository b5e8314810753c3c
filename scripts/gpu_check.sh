#!/usr/bin/env bash
# On a CUDA machine, in phases that each fit one short job:
#   gpu_check.sh build          build holokv in place against the local torch
#   gpu_check.sh tests OUT      the CUDA tests, shared by JOBS processes (default: one per core), the compiled
#                               FlexAttention tests in one more
#   gpu_check.sh memcheck OUT   compute-sanitizer memcheck over the CUDA tests of the ops and caches, shared
#                               alike (FlexAttention's left out: the sanitizer slows their compilation past
#                               any limit; a tenth of the fuzz examples)
#   gpu_check.sh e2e OUT        holokv bench e2e at B=16/N=16K and B=1/N=32K, then the uncompiled step, alone
#                               on the GPU (timings)
#   gpu_check.sh kernels OUT    holokv bench decode, src, stream and prefill
#   gpu_check.sh ncu OUT        Nsight Compute on holo_decode's split kernels at the e2e shape (B=16, N=16K,
#                               Llama-3-8B heads): throughput, memory, warp stalls, occupancy; and on
#                               holo_append's steps at both e2e points (scripts/append_steps.py), every section
# A process cut by LIMIT seconds (default 480) says so at the end of its log; the phase's exit status is
# nonzero if any failed or was cut. Logs and results go to OUT (default bench/results). PY: the interpreter
# (default python3). TESTS: test files for tests and memcheck instead of every one that mentions CUDA (say, the
# files of a kernel that changed).
set -uo pipefail
phase=${1:?phase: build, tests, memcheck, e2e, kernels or ncu}
out=$(realpath -m "${2:-bench/results}")
LIMIT=${LIMIT:-480}
PY=${PY:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
JOBS=${JOBS:-$(nproc)}
# every test file that mentions CUDA, but the compiled FlexAttention tests: their compilation is bound by the
# host, so they run in a process of their own (and not under the sanitizer, which slows it past any limit)
FLEX=tests/test_prefill_attention.py
mapfile -t FILES < <(if [ -n "${TESTS:-}" ]; then printf '%s\n' $TESTS; else grep -l -i cuda tests/test_*.py; fi |
  grep -v -x "$FLEX")

limited() {  # LOG COMMAND...: run with the time limit, output in LOG, a note there when cut
  local log=$1
  shift
  # SIGINT first: pytest stops as on ^C and still prints the failures it has seen
  timeout -s INT -k 30 "$LIMIT" "$@" >"$log" 2>&1
  local rc=$?
  [ $rc = 124 ] && echo "CUT at the ${LIMIT} s limit" >>"$log"
  [ $rc = 5 ] && return 0  # pytest: no test selected
  return $rc
}

spread() {  # NAME PREFIX...: the CUDA tests of FILES under PREFIX, in JOBS processes (conftest's --shard)
  local name=$1 status=0 pids=()
  shift
  for ((i = 0; i < JOBS; i++)); do
    limited "$out/${name}_$i.log" "$@" "$PY" -m pytest -q -ra -k cuda --shard "$i/$JOBS" "${FILES[@]}" &
    pids+=("$!")
  done
  if [ "$name" = pytest ] && [[ -z "${TESTS:-}" || " $TESTS " == *" $FLEX "* ]]; then
    limited "$out/pytest_flex.log" "$PY" -m pytest -q -ra -k cuda "$FLEX" &
    pids+=("$!")
  fi
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  for log in "$out/${name}"_*.log; do echo "== $log"; tail -n 4 "$log"; done
  return $status
}

case $phase in
  build)
    # The system compiler, whose libstdc++ python and torch load: a toolchain named by CC/CXX may link its own
    # static libstdc++ into _C, which then crashes.
    unset CC CXX
    "$PY" -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -20 || exit 1
    "$PY" -c "import holokv, json; print(json.dumps(holokv.build_info()))"
    ;;
  tests)
    spread pytest
    ;;
  memcheck)
    export HOLOKV_FUZZ_SCALE=0.1 PYTORCH_NO_CUDA_MEMORY_CACHING=1
    spread memcheck compute-sanitizer --tool memcheck --error-exitcode 9
    ;;
  e2e)
    status=0
    limited "$out/e2e_bench.log" "$PY" -m holokv.cli bench e2e --batch 16 1 --context 16384 32768 \
      --methods full,holokv:k=4,src,src:every=auto --steps 640 --profile 8 --out "$out" || status=1
    limited "$out/e2e_eager_layers.log" "$PY" -m holokv.cli bench e2e --batch 16 --context 16384 \
      --methods full,holokv:k=4 --baselines "" --compile no --name e2e_eager_layers.json --out "$out" || status=1
    tail -12 "$out"/e2e_*.log
    exit $status
    ;;
  kernels)
    status=0
    for bench in decode src stream prefill; do
      limited "$out/${bench}_bench.log" "$PY" -m holokv.cli bench "$bench" --out "$out" || status=1
    done
    exit $status
    ;;
  ncu)
    limited "$out/ncu_decode.txt" ncu -k regex:holo_decode --launch-skip 4 --launch-count 4 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
      --section LaunchStats --section SchedulerStats \
      "$PY" -m holokv.cli bench decode --batch 16 --tokens 16384 --k 4 --compact-ratio 1 4 --out /tmp || status=1
    limited "$out/ncu_append.txt" ncu -k regex:holo_append --launch-count 16 --set full "$PY" scripts/append_steps.py ||
      status=1
    exit ${status:-0}
    ;;
  *)
    echo "unknown phase $phase: build, tests, memcheck, e2e, kernels or ncu" >&2
    exit 2
    ;;
esac
