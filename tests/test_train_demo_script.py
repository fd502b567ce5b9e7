"""scripts/train_demo.sh runs its stages in order, each from the last one's weights, and records what it ran.

The `smolvlm` command and `python -m smolvlm.demo` are stand-ins here that log their arguments and write the files the
next stage looks for, so the script's wiring is checked in a second, with no training.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]

FAKE_SMOLVLM = """#!/usr/bin/env bash
echo "smolvlm $*" >> "$CALLS"
kind="$1 $2"; out=""; split=""
while [ $# -gt 0 ]; do
    case "$1" in --out) out=$2; shift;; --split) split=$2; shift;; esac
    shift
done
if [ -n "$split" ]; then
    mkdir -p "$out" && touch "$out/$split.jsonl"
elif [ "$kind" = "data chat" ]; then
    mkdir -p "$out" && touch "$out/train.jsonl"
else
    mkdir -p "$out/final" && touch "$out/final/model.safetensors"
fi
"""

FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1 $2" = "-m smolvlm.demo" ]; then
    echo "demo ${*:3}" >> "$CALLS"
    if [ "$3" = base ]; then mkdir -p "$5" && touch "$5/model.safetensors"; fi
    if [ "$3" = manifest ]; then
        shift 3
        while [ "$1" != --recipe ]; do shift; done
        printf '%s' "$2" > "$RECIPE_OUT"
    fi
    exit 0
fi
exec PYTHON "$@"
"""


def run_script(tmp_path: Path, **env: str) -> tuple[list[list[str]], dict]:
    """Run train_demo.sh with stand-ins; its calls (argument lists) and the recipe it gave the manifest."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("smolvlm", FAKE_SMOLVLM), ("python", FAKE_PYTHON.replace("PYTHON", sys.executable))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls, recipe = tmp_path / "calls.txt", tmp_path / "recipe.json"
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "RECIPE_OUT": str(recipe),
                **env}
    subprocess.run(["bash", str(ROOT / "scripts" / "train_demo.sh"), str(tmp_path / "w")], env=full_env,
                   check=True, capture_output=True, text=True)
    return [shlex.split(line) for line in calls.read_text().splitlines()], json.loads(recipe.read_text())


def flag(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


def train_calls(calls: list[list[str]]) -> list[list[str]]:
    """The script's `smolvlm train` calls, in order."""
    return [c for c in calls if c[:2] == ["smolvlm", "train"]]


def chain(trains: list[list[str]]) -> list[tuple[str, str, str]]:
    """Each `smolvlm train` call's start weights, output folder and data."""
    return [(flag(c, "--model"), flag(c, "--out"), flag(c, "--data")) for c in trains]


def export_call(calls: list[list[str]]) -> list[str]:
    """The script's `python -m smolvlm.demo export` call."""
    return next(c for c in calls if c[:2] == ["demo", "export"])


def training_data(calls: list[list[str]], *names: str) -> dict[str, tuple[str, ...]]:
    """Each `smolvlm data synth --split train` call's output folder and the values of its flags `names`."""
    return {flag(c, "--out"): tuple(flag(c, name) for name in names)
            for c in calls if c[1:3] == ["data", "synth"] and flag(c, "--split") == "train"}


def box_cells(calls: list[list[str]]) -> dict[str, str]:
    """Each call given `--box-cell`: its output folder and the bin size."""
    return {flag(c, "--out"): flag(c, "--box-cell") for c in calls if "--box-cell" in c}


