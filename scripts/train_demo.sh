#!/usr/bin/env bash
# Reproduce the shipped demo model (smolvlm/assets/demo/) from scratch with fixed seeds:
#   synthetic data -> untrained base (SmolLM2-135M GGUF + random vision tower)
#   -> stage 1 `smolvlm train --objective scene`: the vision tower learns what is where from the scenes' own labels,
#      the connector learns to turn each region into the word embeddings of what it shows
#   -> stage 2 `smolvlm train` on the answers: LoRA on the language model, the connector at a low rate
#   -> stage 3 (STEPS3 > 0): stage 2's adapter trained on, on a mix that weighs the weak tasks up (TASKS3)
#   -> stage 4 (STEPS4 > 0): the same adapter trained on at a third of the rate, on data of its own (TASKS4)
#   -> stage 5 (STEPS5 > 0): the scene objective once more, from those weights (tower and connector; the language
#      model and the adapter merged into it untouched), on scenes of its own, with a centre slack (SLACK5)
#   -> stage 6 (STEPS6 > 0, needs stage 5): the adapter trained on over the new tokens, on stage 5's data
#   -> stages 7 and 8 (STEPS7, STEPS8 > 0): the adapter trained on gently on mixes weighing the bar charts up
#   -> stage 9 (STEPS9 > 0): the scene objective again, as stage 5, longer, on scenes of its own (SLACK9)
#   -> stage 10 (STEPS10 > 0): the adapter over those tokens, on a mix weighing counting and the bar charts up
#   -> stage 11 (STEPS11 > 0): the adapter once more, gently, on fresh samples of stage 10's mix
#   -> stage 12 (STEPS12 > 0): the adapter on a mix of mostly counting questions
#   -> stage 13 (STEPS13 > 0): the adapter once more, gently, on a mix weighing counting and existence up
#   -> stage 14 (STEPS14 > 0): more counting practice, at stage 12's rate
#   -> stage 15 (STEPS15 > 0): gently again, on fresh samples of stage 13's mix
#   -> stage 16 (STEPS16 > 0): the scene objective at a high rate (2e-3), long, on scenes whose signs are set in a
#      monospaced font (SIGNS16), so that each image token holds a fixed share of a word's letters
#   -> stage 17 (STEPS17 > 0): the adapter over those tokens, on a mix with the (monospaced) signs back in it
#   -> stages 18 and 19 (STEPS18, STEPS19 > 0): the scene objective once more at 1e-3, then the adapter over it,
#      with plain-text chat mixed in (CHAT_STAGES): `smolvlm data chat` has the untrained base (SmolLM2 itself)
#      answer scripts/chat_prompts.txt, so that the adapter keeps SmolLM2's chat while it learns the signs
#   -> stage 20 (STEPS20 > 0): the adapter once more, on a mix weighing the signs up, the chat mixed in again
#   -> stage 21 (STEPS21 > 0): the adapter again, longer, on fresh samples weighing the signs (and counting) up more
#   -> stages 22 and 23 (STEPS22, STEPS23 > 0): the scene objective once more at 5e-4, then the adapter over it
#   -> stage 24 (STEPS24 > 0): the adapter once more, gently, on a mix weighing the bar charts up, fewer signs
#   -> stage 25 (STEPS25 > 0): the scene objective with `--where-words`: a shape's image token also names the 16-px
#      column and row its centre lies in, so that the language model can read where a shape is
#   -> stage 26 (STEPS26 > 0): the adapter over those tokens, on a mix weighing grounding up, its answers on location
#      bins (`data synth --box-cell BOX_CELL`: a fixed-size box centred on the cell that holds the shape's centre)
#   -> stage 27 (STEPS27 > 0): the adapter once more, gently, on a mix weighing counting and the bar charts up, the
#      grounding answers still on location bins
#   -> stage 28 (STEPS28 > 0): the adapter once more, on a mix of mostly grounding questions on location bins
#   -> stage 29 (STEPS29 > 0): the same at half the rate, on fresh samples of stage 28's mix
#   -> stage 30 (STEPS30 > 0): stage 29 once more, on fresh samples of that mix
#   -> export (vision/connector, LoRA) -> `smolvlm eval` of the demo as users get it -> manifest.
# Usage: scripts/train_demo.sh [WORK_DIR]
#   env: SEED, STEPS1, STEPS2, BATCH1 (stage 1), BATCH (stage 2), N_TRAIN, N_EVAL, THREADS,
#        SIGNS (how sign text is set, `data synth --signs`: proportional or monospace; the default of the data
#        of stages 1 to 15), SIGNSk (stage k's own data; monospace from stage 16 on), EVAL_SIGNS (the eval split's;
#        SIGNS unless set),
#        TRAIN_TASKS (the training mix, `data synth --tasks`; both stages train on it),
#        STEPSk, BATCHk, N_TRAINk, TASKSk for each later stage k = 3 ... 30 (steps (0: no stage k), batch (32 for
#        the scene stages 5, 9, 16, 18, 22 and 25, else 8), samples (default STEPSk x BATCHk) and mix of its own data,
#        seeded SEED + DATA_SEEDS[k]; stage 6 trains on stage 5's data), SLACKk (a scene stage's centre slack);
#        the stages' learning rates are SCENE_LRS and ANSWER_LRS below,
#        SLACK1 (stage 1 names a shape near a token border on either side, `--centre-slack` pixels; unset as shipped),
#        BOX_CELL (the location bins' side in pixels of stages 26 to 30's grounding answers; 16),
#        CHAT_REPEAT (each self-distilled chat sample's copies in a CHAT_STAGES stage's data; 7),
#        SHARDS (training data written by this many parallel `data synth` runs, shard k seeded SEED + 100k),
#        DATA_WORKERS (processes building batches; a GPU needs several, the CPU recipe uses a background thread),
#        COMPILE=1 (both stages torch.compile their layers: fewer, larger kernels for a GPU),
#        PREPARE_ONLY=1 (stop after the data and the base),
#        TIME_BUDGET=S (time a few steps of each stage, then choose STEPS1/STEPS2 to spend S seconds of training
#        steps, SCENE_SHARE (0.3) of them on stage 1)
# Steps already done (data written, a stage's final/ folder present) are skipped, so a stopped run can be rerun.
set -euo pipefail
WORK=${1:-runs/demo}
SEED=${SEED:-0}
STEPS1=${STEPS1:-1200}
STEPS2=${STEPS2:-450}
BATCH=${BATCH:-8}
BATCH1=${BATCH1:-32}
SHARDS=${SHARDS:-1}
DATA_WORKERS=${DATA_WORKERS:-0}
COMPILE=${COMPILE:-}
N_TRAIN=${N_TRAIN:-6000}
N_EVAL=${N_EVAL:-1400}  # 200 questions a task; the first 280 are the eval split scored before stage 9
SIGNS=${SIGNS:-proportional}
EVAL_SIGNS=${EVAL_SIGNS:-$SIGNS}
SLACK1=${SLACK1:-}
CHAT_REPEAT=${CHAT_REPEAT:-7}
CHAT_PROMPTS="$(cd "$(dirname "$0")" && pwd)/chat_prompts.txt"
export OMP_NUM_THREADS=${THREADS:-2}
SHIPPED_TASKS="colour=1,exists=1,count=1.5,spatial=1,ocr=1.5,grounding=0.5,chart=1.5"
TRAIN_TASKS=${TRAIN_TASKS:-$SHIPPED_TASKS}
EVAL_TASKS="colour,exists,count,spatial,ocr,grounding,chart"
FOCUS_TASKS="colour=1,exists=1.5,count=2.5,spatial=3,chart=2,ocr=0.25,grounding=0.25"  # the shipped stage 3
CHARTS_UP="colour=1,exists=2,count=2.5,spatial=2,chart=4,ocr=0.25,grounding=0.25"  # the shipped stage 7
CHARTS_MOSTLY="colour=0.5,exists=1,count=1,spatial=1,chart=4"  # the shipped stage 8
COUNT_CHARTS="colour=1,exists=2,count=3,spatial=2,chart=4,ocr=0.25,grounding=0.25"  # the shipped stages 10 and 11
COUNT_MOSTLY="colour=0.5,exists=1,count=5,spatial=1,chart=3"  # the shipped stage 12
COUNT_EXISTS="colour=1,exists=2,count=4,spatial=1,chart=3"  # the shipped stages 13 and 15
COUNT_MORE="colour=1,exists=2,count=6,spatial=1,chart=3"  # the shipped stage 14
SIGN_SCENES="colour=1,exists=1,count=1.5,spatial=1,ocr=4,grounding=0.5,chart=1.5"  # the scene stages 16, 18, 22
SIGNS_BACK="colour=1,exists=2,count=4,spatial=1,chart=3,ocr=3"  # stage 17
SIGNS_CHARTS="colour=1,exists=2,count=4,spatial=1,chart=4,ocr=4"  # stage 19
SIGNS_MOSTLY="colour=1,exists=2,count=4,spatial=2,chart=4,ocr=8"  # stage 20
SIGNS_MORE="colour=1,exists=2,count=5,spatial=2,chart=4,ocr=10"  # stages 21 and 23
CHARTS_SIGNS="colour=1,exists=2,count=2.5,spatial=2,chart=4,ocr=2,grounding=0.25"  # stage 24
GROUNDING_UP="colour=1,exists=2,count=3,spatial=2,chart=3,ocr=3,grounding=8"  # stage 26
COUNT_CHARTS_BOXES="colour=1,exists=2,count=5,spatial=2,chart=5,ocr=2,grounding=4"  # stage 27
GROUNDING_MOSTLY="colour=1,exists=2,count=3,spatial=2,chart=3,ocr=3,grounding=12"  # stages 28 to 30
LATER_STAGES=(3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30)
SCENE_STAGES=" 5 9 16 18 22 25 "  # the later stages of the scene objective; the others train the adapter on the answers
is_scene_stage() { [[ "$SCENE_STAGES" == *" $1 "* ]]; }
# the answer stages whose data has the base model's plain-text chat mixed in
CHAT_STAGES=" 19 20 21 23 24 26 27 28 29 30 "
is_chat_stage() { [[ "$CHAT_STAGES" == *" $1 "* ]]; }
WHERE_STAGES=" 25 "  # the scene stages whose shape tokens also name the shape's column and row (`--where-words`)
is_where_stage() { [[ "$WHERE_STAGES" == *" $1 "* ]]; }
# the stages whose data has its grounding answers on location bins (`data synth --box-cell`)
BOX_STAGES=" 26 27 28 29 30 "
is_box_stage() { [[ "$BOX_STAGES" == *" $1 "* ]]; }
BOX_CELL=${BOX_CELL:-16}
# the mix of each later stage with data of its own (stage 6 trains on stage 5's) and the seed offset of that data
DEFAULT_TASKS=([3]="$FOCUS_TASKS" [4]="$FOCUS_TASKS" [5]="$FOCUS_TASKS" [7]="$CHARTS_UP" [8]="$CHARTS_MOSTLY"
               [9]="$FOCUS_TASKS" [10]="$COUNT_CHARTS" [11]="$COUNT_CHARTS" [12]="$COUNT_MOSTLY"
               [13]="$COUNT_EXISTS" [14]="$COUNT_MORE" [15]="$COUNT_EXISTS" [16]="$SIGN_SCENES" [17]="$SIGNS_BACK"
               [18]="$SIGN_SCENES" [19]="$SIGNS_CHARTS" [20]="$SIGNS_MOSTLY" [21]="$SIGNS_MORE"
               [22]="$SIGN_SCENES" [23]="$SIGNS_MORE" [24]="$CHARTS_SIGNS" [25]="$SIGN_SCENES" [26]="$GROUNDING_UP"
               [27]="$COUNT_CHARTS_BOXES"
               [28]="$GROUNDING_MOSTLY" [29]="$GROUNDING_MOSTLY" [30]="$GROUNDING_MOSTLY")
