#!/usr/bin/env bash
# Reproduce the shipped demo model (smolvlm/assets/demo/) from scratch with a fixed seed:
#   synthetic data -> untrained base (SmolLM2-135M GGUF + random vision tower) -> `smolvlm train` (vision + connector
#   full, LoRA on the LM) -> export -> `smolvlm eval` of the assembled demo on the held-out eval split -> manifest.
# Usage: scripts/train_demo.sh [WORK_DIR]   (env: SEED, STEPS, BATCH, N_TRAIN, N_EVAL, THREADS)
set -euo pipefail
WORK=${1:-runs/demo}
SEED=${SEED:-0}
STEPS=${STEPS:-500}
BATCH=${BATCH:-8}
N_TRAIN=${N_TRAIN:-4000}
N_EVAL=${N_EVAL:-280}
export OMP_NUM_THREADS=${THREADS:-2}
TRAIN_TASKS="colour=1,exists=1,count=1.5,spatial=1,ocr=1.5,grounding=0.5,chart=1.5"
EVAL_TASKS="colour,exists,count,spatial,ocr,grounding,chart"
TRAIN_ARGS=(--vision full --connector full --text lora --lora-r 8 --lora-alpha 16 --lr 1e-3 --text-lr 3e-4
            --warmup-steps 20 --min-lr-ratio 0.1 --max-steps "$STEPS" --batch-size "$BATCH" --seed "$SEED"
            --save-every 50 --keep-last 1 --log-every 1 --no-tensorboard)
start=$(date +%s)
mkdir -p "$WORK"

smolvlm data synth --n "$N_TRAIN" --seed "$SEED" --split train --out "$WORK/data" --tasks "$TRAIN_TASKS" --json
smolvlm data synth --n "$N_EVAL" --seed "$((SEED + 1))" --split eval --out "$WORK/data" --tasks "$EVAL_TASKS" --json
[ -f "$WORK/base/model.safetensors" ] || python -m smolvlm.demo base --out "$WORK/base" --seed "$SEED"
smolvlm train --model "$WORK/base" --data "$WORK/data/train.jsonl" --out "$WORK/run" --resume "${TRAIN_ARGS[@]}"

# Ship the trained tensors, then score the demo exactly as users get it (assembled from the shipped files).
python -m smolvlm.demo export --run "$WORK/run/final"
SMOLVLM_CACHE="$WORK/cache" smolvlm eval -m demo --data "$WORK/data/eval.jsonl" --out "$WORK/eval.json"
end=$(date +%s)
python - "$WORK" "$SEED" "$((end - start))" "$TRAIN_TASKS" "$N_TRAIN" "$N_EVAL" "${TRAIN_ARGS[*]}" <<'PY'
import json, sys
from smolvlm.demo import ASSETS, SCORES, write_manifest
work, seed, wall, tasks, n_train, n_eval, train_args = sys.argv[1:]
scores = json.load(open(f"{work}/eval.json"))["table"]
(ASSETS / SCORES).write_text(json.dumps(scores, indent=2) + "\n")
recipe = {"command": "scripts/train_demo.sh", "train_tasks": tasks, "n_train": int(n_train), "n_eval": int(n_eval),
          "eval_seed": int(seed) + 1, "train": "smolvlm train " + train_args}
print(write_manifest(ASSETS, recipe, int(seed), float(wall), scores))
PY