def test_every_stage_starts_from_the_last_ones_weights_and_the_recipe_names_them(tmp_path):
    calls, recipe = run_script(tmp_path, STEPS1="3", STEPS2="4", STEPS3="5", STEPS4="6", N_TRAIN="20", N_EVAL="7",
                               TASKS4="count=1")
    w = tmp_path / "w"
    trains = train_calls(calls)
    assert [(flag(c, "--model"), flag(c, "--out"), flag(c, "--max-steps")) for c in trains] == [
        (f"{w}/base", f"{w}/scene", "3"), (f"{w}/scene/final", f"{w}/run", "4"),
        (f"{w}/run/final", f"{w}/run3", "5"), (f"{w}/run3/final", f"{w}/run4", "6")]
    scene, answers, stage3, stage4 = trains
    assert flag(scene, "--objective") == "scene" and "--objective" not in answers
    assert [flag(c, "--continue-adapter") for c in (stage3, stage4)] == [f"{w}/run/final", f"{w}/run3/final"]
    assert [flag(c, "--lr") for c in trains] == ["1e-3", "5e-4", "3e-4", "1e-4"]
    synths = training_data(calls, "--n", "--seed", "--tasks")
    assert synths[f"{w}/data3"][:2] == ("40", "61") and synths[f"{w}/data4"] == ("48", "63", "count=1")
    assert [c[1] for c in calls if c[0] == "demo"] == ["base", "export", "manifest"]
    assert flag(export_call(calls), "--run") == f"{w}/run4/final"
    assert recipe["command"] == ("SEED=0 STEPS1=3 STEPS2=4 BATCH1=32 BATCH=8 N_TRAIN=20 SHARDS=1 DATA_WORKERS=0 "
                                 "STEPS3=5 BATCH3=8 N_TRAIN3=40 STEPS4=6 BATCH4=8 N_TRAIN4=48 TASKS4=count=1 "
                                 "scripts/train_demo.sh")
    assert recipe["n_train3"] == 40 and recipe["n_train4"] == 48 and recipe["n_eval"] == 7
    assert recipe["stage4_tasks"] == "count=1" and recipe["stage3_tasks"] == synths[f"{w}/data3"][2]
    assert recipe["stage4"] == "smolvlm train " + " ".join(stage4[stage4.index("--vision"):])


def test_the_later_stages_chain_scene_and_answer_stages_and_the_recipe_names_them(tmp_path):
    calls, recipe = run_script(tmp_path, STEPS1="3", STEPS2="4", STEPS5="5", N_TRAIN5="50", SLACK5="3", STEPS6="6",
                               STEPS7="7", STEPS8="8", TASKS8="chart=1")
    w = tmp_path / "w"
    trains = train_calls(calls)
    assert chain(trains[2:]) == [
        (f"{w}/run/final", f"{w}/scene5", f"{w}/data5/train.jsonl"),
        (f"{w}/scene5/final", f"{w}/run6", f"{w}/data5/train.jsonl"),
        (f"{w}/run6/final", f"{w}/run7", f"{w}/data7/train.jsonl"),
        (f"{w}/run7/final", f"{w}/run8", f"{w}/data8/train.jsonl")]
    scene5, stage6, stage7, stage8 = trains[2:]
    assert flag(scene5, "--objective") == "scene" and flag(scene5, "--centre-slack") == "3"
    assert "--continue-adapter" not in scene5  # the tower and connector only; the adapter stays merged as it was
    assert [flag(c, "--continue-adapter") for c in (stage6, stage7, stage8)] == [
        f"{w}/run/final", f"{w}/run6/final", f"{w}/run7/final"]
    assert [flag(c, "--lr") for c in trains[2:]] == ["3e-4", "3e-4", "1e-4", "1e-4"]
    synths = training_data(calls, "--n", "--seed")
    assert synths == {f"{w}/data": ("6000", "0"), f"{w}/data5": ("50", "65"), f"{w}/data7": ("56", "67"),
                      f"{w}/data8": ("64", "69")}
    assert flag(export_call(calls), "--run") == f"{w}/run8/final"
    assert recipe["command"].endswith("STEPS5=5 BATCH5=32 N_TRAIN5=50 SLACK5=3 STEPS6=6 BATCH6=8 STEPS7=7 BATCH7=8 "
                                      "N_TRAIN7=56 STEPS8=8 BATCH8=8 N_TRAIN8=64 TASKS8=chart=1 scripts/train_demo.sh")
    assert "stage6_tasks" not in recipe and recipe["n_train5"] == 50 and recipe["stage8_tasks"] == "chart=1"
    assert recipe["stage5"] == "smolvlm train " + " ".join(scene5[scene5.index("--objective"):])