DATA_SEEDS=([3]=61 [4]=63 [5]=65 [7]=67 [8]=69 [9]=81 [10]=83 [11]=89 [12]=91 [13]=93 [14]=95 [15]=97 [16]=101
            [17]=103 [18]=105 [19]=107 [20]=109 [21]=111 [22]=113 [23]=115 [24]=117 [25]=119 [26]=121 [27]=123
            [28]=125 [29]=127 [30]=129)
default_signs() { if [ "$1" -ge 16 ]; then echo monospace; else echo "$SIGNS"; fi; }  # stage K's sign layout
# each stage's learning rate: the scene stages', the answer stages'
SCENE_LRS=([5]=3e-4 [9]=3e-4 [16]=2e-3 [18]=1e-3 [22]=5e-4 [25]=1e-3)
ANSWER_LRS=([3]=3e-4 [4]=1e-4 [6]=3e-4 [7]=1e-4 [8]=1e-4 [10]=2e-4 [11]=1e-4 [12]=2e-4 [13]=1e-4 [14]=2e-4 [15]=1e-4
            [17]=2e-4 [19]=2e-4 [20]=2e-4 [21]=2e-4 [23]=2e-4 [24]=1e-4 [26]=3e-4 [27]=1e-4
            [28]=2e-4 [29]=1e-4 [30]=1e-4)
