#!/usr/bin/env bash
# Reproduce the shipped demo model (smolvlm/assets/demo/) from scratch with fixed seeds:
#   synthetic data -> untrained base (SmolLM2-135M GGUF + random vision tower)
#   -> stage 1 `smolvlm train`: vision tower + connector in full, LoRA on the language model
#   -> stage 2 `smolvlm train` on fresh data: vision tower + connector only (the stage-1 LM, LoRA merged, frozen)
#   -> export (stage-2 vision/connector, stage-1 LoRA) -> `smolvlm eval` of the demo as users get it -> manifest.
# Usage: scripts/train_demo.sh [WORK_DIR]   (env: SEED, STEPS1, STEPS2, BATCH, N_TRAIN1, N_TRAIN2, N_EVAL, THREADS)
# Steps already done (data written, a stage's final/ folder present) are skipped, so a stopped run can be rerun.
set -euo pipefail
WORK=${1:-runs/demo}
SEED=${SEED:-0}
STEPS1=${STEPS1:-500}
STEPS2=${STEPS2:-250}
BATCH=${BATCH:-8}
N_TRAIN1=${N_TRAIN1:-4000}
N_TRAIN2=${N_TRAIN2:-3000}
N_EVAL=${N_EVAL:-280}
export OMP_NUM_THREADS=${THREADS:-2}
TRAIN_TASKS="colour=1,exists=1,count=1.5,spatial=1,ocr=1.5,grounding=0.5,chart=1.5"
EVAL_TASKS="colour,exists,count,spatial,ocr,grounding,chart"
COMMON=(--batch-size "$BATCH" --seed "$SEED" --save-every 50 --keep-last 1 --log-every 1 --no-tensorboard --resume)
STAGE1=(--vision full --connector full --text lora --lora-r 8 --lora-alpha 16 --lr 1e-3 --text-lr 3e-4
        --warmup-steps 20 --min-lr-ratio 0.1 --max-steps "$STEPS1")
STAGE2=(--vision full --connector full --text frozen --lr 5e-4 --warmup-steps 10 --min-lr-ratio 0.1
        --max-steps "$STEPS2")
start=$(date +%s)
mkdir -p "$WORK"

synth() {  # synth DIR N SEED SPLIT TASKS
    [ -f "$1/$4.jsonl" ] || smolvlm data synth --out "$1" --n "$2" --seed "$3" --split "$4" --tasks "$5" --json
}
synth "$WORK/data" "$N_TRAIN1" "$SEED" train "$TRAIN_TASKS"
synth "$WORK/data2" "$N_TRAIN2" "$((SEED + 2))" train "$TRAIN_TASKS"
synth "$WORK/data" "$N_EVAL" "$((SEED + 1))" eval "$EVAL_TASKS"
[ -f "$WORK/base/model.safetensors" ] || python -m smolvlm.demo base --out "$WORK/base" --seed "$SEED"
[ -f "$WORK/run/final/model.safetensors" ] || \
    smolvlm train --model "$WORK/base" --data "$WORK/data/train.jsonl" --out "$WORK/run" "${STAGE1[@]}" "${COMMON[@]}"
[ -f "$WORK/run2/final/model.safetensors" ] || \
    smolvlm train --model "$WORK/run/final" --data "$WORK/data2/train.jsonl" --out "$WORK/run2" "${STAGE2[@]}" \
        "${COMMON[@]}"

# Ship the trained tensors, then score the demo exactly as users get it (assembled from the shipped files).
python -m smolvlm.demo export --run "$WORK/run2/final" --adapter "$WORK/run/final"
rm -rf "$WORK/cache"
SMOLVLM_CACHE="$WORK/cache" smolvlm eval -m demo --data "$WORK/data/eval.jsonl" --out "$WORK/eval.json"
end=$(date +%s)
RECIPE=$(python -c 'import json, sys; print(json.dumps({"command": "scripts/train_demo.sh", "train_tasks": sys.argv[1],
    "n_train": [int(sys.argv[2]), int(sys.argv[3])], "eval_tasks": sys.argv[4], "n_eval": int(sys.argv[5]),
    "stage1": "smolvlm train " + sys.argv[6], "stage2": "smolvlm train " + sys.argv[7]}))' \
    "$TRAIN_TASKS" "$N_TRAIN1" "$N_TRAIN2" "$EVAL_TASKS" "$N_EVAL" "${STAGE1[*]}" "${STAGE2[*]}")
python -m smolvlm.demo manifest --report "$WORK/eval.json" --eval-data "$WORK/data/eval.jsonl" --recipe "$RECIPE" \
    --seed "$SEED" --wall-time "$((end - start))"