def test_stages_9_to_15_rerun_the_scene_objective_then_train_the_adapter_over_it(tmp_path):
    calls, recipe = run_script(tmp_path, STEPS1="3", STEPS2="4", STEPS8="8", STEPS9="9", SLACK9="3", STEPS10="10",
                               N_TRAIN10="40", STEPS11="11", STEPS12="12", STEPS13="13",
                               STEPS14="14", STEPS15="15")
    w = tmp_path / "w"
    trains = train_calls(calls)
    assert chain(trains[3:]) == [
        (f"{w}/run8/final", f"{w}/scene9", f"{w}/data9/train.jsonl"),
        (f"{w}/scene9/final", f"{w}/run10", f"{w}/data10/train.jsonl"),
        (f"{w}/run10/final", f"{w}/run11", f"{w}/data11/train.jsonl"),
        (f"{w}/run11/final", f"{w}/run12", f"{w}/data12/train.jsonl"),
        (f"{w}/run12/final", f"{w}/run13", f"{w}/data13/train.jsonl"),
        (f"{w}/run13/final", f"{w}/run14", f"{w}/data14/train.jsonl"),
        (f"{w}/run14/final", f"{w}/run15", f"{w}/data15/train.jsonl")]
    scene9, *answer_stages = trains[3:]
    assert flag(scene9, "--objective") == "scene" and flag(scene9, "--centre-slack") == "3"
    assert flag(scene9, "--batch-size") == "32" and "--continue-adapter" not in scene9
    # stage 10 goes on with the adapter merged into stage 9's start, each later stage with the one before's
    assert [flag(c, "--continue-adapter") for c in answer_stages] == [
        f"{w}/run8/final", f"{w}/run10/final", f"{w}/run11/final", f"{w}/run12/final", f"{w}/run13/final",
        f"{w}/run14/final"]
    assert [flag(c, "--lr") for c in trains[3:]] == ["3e-4", "2e-4", "1e-4", "2e-4", "1e-4", "2e-4", "1e-4"]
    synths = training_data(calls, "--n", "--seed", "--tasks")
    assert synths[f"{w}/data9"] == ("288", "81",
                                    "colour=1,exists=1.5,count=2.5,spatial=3,chart=2,ocr=0.25,grounding=0.25")
    assert synths[f"{w}/data10"] == ("40", "83", "colour=1,exists=2,count=3,spatial=2,chart=4,ocr=0.25,grounding=0.25")
    assert synths[f"{w}/data11"] == ("88", "89", synths[f"{w}/data10"][2])
    assert synths[f"{w}/data12"] == ("96", "91", "colour=0.5,exists=1,count=5,spatial=1,chart=3")
    assert synths[f"{w}/data13"] == ("104", "93", "colour=1,exists=2,count=4,spatial=1,chart=3")
    assert synths[f"{w}/data14"] == ("112", "95", "colour=1,exists=2,count=6,spatial=1,chart=3")
    assert synths[f"{w}/data15"] == ("120", "97", synths[f"{w}/data13"][2])
    assert flag(export_call(calls), "--run") == f"{w}/run15/final"
    assert recipe["command"].endswith("STEPS9=9 BATCH9=32 N_TRAIN9=288 SLACK9=3 STEPS10=10 BATCH10=8 N_TRAIN10=40 "
                                      "STEPS11=11 BATCH11=8 N_TRAIN11=88 STEPS12=12 BATCH12=8 N_TRAIN12=96 "
                                      "STEPS13=13 BATCH13=8 N_TRAIN13=104 STEPS14=14 BATCH14=8 N_TRAIN14=112 "
                                      "STEPS15=15 BATCH15=8 N_TRAIN15=120 scripts/train_demo.sh")
    assert recipe["stage9"] == "smolvlm train " + " ".join(scene9[scene9.index("--objective"):])
    assert recipe["n_train10"] == 40 and recipe["stage10_tasks"] == synths[f"{w}/data10"][2]
    assert recipe["n_eval"] == 1400