# each later stage's STEPSk (0: no stage k) and BATCHk; a scene stage's SLACKk (unset: none); N_TRAINk, TASKSk and
# SIGNSk for a stage with data of its own
for k in "${LATER_STAGES[@]}"; do
    steps="STEPS$k" batch="BATCH$k" n="N_TRAIN$k" tasks="TASKS$k" slack="SLACK$k" signs="SIGNS$k"
    printf -v "$steps" '%s' "${!steps:-0}"
    if is_scene_stage "$k"; then
        printf -v "$batch" '%s' "${!batch:-32}"
        printf -v "$slack" '%s' "${!slack:-}"
    else
        printf -v "$batch" '%s' "${!batch:-8}"
    fi
    if [ -n "${DEFAULT_TASKS[$k]:-}" ]; then
        printf -v "$n" '%s' "${!n:-$((${!steps} * ${!batch}))}"  # default: every sample seen once
        printf -v "$tasks" '%s' "${!tasks:-${DEFAULT_TASKS[$k]}}"
        printf -v "$signs" '%s' "${!signs:-$(default_signs "$k")}"
    fi
done
if [ "$STEPS6" -gt 0 ] && [ "$STEPS5" -eq 0 ]; then
    echo "train_demo.sh: stage 6 trains on stage 5's data; set STEPS5 too" >&2
    exit 2
fi
scene_args() {  # scene_args K LR STEPS BATCH SLACK: later scene stage K's arguments (stages 5, 9, 16, 18, 22, 25)
    local where=""
    ! is_where_stage "$1" || where=--where-words
    echo --objective scene --vision full --connector full --lr "$2" --weight-decay 0.05 --warmup-steps 30 \
         --min-lr-ratio 0.05 --batch-size "$4" --max-steps "$3" --seed "$SEED" --log-every 10 \
         --data-workers "$DATA_WORKERS" ${COMPILE:+--compile} ${5:+--centre-slack "$5"} $where
}
define_stages() {  # the stages' arguments for the current STEPS1 ... STEPS30
    STAGE1=(--objective scene --vision full --connector full --lr 1e-3 --weight-decay 0.05 --warmup-steps 30 --min-lr-ratio 0.05
            --batch-size "$BATCH1" --max-steps "$STEPS1" --eval-data "$WORK/data/eval.jsonl" --eval-batch-size 32
            --seed "$SEED" --log-every 10 --data-workers "$DATA_WORKERS" ${COMPILE:+--compile}
            ${SLACK1:+--centre-slack "$SLACK1"})
    local answers=(--vision frozen --connector full --connector-lr 5e-5 --text lora --min-lr-ratio 0.1 --seed "$SEED"
                   --save-every 50 --keep-last 1 --log-every 1 --no-tensorboard --resume
                   --data-workers "$DATA_WORKERS" ${COMPILE:+--compile})  # what the answer stages share
    STAGE2=("${answers[@]}" --lora-r 16 --lora-alpha 32 --lr 5e-4 --warmup-steps 20 --max-steps "$STEPS2"
            --batch-size "$BATCH")
    local k steps batch slack
    for k in "${LATER_STAGES[@]}"; do
        steps="STEPS$k" batch="BATCH$k" slack="SLACK$k"
        local -n stage="STAGE$k"
        if is_scene_stage "$k"; then
            read -r -a stage <<< "$(scene_args "$k" "${SCENE_LRS[$k]}" "${!steps}" "${!batch}" "${!slack}")"
        else
            stage=("${answers[@]}" --lr "${ANSWER_LRS[$k]}" --warmup-steps 10 --max-steps "${!steps}"
                   --batch-size "${!batch}")
        fi
        unset -n stage
    done
}
define_stages
start=$(date +%s)
mkdir -p "$WORK"