def test_stage_6_without_stage_5_is_refused(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as refused:
        run_script(tmp_path, STEPS1="3", STEPS2="4", STEPS6="6")
    assert refused.value.returncode == 2 and "set STEPS5" in refused.value.stderr


def test_the_shipped_command_gives_the_shipped_recipe(tmp_path):
    shipped = json.loads((ROOT / "smolvlm" / "assets" / "demo" / "manifest.json").read_text())["recipe"]
    settings = dict(part.split("=", 1) for part in shipped["command"].split()[:-1])
    _, recipe = run_script(tmp_path, **settings)
    where = str(tmp_path / "w")
    recipe = {key: value.replace(where, "/tmp/demo") if isinstance(value, str) else value
              for key, value in recipe.items()}  # the shipped run worked in /tmp/demo
    assert recipe == shipped


def test_stages_left_at_zero_steps_are_neither_run_nor_recorded(tmp_path):
    calls, recipe = run_script(tmp_path, STEPS1="3", STEPS2="4")
    assert len(train_calls(calls)) == 2
    assert not any("--centre-slack" in c for c in calls) and not any(c[1:3] == ["data", "chat"] for c in calls)
    assert not any(key.startswith(("stage3", "stage4", "stage5", "stage6", "n_train3")) for key in recipe)
    assert recipe["command"].endswith("DATA_WORKERS=0 scripts/train_demo.sh")


def test_stage_1_takes_a_centre_slack_and_records_it(tmp_path):
    calls, recipe = run_script(tmp_path, STEPS1="3", STEPS2="4", SLACK1="2.5")
    scene, answers = train_calls(calls)
    assert flag(scene, "--centre-slack") == "2.5" and "--centre-slack" not in answers
    assert "SIGNS" not in recipe["command"] and " SLACK1=2.5 " in recipe["command"]
    assert "--centre-slack 2.5" in recipe["stage1"]


def test_stages_16_to_19_train_on_monospaced_signs_at_their_own_rates(tmp_path):
    calls, recipe = run_script(tmp_path, STEPS1="3", STEPS2="4", STEPS15="15", STEPS16="16", SLACK16="3",
                               N_TRAIN16="50", STEPS17="17", STEPS18="18", N_TRAIN18="60", SLACK18="3", STEPS19="19",
                               SIGNS19="proportional", EVAL_SIGNS="monospace", CHAT_REPEAT="2")
    w = tmp_path / "w"
    trains = train_calls(calls)
    assert chain(trains[3:]) == [
        (f"{w}/run15/final", f"{w}/scene16", f"{w}/data16/train.jsonl"),
        (f"{w}/scene16/final", f"{w}/run17", f"{w}/data17/train.jsonl"),
        (f"{w}/run17/final", f"{w}/scene18", f"{w}/data18/train.jsonl"),
        (f"{w}/scene18/final", f"{w}/run19", f"{w}/data19/train.jsonl,{w}/chat/train.jsonl")]
    scene16, stage17, scene18, stage19 = trains[3:]
    chats = [c for c in calls if c[1:3] == ["data", "chat"]]  # the base's own answers, once, mixed into stage 19
    assert len(chats) == 1 and (flag(chats[0], "--model"), flag(chats[0], "--repeat")) == (f"{w}/base", "2")
    assert flag(chats[0], "--prompts") == str(ROOT / "scripts" / "chat_prompts.txt")
    assert recipe["stage19_chat"] == ("smolvlm data chat --prompts scripts/chat_prompts.txt "
                                      f"--model {w}/base --out {w}/chat --repeat 2 --json")
    assert "stage17_chat" not in recipe and " CHAT_REPEAT=2 " in recipe["command"]
    assert [flag(c, "--objective") for c in (scene16, scene18)] == ["scene", "scene"]
    assert [flag(c, "--lr") for c in trains[3:]] == ["2e-3", "2e-4", "1e-3", "2e-4"]
    assert [flag(c, "--continue-adapter") for c in (stage17, stage19)] == [f"{w}/run15/final", f"{w}/run17/final"]
    synths = training_data(calls, "--n", "--seed", "--signs")
    assert synths[f"{w}/data"][2] == synths[f"{w}/data15"][2] == "proportional"
    assert synths[f"{w}/data16"] == ("50", "101", "monospace") and synths[f"{w}/data17"][1:] == ("103", "monospace")
    assert synths[f"{w}/data18"] == ("60", "105", "monospace") and synths[f"{w}/data19"][1:] == ("107", "proportional")
    eval_split = [c for c in calls if c[1:3] == ["data", "synth"] and flag(c, "--split") == "eval"]
    assert [flag(c, "--signs") for c in eval_split] == ["monospace"]
    assert " EVAL_SIGNS=monospace " in recipe["command"] and "SIGNS16" not in recipe["command"]
    assert recipe["command"].endswith("STEPS18=18 BATCH18=32 N_TRAIN18=60 SLACK18=3 STEPS19=19 BATCH19=8 N_TRAIN19=152 "
                                      "SIGNS19=proportional scripts/train_demo.sh")
    assert recipe["eval_signs"] == "monospace" and "signs" not in recipe
    assert recipe["stage16_signs"] == recipe["stage18_signs"] == "monospace" and "stage19_signs" not in recipe
    assert recipe["stage16"] == "smolvlm train " + " ".join(scene16[scene16.index("--objective"):])


def test_a_scene_stage_last_ships_the_adapter_of_the_stage_before_it(tmp_path):
    calls, _ = run_script(tmp_path, STEPS1="3", STEPS2="4", STEPS17="17", STEPS18="18")
    w = tmp_path / "w"
    export = export_call(calls)
    assert (flag(export, "--run"), flag(export, "--adapter")) == (f"{w}/scene18/final", f"{w}/run17/final")


@pytest.mark.parametrize("k, seed, mix, lr", [
    (20, "109", "colour=1,exists=2,count=4,spatial=2,chart=4,ocr=8", "2e-4"),
    (21, "111", "colour=1,exists=2,count=5,spatial=2,chart=4,ocr=10", "2e-4"),
    (24, "117", "colour=1,exists=2,count=2.5,spatial=2,chart=4,ocr=2,grounding=0.25", "1e-4")])
def test_stages_20_21_and_24_go_on_from_the_stage_before_with_the_chat_written_once(tmp_path, k, seed, mix, lr):
    calls, recipe = run_script(tmp_path, STEPS1="3", STEPS2="4", **{f"STEPS{k - 1}": str(k - 1), f"STEPS{k}": str(k)})
    w = tmp_path / "w"
    _, stage = train_calls(calls)[2:]
    assert chain([stage]) == [(f"{w}/run{k - 1}/final", f"{w}/run{k}", f"{w}/data{k}/train.jsonl,{w}/chat/train.jsonl")]
    assert flag(stage, "--continue-adapter") == f"{w}/run{k - 1}/final" and flag(stage, "--lr") == lr
    assert len([c for c in calls if c[1:3] == ["data", "chat"]]) == 1
    assert training_data(calls, "--n", "--seed", "--signs", "--tasks")[f"{w}/data{k}"] == (
        str(8 * k), seed, "monospace", mix)
    assert recipe[f"stage{k}_chat"] == recipe[f"stage{k - 1}_chat"] and recipe["command"].endswith(
        f"STEPS{k - 1}={k - 1} BATCH{k - 1}=8 N_TRAIN{k - 1}={8 * (k - 1)} STEPS{k}={k} BATCH{k}=8 N_TRAIN{k}={8 * k}"
        " scripts/train_demo.sh")


def test_stages_22_and_23_a_scene_stage_then_the_adapter_of_stage_21_over_it(tmp_path):
    calls, recipe = run_script(tmp_path, STEPS1="3", STEPS2="4", STEPS21="21", STEPS22="22", STEPS23="23")
    w = tmp_path / "w"
    stage22, stage23 = train_calls(calls)[-2:]
    assert chain([stage22, stage23]) == [
        (f"{w}/run21/final", f"{w}/scene22", f"{w}/data22/train.jsonl"),
        (f"{w}/scene22/final", f"{w}/run23", f"{w}/data23/train.jsonl,{w}/chat/train.jsonl")]
    assert [flag(stage22, name) for name in ("--objective", "--lr", "--batch-size")] == ["scene", "5e-4", "32"]
    assert flag(stage23, "--continue-adapter") == f"{w}/run21/final" and flag(stage23, "--lr") == "2e-4"
    data = training_data(calls, "--n", "--seed", "--signs", "--tasks")
    assert data[f"{w}/data22"] == (
        "704", "113", "monospace", "colour=1,exists=1,count=1.5,spatial=1,ocr=4,grounding=0.5,chart=1.5")
    assert data[f"{w}/data23"] == ("184", "115", "monospace", "colour=1,exists=2,count=5,spatial=2,chart=4,ocr=10")
    assert flag(export_call(calls), "--run") == f"{w}/run23/final"
    assert "stage22_chat" not in recipe and recipe["stage23_chat"] == recipe["stage21_chat"]


def test_stages_25_and_26_where_words_then_the_adapter_on_location_bin_boxes(tmp_path):
    calls, recipe = run_script(tmp_path, STEPS1="3", STEPS2="4", STEPS24="24", STEPS25="25", STEPS26="26",
                               BOX_CELL="32")
    w = tmp_path / "w"
    stage24, scene25, stage26 = train_calls(calls)[-3:]
    assert chain([scene25, stage26]) == [
        (f"{w}/run24/final", f"{w}/scene25", f"{w}/data25/train.jsonl"),
        (f"{w}/scene25/final", f"{w}/run26", f"{w}/data26/train.jsonl,{w}/chat/train.jsonl")]
    assert "--where-words" in scene25 and flag(scene25, "--lr") == "1e-3" and flag(scene25, "--batch-size") == "32"
    assert "--where-words" not in stage24 + stage26  # only the scene stage names places
    assert flag(stage26, "--continue-adapter") == f"{w}/run24/final" and flag(stage26, "--lr") == "3e-4"
    assert box_cells(calls) == {f"{w}/data26": "32"}  # stage 26's answers only; never the eval split
    assert training_data(calls, "--n", "--seed", "--tasks")[f"{w}/data26"] == (
        "208", "121", "colour=1,exists=2,count=3,spatial=2,chart=3,ocr=3,grounding=8")
    assert recipe["stage26_box_cell"] == "32" and "stage25_box_cell" not in recipe
    assert recipe["command"].endswith("STEPS25=25 BATCH25=32 N_TRAIN25=800 STEPS26=26 BATCH26=8 N_TRAIN26=208 "
                                      "BOX_CELL=32 scripts/train_demo.sh")
    assert recipe["stage25"] == "smolvlm train " + " ".join(scene25[scene25.index("--objective"):])
    assert flag(export_call(calls), "--run") == f"{w}/run26/final"


GROUNDING_MOSTLY = "colour=1,exists=2,count=3,spatial=2,chart=3,ocr=3,grounding=12"  # stages 28 to 30


@pytest.mark.parametrize(("env", "stage", "after", "lr", "data", "cells", "tail"), [
    ({"STEPS25": "25", "STEPS26": "26", "STEPS27": "27", "BOX_CELL": "32"}, 27, 26, "1e-4",
     ("216", "123", "colour=1,exists=2,count=5,spatial=2,chart=5,ocr=2,grounding=4"), {26: "32", 27: "32"},
     "STEPS27=27 BATCH27=8 N_TRAIN27=216 BOX_CELL=32"),  # the bin size named once in the command
    ({"STEPS25": "25", "STEPS26": "26", "STEPS28": "28"}, 28, 26, "2e-4", ("224", "125", GROUNDING_MOSTLY),
     {26: "16", 28: "16"}, "STEPS26=26 BATCH26=8 N_TRAIN26=208 STEPS28=28 BATCH28=8 N_TRAIN28=224"),  # 27 off
    ({"STEPS28": "28", "STEPS29": "29"}, 29, 28, "1e-4", ("232", "127", GROUNDING_MOSTLY), {28: "16", 29: "16"},
     "STEPS28=28 BATCH28=8 N_TRAIN28=224 STEPS29=29 BATCH29=8 N_TRAIN29=232"),
    ({"STEPS29": "29", "STEPS30": "30"}, 30, 29, "1e-4", ("240", "129", GROUNDING_MOSTLY), {29: "16", 30: "16"},
     "STEPS29=29 BATCH29=8 N_TRAIN29=232 STEPS30=30 BATCH30=8 N_TRAIN30=240"),
])
def test_the_adapter_stages_after_26_go_on_from_the_last_stage_run_on_location_bins(
        tmp_path, env, stage, after, lr, data, cells, tail):
    calls, recipe = run_script(tmp_path, STEPS1="3", STEPS2="4", **env)
    w = tmp_path / "w"
    last = train_calls(calls)[-1]
    assert chain([last]) == [
        (f"{w}/run{after}/final", f"{w}/run{stage}", f"{w}/data{stage}/train.jsonl,{w}/chat/train.jsonl")]
    assert flag(last, "--continue-adapter") == f"{w}/run{after}/final" and flag(last, "--lr") == lr
    assert training_data(calls, "--n", "--seed", "--tasks")[f"{w}/data{stage}"] == data
    assert box_cells(calls) == {f"{w}/data{k}": cell for k, cell in cells.items()}
    assert recipe[f"stage{stage}_box_cell"] == cells[stage]
    assert not any(f"stage{k}" in recipe for k in range(after + 1, stage))  # the stages off in between
    assert recipe["command"].endswith(f"{tail} scripts/train_demo.sh")
    assert recipe["command"].count("BOX_CELL") == (cells[stage] != "16")
    assert flag(export_call(calls), "--run") == f"{w}/run{stage}/final"