synth() {  # synth DIR N SEED SPLIT TASKS [SIGNS [FLAG ...]]: FLAGs go on to `data synth`
    [ -f "$1/$4.jsonl" ] || smolvlm data synth --out "$1" --n "$2" --seed "$3" --split "$4" --tasks "$5" \
        --signs "${6:-$SIGNS}" --json "${@:7}"
}
if [ "$SHARDS" -eq 1 ]; then
    synth "$WORK/data" "$N_TRAIN" "$SEED" train "$TRAIN_TASKS"
elif [ ! -f "$WORK/data/train.jsonl" ]; then
    pids=()
    for k in $(seq 0 $((SHARDS - 1))); do  # shard k in data/s$k/; its image paths gain that folder below
        synth "$WORK/data/s$k" "$((N_TRAIN / SHARDS))" "$((SEED + 100 * k))" train "$TRAIN_TASKS" & pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    for k in $(seq 0 $((SHARDS - 1))); do sed "s#\"images/#\"s$k/images/#g; s#\"id\": \"train-#\"id\": \"s$k-train-#" "$WORK/data/s$k/train.jsonl"; done \
        > "$WORK/data/train.jsonl.part"
    mv "$WORK/data/train.jsonl.part" "$WORK/data/train.jsonl"
fi
synth "$WORK/data" "$N_EVAL" "$((SEED + 1))" eval "$EVAL_TASKS" "$EVAL_SIGNS"
[ -f "$WORK/base/model.safetensors" ] || python -m smolvlm.demo base --out "$WORK/base" --seed "$SEED"
CHAT_ARGS=(--model "$WORK/base" --out "$WORK/chat" --repeat "$CHAT_REPEAT" --json)  # and --prompts CHAT_PROMPTS
for k in $CHAT_STAGES; do  # the chat samples, once, if a stage that mixes them in runs
    steps="STEPS$k"
    [ "${!steps}" -gt 0 ] && [ ! -f "$WORK/chat/train.jsonl" ] || continue
    smolvlm data chat --prompts "$CHAT_PROMPTS" "${CHAT_ARGS[@]}"
done
[ -z "${PREPARE_ONLY:-}" ] || exit 0  # data and base only

if [ -n "${TIME_BUDGET:-}" ] && [ ! -f "$WORK/run/final/model.safetensors" ]; then
    # Time a few steps of each stage, then spend TIME_BUDGET seconds of training steps (SCENE_SHARE on stage 1).
    # The steps chosen are recorded in the manifest's command, which reproduces them without a budget.
    rm -rf "$WORK/timing"
    smolvlm train --model "$WORK/base" --data "$WORK/data/train.jsonl" --out "$WORK/timing/scene" "${STAGE1[@]}" \
        --max-steps 40 --eval-data "" --log-every 5 --no-progress
    smolvlm train --model "$WORK/base" --data "$WORK/data/train.jsonl" --out "$WORK/timing/lm" "${STAGE2[@]}" \
        --max-steps 20 --no-progress
    plan=$(python -m smolvlm.demo plan --scene-log "$WORK/timing/scene/log.jsonl" \
        --lm-log "$WORK/timing/lm/log.jsonl" --budget "$TIME_BUDGET" --scene-share "${SCENE_SHARE:-0.3}")
    read -r STEPS1 STEPS2 <<< "$plan"
    echo "TIME_BUDGET=$TIME_BUDGET s -> STEPS1=$STEPS1 STEPS2=$STEPS2"
    define_stages
fi
[ -f "$WORK/scene/final/model.safetensors" ] || \
    smolvlm train --model "$WORK/base" --data "$WORK/data/train.jsonl" --out "$WORK/scene" "${STAGE1[@]}"
[ -f "$WORK/run/final/model.safetensors" ] || \
    smolvlm train --model "$WORK/scene/final" --data "$WORK/data/train.jsonl" --out "$WORK/run" "${STAGE2[@]}"

FINAL="$WORK/run/final"  # the weights so far
ADAPTER="$FINAL"  # the folder of the adapter merged into them: still stage 2's one adapter of rank 16
own_data() {  # own_data K: stage K's data, N_TRAINk samples of TASKSk with SIGNSk signs, seeded SEED + DATA_SEEDS[K]
    # (a BOX_STAGES stage's grounding answers on BOX_CELL-px location bins)
    local n="N_TRAIN$1" tasks="TASKS$1" signs="SIGNS$1" bins=()
    ! is_box_stage "$1" || bins=(--box-cell "$BOX_CELL")
    synth "$WORK/data$1" "${!n}" "$((SEED + DATA_SEEDS[$1]))" train "${!tasks}" "${!signs}" "${bins[@]}"
}
answers_stage() {  # answers_stage K DATA: stage K trains the adapter on, on DATA (a `data synth` folder) + the chat
    local k=$1 data="$2/train.jsonl"
    local -n args="STAGE$k"
    ! is_chat_stage "$k" || data="$data,$WORK/chat/train.jsonl"
    [ -f "$WORK/run$k/final/model.safetensors" ] || smolvlm train --model "$FINAL" --continue-adapter "$ADAPTER" \
        --data "$data" --out "$WORK/run$k" "${args[@]}"
    FINAL="$WORK/run$k/final"
    ADAPTER="$FINAL"
}
scene_stage() {  # scene_stage K DATA: stage K trains the tower and connector on; ADAPTER is still what FINAL holds
    local k=$1
    local -n args="STAGE$k"
    [ -f "$WORK/scene$k/final/model.safetensors" ] || smolvlm train --model "$FINAL" --data "$2/train.jsonl" \
        --out "$WORK/scene$k" "${args[@]}"
    FINAL="$WORK/scene$k/final"
}
for k in "${LATER_STAGES[@]}"; do  # each from the weights the stage before left
    steps="STEPS$k"
    [ "${!steps}" -gt 0 ] || continue
    data="$WORK/data$k"
    if [ -n "${DATA_SEEDS[$k]:-}" ]; then own_data "$k"; else data="$WORK/data$((k - 1))"; fi  # stage 6: stage 5's
    if is_scene_stage "$k"; then scene_stage "$k" "$data"; else answers_stage "$k" "$data"; fi
done

# Ship the trained tensors, then score the demo exactly as users get it (assembled from the shipped files).
python -m smolvlm.demo export --run "$FINAL" --adapter "$ADAPTER"  # a scene stage last: the adapter is an earlier one
rm -rf "$WORK/cache"
SMOLVLM_CACHE="$WORK/cache" smolvlm eval -m demo --data "$WORK/data/eval.jsonl" --out "$WORK/eval.json"
end=$(date +%s)
COMMAND="SEED=$SEED STEPS1=$STEPS1 STEPS2=$STEPS2 BATCH1=$BATCH1 BATCH=$BATCH N_TRAIN=$N_TRAIN SHARDS=$SHARDS"
COMMAND="$COMMAND DATA_WORKERS=$DATA_WORKERS${COMPILE:+ COMPILE=$COMPILE}"
[ "$SIGNS" = proportional ] || COMMAND="$COMMAND SIGNS=$SIGNS"
[ "$EVAL_SIGNS" = "$SIGNS" ] || COMMAND="$COMMAND EVAL_SIGNS=$EVAL_SIGNS"
[ -z "$SLACK1" ] || COMMAND="$COMMAND SLACK1=$SLACK1"
[ "$CHAT_REPEAT" = 7 ] || COMMAND="$COMMAND CHAT_REPEAT=$CHAT_REPEAT"
[ "$TRAIN_TASKS" = "$SHIPPED_TASKS" ] || COMMAND="$COMMAND TRAIN_TASKS=$TRAIN_TASKS"
FIELDS=(command= train_tasks="$TRAIN_TASKS" n_train="$N_TRAIN" eval_tasks="$EVAL_TASKS" n_eval="$N_EVAL"
        stage1="smolvlm train ${STAGE1[*]}" stage2="smolvlm train ${STAGE2[*]}")  # the manifest's recipe
[ "$SIGNS" = proportional ] || FIELDS+=("signs=$SIGNS")  # sign layouts other than the first one's named
[ "$EVAL_SIGNS" = proportional ] || FIELDS+=("eval_signs=$EVAL_SIGNS")
BINNED=""  # set once a stage with location-bin answers ran
for k in "${LATER_STAGES[@]}"; do  # the command and the recipe name a later stage only when it ran
    steps="STEPS$k" batch="BATCH$k" n="N_TRAIN$k" tasks="TASKS$k" signs="SIGNS$k" stage="STAGE$k[*]"
    [ "${!steps}" -gt 0 ] || continue
    COMMAND="$COMMAND $steps=${!steps} $batch=${!batch}"
    if [ -n "${DEFAULT_TASKS[$k]:-}" ]; then  # a stage with data of its own (stage 6 has stage 5's)
        COMMAND="$COMMAND $n=${!n}"
        [ "${!tasks}" = "${DEFAULT_TASKS[$k]}" ] || COMMAND="$COMMAND $tasks=${!tasks}"
        [ "${!signs}" = "$(default_signs "$k")" ] || COMMAND="$COMMAND $signs=${!signs}"
        FIELDS+=("stage${k}_tasks=${!tasks}" "n_train$k=${!n}")
        [ "${!signs}" = proportional ] || FIELDS+=("stage${k}_signs=${!signs}")
        if is_box_stage "$k"; then  # its grounding answers on location bins
            BINNED=1
            FIELDS+=("stage${k}_box_cell=$BOX_CELL")
        fi
    fi
    slack="SLACK$k"  # the scene stages' centre slack
    ! is_scene_stage "$k" || [ -z "${!slack}" ] || COMMAND="$COMMAND $slack=${!slack}"
    FIELDS+=("stage$k=smolvlm train ${!stage}")
    ! is_chat_stage "$k" || \
        FIELDS+=("stage${k}_chat=smolvlm data chat --prompts scripts/chat_prompts.txt ${CHAT_ARGS[*]}")
done
[ -z "$BINNED" ] || [ "$BOX_CELL" = 16 ] || COMMAND="$COMMAND BOX_CELL=$BOX_CELL"
FIELDS[0]="command=$COMMAND scripts/train_demo.sh"
RECIPE=$(python -c 'import json, sys
fields = (arg.split("=", 1) for arg in sys.argv[1:])
print(json.dumps({key: int(value) if key.startswith("n_") else value for key, value in fields}))' "${FIELDS[@]}")
python -m smolvlm.demo manifest --report "$WORK/eval.json" --eval-data "$WORK/data/eval.jsonl" --recipe "$RECIPE" \
    --seed "$SEED" --wall-time "$((end - start))"
