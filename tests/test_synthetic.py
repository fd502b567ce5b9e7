"""Synthetic data: determinism, answers consistent with the scenes, disjoint splits, task mix and CLI."""

import hashlib
import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from smolvlm.errors import DataError, SmolVLMError
from smolvlm.train import synthetic as syn
from smolvlm.train.data import Sample
from smolvlm.train.lora import read_adapter
from smolvlm.train.scene_labels import NO_WORD, WHERE_WORDS, token_word_list

SIZE = 128  # small pictures keep the suite fast; one test covers the 256 default


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_a")
    syn.write_dataset(out, 36, seed=7, image_size=SIZE, progress=False)
    return out


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def folder_bytes(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_other_seed_differs(train_dir, tmp_path):
    again = tmp_path / "again"
    syn.write_dataset(again, 36, seed=7, image_size=SIZE, progress=False)
    assert folder_bytes(again) == folder_bytes(train_dir)
    other = tmp_path / "other"
    syn.write_dataset(other, 36, seed=8, image_size=SIZE, progress=False)
    a, b = folder_bytes(train_dir), folder_bytes(other)
    assert a.keys() == b.keys()
    assert a["train.jsonl"] != b["train.jsonl"]
    assert sum(a[k] == b[k] for k in a if k.endswith(".png")) == 0


def test_generate_sample_is_a_function_of_the_rng():
    for task in syn.TASKS:
        images1, q1, a1, m1 = syn.generate_sample(task, random.Random(3), 96)
        images2, q2, a2, m2 = syn.generate_sample(task, random.Random(3), 96)
        assert (q1, a1, m1) == (q2, a2, m2)
        assert [im.tobytes() for im in images1] == [im.tobytes() for im in images2]
        assert all(im.size == (96, 96) and im.mode == "RGB" for im in images1)


def test_jsonl_format(train_dir):
    records = read_records(train_dir / "train.jsonl")
    assert len(records) == 36
    assert {r["task"] for r in records} == set(syn.TASKS)  # the default mix holds every task, 4 of each
    for i, r in enumerate(records):
        assert r["id"] == f"train-{i:06d}"
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        images = [p["image"] for p in user["content"] if p["type"] == "image"]
        texts = [p["text"] for p in user["content"] if p["type"] == "text"]
        assert user["content"][-1]["type"] == "text" and len(texts) == 1 and texts[0].strip()
        assert len(images) == (2 if r["task"] == "compare" else 1)
        for path in images:
            assert path.startswith("images/") and not path.startswith("/")
            with Image.open(train_dir / path) as im:
                assert im.format == "PNG" and im.size == (SIZE, SIZE)
        assert assistant["content"] == [{"type": "text", "text": assistant["content"][0]["text"]}]
        assert assistant["content"][0]["text"].strip()


def objects_like(scene, shape=None, colour=None):
    return [o for o in scene["objects"] if shape in (None, o["shape"]) and colour in (None, o["colour"])]


def pixel(image, box):
    """The colour at a point well inside any of our shapes (triangles are widest near their base)."""
    x0, y0, x1, y1 = box
    return np.asarray(image)[(y0 + 2 * (y1 - 1)) // 3, (x0 + x1 - 1) // 2].astype(int)


def check_answer(task, answer, meta, images):
    scenes = meta["images"]
    scene = scenes[0]
    if task == "caption":
        phrases = re.split(r", | and ", answer)
        ordered = sorted(scene["objects"], key=lambda o: o["box"][0] + o["box"][2])
        assert phrases == [f"{'an' if o['colour'] == 'orange' else 'a'} {o['colour']} {o['shape']}" for o in ordered]
    elif task == "count":
        assert answer == str(len(objects_like(scene, meta["shape"]))) and 1 <= int(answer) <= 6
    elif task == "colour":
        (target,) = objects_like(scene, meta["shape"])
        assert answer == target["colour"]
    elif task == "exists":
        assert answer == ("yes" if objects_like(scene, meta["shape"], meta["colour"]) else "no")
    elif task == "spatial":
        (a,) = objects_like(scene, *meta["subject"])
        (b,) = objects_like(scene, *meta["object"])
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["box"], b["box"]
        expected = ({"left": ax1 <= bx0, "right": bx1 <= ax0} if meta["axis"] == "horizontal"
                    else {"above": ay1 <= by0, "below": by1 <= ay0})
        assert [k for k, v in expected.items() if v] == [answer]
    elif task == "grounding":
        (target,) = objects_like(scene, meta["shape"], meta["colour"])
        m = re.fullmatch(r"<ref>(\w+ \w+)</ref><box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>", answer)
        assert m and m.group(1) == f"{target['colour']} {target['shape']}"
        box = [int(v) for v in m.groups()[1:]]
        assert all(0 <= v < 1000 for v in box) and box[0] < box[2] and box[1] < box[3]
        assert np.allclose(np.array(box), np.array(target["box"]) * 1000 / SIZE, atol=1.0)
    elif task == "compare":
        if meta["mode"] == "more":
            a, b = (len(objects_like(s, meta["shape"])) for s in scenes)
            assert a != b and answer == ("first" if a > b else "second")
        else:
            same = scenes[0] == scenes[1]
            assert answer == ("same" if same else "different")
            assert (images[0].tobytes() == images[1].tobytes()) == same
    elif task == "ocr":
        sign = scene["sign"]
        assert " ".join(sign["lines"]) == answer == meta["text"]
        assert 1 <= len(answer.split()) <= 3
        x0, y0, x1, y1 = sign["box"]
        inside = np.asarray(images[0])[y0 + sign["border"]:y1 - sign["border"], x0 + sign["border"]:x1 - sign["border"]]
        ink = np.abs(inside.astype(int) - sign["text_rgb"]).sum(-1) < 30
        assert ink.mean() > 0.03  # the text is actually painted on the sign
    elif task == "chart":
        bars = scene["bars"]
        top = max(bars, key=lambda b: b["value"])
        assert [b["value"] for b in bars].count(top["value"]) == 1
        if meta["question"] == "largest":
            assert answer == top["label"]
        else:
            (bar,) = [b for b in bars if b["label"] == meta["label"]]
            assert answer == str(bar["value"])
        px0, py0, px1, py1 = scene["plot"]
        for b in bars:  # bar heights are on the axis scale
            assert abs((py1 - b["box"][1]) - b["value"] * (py1 - py0) / syn.CHART_MAX) <= 1
    else:
        raise AssertionError(task)


def test_answers_match_scene_metadata_and_pixels(train_dir):
    for r in read_records(train_dir / "train.jsonl"):
        paths = [p["image"] for p in r["messages"][0]["content"] if p["type"] == "image"]
        images = [Image.open(train_dir / p).convert("RGB") for p in paths]
        meta = r["meta"]
        # the metadata fully determines the pictures
        for scene, image in zip(meta["images"], images):
            assert np.array_equal(np.asarray(syn.render_scene(scene)), np.asarray(image))
        # every named colour is what is painted, and boxes lie inside the picture
        for scene, image in zip(meta["images"], images):
            for o in scene.get("objects", []):
                x0, y0, x1, y1 = o["box"]
                assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
                assert np.abs(pixel(image, o["box"]) - syn.COLOURS[o["colour"]]).max() <= 10
        check_answer(r["task"], r["messages"][1]["content"][0]["text"], meta, images)


def test_shape_pixels_fill_exactly_their_box():
    rng = random.Random(0)
    for _ in range(40):
        side, x, y = rng.randint(8, 60), rng.randint(0, 60), rng.randint(0, 60)
        for shape in syn.SHAPES:
            canvas = Image.new("L", (128, 128), 0)
            syn.draw_object(ImageDraw.Draw(canvas), {"shape": shape, "box": [x, y, x + side, y + side], "rgb": [255]})
            assert list(canvas.getbbox()) == [x, y, x + side, y + side], shape


def test_answer_balance():
    answers = {t: [syn.generate_sample(t, random.Random(i), 64)[2] for i in range(120)] for t in ("exists", "count")}
    assert 0.35 < answers["exists"].count("yes") / 120 < 0.65
    assert set(answers["count"]) == {"1", "2", "3", "4", "5", "6"}


def test_eval_split_shares_no_scene_with_train(train_dir, tmp_path):
    syn.write_dataset(tmp_path, 36, seed=7, split="eval", image_size=SIZE, progress=False)
    train, evals = read_records(train_dir / "train.jsonl"), read_records(tmp_path / "eval.jsonl")
    assert all(syn.scene_split(r["meta"]) == "train" for r in train)
    assert all(syn.scene_split(r["meta"]) == "eval" for r in evals)

    def scene_keys(records):
        return {json.dumps(s, sort_keys=True) for r in records for s in r["meta"]["images"]}

    assert not scene_keys(train) & scene_keys(evals)
    train_png = {hashlib.sha256(p.read_bytes()).digest() for p in (train_dir / "images").glob("*.png")}
    eval_png = {hashlib.sha256(p.read_bytes()).digest() for p in (tmp_path / "images").glob("eval-*.png")}
    assert len(eval_png) > 30 and not train_png & eval_png


def test_task_mix_and_schedule():
    assert syn.parse_task_mix(None) == dict.fromkeys(syn.TASKS, 1.0)
    assert syn.parse_task_mix("count=2, ocr") == {"count": 2.0, "ocr": 1.0}
    assert syn.parse_task_mix(["chart"]) == {"chart": 1.0}
    schedule = syn.task_schedule({"count": 2.0, "ocr": 1.0}, 9)
    assert schedule.count("count") == 6 and schedule.count("ocr") == 3
    assert set(schedule[:3]) == {"count", "ocr"}  # every prefix already mixes the tasks
    for bad in ("counting", "count=x", "count=0", "count=-1,ocr"):
        with pytest.raises(DataError):
            syn.parse_task_mix(bad)
    with pytest.raises(DataError, match="split"):
        syn.write_dataset("unused", 1, 0, split="test")
    with pytest.raises(DataError, match="image size"):
        syn.generate_sample("count", random.Random(0), 32)


def test_cli_main_json(tmp_path, capsys):
    rc = syn.main(["--n", "4", "--seed", "1", "--out", str(tmp_path), "--tasks", "ocr,chart", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks"] == {"ocr": 2, "chart": 2} and summary["path"] == str(tmp_path / "train.jsonl")
    records = read_records(tmp_path / "train.jsonl")
    assert [r["task"] for r in records] == ["ocr", "chart", "ocr", "chart"]
    assert syn.main(["--n", "1", "--out", str(tmp_path), "--tasks", "nope"]) == 2
    assert "unknown synthetic task" in capsys.readouterr().err


def test_box_cell_snaps_the_training_grounding_answers_only(tmp_path, capsys):
    true = read_records(syn.write_dataset(tmp_path / "true", 6, seed=2, tasks="grounding=1,count=1", progress=False))
    rc = syn.main(["--n", "6", "--seed", "2", "--out", str(tmp_path / "snapped"), "--tasks", "grounding=1,count=1",
                   "--box-cell", "16", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["box_cell"] == 16
    snapped = read_records(tmp_path / "snapped" / "train.jsonl")
    assert [r["meta"] for r in snapped] == [r["meta"] for r in true]  # same scenes; meta keeps the true box
    for before, after in zip(true, snapped):
        answer = after["messages"][1]["content"][0]["text"]
        if after["task"] == "grounding":
            assert answer == syn.snapped_grounding(after["meta"], 16) != before["messages"][1]["content"][0]["text"]
        else:
            assert after["messages"] == before["messages"]
    assert syn.main(["--n", "1", "--out", str(tmp_path / "e"), "--split", "eval", "--box-cell", "16"]) == 2
    assert "eval set keeps the true boxes" in capsys.readouterr().err
    assert syn.main(["--n", "1", "--out", str(tmp_path / "e"), "--box-cell", "-1"]) == 2
    assert "--box-cell" in capsys.readouterr().err


def test_default_size_is_256(tmp_path):
    path = syn.write_dataset(tmp_path, 2, seed=0, tasks="ocr,grounding", progress=False)
    for r in read_records(path):
        with Image.open(tmp_path / r["messages"][0]["content"][0]["image"]) as im:
            assert im.size == (256, 256)


def test_monospace_signs(tmp_path, capsys):
    rng = random.Random(5)
    images, _, answer, meta = syn.generate_sample("ocr", rng, 256, signs="monospace")
    sign = meta["images"][0]["sign"]
    pitch = sign["pitch"]
    for line in sign["lines"]:  # each character's ink sits inside its own cell
        mask = np.asarray(syn.text_mask(line, sign["style"], sign["font_size"], pitch)) > 127
        assert mask.shape[1] == pitch * len(line)
        for k, char in enumerate(line):
            assert mask[:, k * pitch : (k + 1) * pitch].any() == (char != " ")
    assert " ".join(sign["lines"]) == answer
    plain = syn.generate_sample("ocr", random.Random(5), 256)[3]["images"][0]["sign"]
    assert "pitch" not in plain  # the default layout is unchanged
    with pytest.raises(DataError, match="sign layout"):
        syn.generate_sample("ocr", random.Random(0), 256, signs="cursive")
    assert syn.main(["--n", "2", "--out", str(tmp_path), "--tasks", "ocr", "--signs", "monospace", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["signs"] == "monospace"
    records = read_records(tmp_path / "train.jsonl")
    assert all("pitch" in r["meta"]["images"][0]["sign"] for r in records)


@pytest.mark.parametrize("signs", syn.SIGN_LAYOUTS)
def test_text_blocks(signs, tmp_path, capsys):
    lines_per_picture = []
    for seed in range(20):
        images, question, answer, meta = syn.generate_sample("text", random.Random(seed), 256, signs=signs)
        sign = meta["images"][0]["sign"]
        x0, y0, x1, y1 = sign["box"]
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256  # the whole block is in the picture
        assert answer == " ".join(sign["lines"]) and set(answer) <= set(syn.TEXT_CHARACTERS + " ")
        assert ("pitch" in sign) == (signs == "monospace")
        assert question in ("Read the text.", "What does the text say?")
        lines_per_picture.append(len(sign["lines"]))
    assert sum(lines_per_picture) / len(lines_per_picture) >= 2.5  # a block, not a one-line sign
    # outside the default mix, so the default data is what it was
    assert "text" not in syn.parse_task_mix(None) and syn.parse_task_mix("text=2,ocr") == {"text": 2.0, "ocr": 1.0}
    with pytest.raises(DataError, match="text"):
        syn.parse_task_mix("novel")
    assert syn.main(["--n", "3", "--out", str(tmp_path), "--tasks", "text", "--signs", signs, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == {"text": 3}


def test_demo_diagnostics_counts_characters_without_a_token():
    root = Path(__file__).resolve().parents[1]
    script = root / "scripts" / "demo_diagnostics.py"
    figures = {}
    for signs in syn.SIGN_LAYOUTS:
        out = subprocess.run([sys.executable, str(script), "collisions", "--n", "20", "--signs", signs, "--json"],
                             capture_output=True, text=True, check=True, cwd=root).stdout
        figures[signs] = json.loads(out)
    assert figures["monospace"]["characters_without_a_token"] == 0.0
    assert figures["proportional"]["characters_without_a_token"] > 0.1  # narrow letters share a 32-px token


def test_demo_diagnostics_breakdown_splits_spatial_by_axis_count_by_truth_and_grounding_by_cell(tmp_path):
    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "eval.jsonl"
    rows = [("a", "spatial", {"axis": "horizontal"}), ("b", "spatial", {"axis": "horizontal"}),
            ("c", "spatial", {"axis": "vertical"}), ("d", "count", {"shape": "star"}), ("e", "colour", {})]

    def bars(*tops: int) -> dict:  # a largest-bar question's meta: bars from each top down to y = 200
        return {"question": "largest", "images": [{"size": [256, 256], "bars": [
            {"box": [40 * k, top, 40 * k + 20, 200]} for k, top in enumerate(tops)]}]}
    rows += [("f", "chart", bars(100, 40, 36)), ("g", "chart", bars(100, 40, 120)),  # centres 120/118; 120/150
             ("h", "chart", {"question": "value"})]
    star = {"shape": "star", "colour": "red", "images": [{"size": [256, 256], "objects": [
        {"shape": "circle", "colour": "red", "box": [0, 0, 9, 9]},
        {"shape": "star", "colour": "red", "box": [40, 200, 72, 232]}]}]}  # centre (56, 216): column 3, row 13
    rows += [("i", "grounding", star), ("j", "grounding", star), ("k", "grounding", star)]
    data.write_text("".join(json.dumps({"id": i, "task": t, "meta": {"task": t, **m}}) + "\n" for i, t, m in rows))
    predictions = [{"id": "a", "task": "spatial", "prediction": "left", "reference": "left", "score": 1.0},
                   {"id": "b", "task": "spatial", "prediction": "left", "reference": "right", "score": 0.0},
                   {"id": "c", "task": "spatial", "prediction": "above", "reference": "above", "score": 1.0},
                   {"id": "d", "task": "count", "prediction": "2", "reference": "3", "score": 0.0},
                   {"id": "e", "task": "colour", "prediction": "red", "reference": "red", "score": 1.0},
                   {"id": "f", "task": "chart", "prediction": "B", "reference": "C", "score": 0.0},
                   {"id": "g", "task": "chart", "prediction": "B", "reference": "B", "score": 1.0},
                   {"id": "h", "task": "chart", "prediction": "3", "reference": "5", "score": 0.0},
                   {"id": "i", "task": "grounding", "prediction": "<ref>red star</ref><box>(148,773),(289,914)</box>",
                    "reference": "", "score": 1.0},  # centred at column 3.5, row 13.5 of 16
                   {"id": "j", "task": "grounding", "prediction": "<box>(85,773),(226,914)</box>", "reference": "",
                    "score": 0.0},  # column 2
                   {"id": "k", "task": "grounding", "prediction": "no box", "reference": "", "score": 0.0}]
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"table": {}, "skipped": 0, "predictions": predictions}))
    out = subprocess.run([sys.executable, str(root / "scripts" / "demo_diagnostics.py"), "breakdown", "--report",
                          str(report), "--data", str(data), "--json"], capture_output=True, text=True, check=True,
                         cwd=root).stdout
    assert json.loads(out) == {"count, 3": {"right": 0.0, "n": 1}, "spatial, horizontal": {"right": 0.5, "n": 2},
                               "spatial, vertical": {"right": 1.0, "n": 1},
                               "largest bar, top two in one token row": {"right": 0.0, "n": 1},
                               "largest bar, top two in two rows": {"right": 1.0, "n": 1},
                               "grounding column 03": {"right": 1 / 3, "n": 3},
                               "grounding row 13": {"right": 2 / 3, "n": 3}}


def _diagnostics():
    """scripts/demo_diagnostics.py as a module."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("demo_diagnostics", root / "scripts" / "demo_diagnostics.py")
    diagnostics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnostics)
    return diagnostics


def test_demo_diagnostics_image_tokens_read_the_global_view(tmp_path):
    from checkpoints import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    image = tmp_path / "wide.png"
    Image.new("RGB", (150, 90), (200, 30, 30)).save(image)  # split into tiles + a global view
    grid = _diagnostics().image_tokens(str(checkpoint), str(image))
    assert len(grid) == 2 and all(len(row) == 2 for row in grid)  # the tiny checkpoint: 4 tokens a tile
    assert all(len(words) == 2 and set(words) <= set(token_word_list()) for row in grid for words in row)


def test_demo_diagnostics_counts_from_tokens_ignore_background_tokens(tmp_path, monkeypatch):
    diagnostics = _diagnostics()
    names = token_word_list()
    circle, star, red = names.index(" circle"), names.index(" star"), names.index(" red")
    # 256-px pictures, 32-px tokens: centres (16, 16) and (48, 16) lie in tokens 0 and 1, far from a border;
    # (32, 15) lies on the border of tokens 0 and 1 (token 1 holds it).
    scenes = [{"size": [256, 256], "objects": [{"shape": "circle", "box": [8, 8, 24, 24]},
                                               {"shape": "circle", "box": [40, 8, 56, 24]},
                                               {"shape": "star", "box": [72, 8, 88, 24]}]},
              {"size": [256, 256], "objects": [{"shape": "circle", "box": [17, 0, 47, 30]}]}]
    tokens = [[[red, circle], [circle, red], [star, red], [0, circle]],  # 2 circles; a background token leans circle
              [[circle, red], [0, circle], [circle, red], [0, 0]]]  # 1 circle read as 2, neither at its centre
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "task": "count", "meta": {"task": "count", "shape": "circle",
                                                                                   "images": [scene]}}) + "\n"
                            for i, scene in enumerate(scenes)) + json.dumps({"id": "c", "meta": {"task": "colour"}}))

    def fake_top2(model, given):
        assert model == "demo" and given == scenes
        for scene, top2 in zip(given, tokens):
            yield scene, torch.tensor(top2), None

    monkeypatch.setattr(diagnostics, "token_top2", fake_top2)
    assert diagnostics.count_from_tokens("demo", str(data)) == pytest.approx(
        {"right": 0.5, "too many": 0.5, "too few": 0.0, "n": 2, "shapes < 2 px from a border": 1 / 3,
         # the border circle's box covers tokens 0 and 1: token 0 names it; token 2 is a stray
         "centre < 2 px from a token border: named at centre": 0.0,
         "centre < 2 px from a token border: named once": 1.0,
         "centre < 2 px from a token border: named twice or more": 0.0,
         "centre < 2 px from a token border: named nowhere": 0.0,
         "centre >= 2 px from it: named at centre": 1.0, "centre >= 2 px from it: named once": 1.0,
         "centre >= 2 px from it: named twice or more": 0.0, "centre >= 2 px from it: named nowhere": 0.0})


@pytest.mark.parametrize("layout, extra, extra_second", [
    ("plain", [], []), ("half", [" east", " south"], [" west", " north"]),
    ("grid", [" three", " second"], [" twelve", " thirteenth"])])
def test_demo_diagnostics_oracle_tokens_say_where_a_shape_is(layout, extra, extra_second):
    diagnostics = _diagnostics()
    words = [" background", " red", " circle", " blue", " square", *diagnostics.HALF_WORDS[0],
             *diagnostics.HALF_WORDS[1], *WHERE_WORDS[0], *WHERE_WORDS[1]]
    table = torch.randn(len(words), 8)
    oracle_tokens = diagnostics.OracleTokens(table, lambda text: [words.index(text)], layout)
    # centre (50, 18): token 1 (row 0, column 1 of 32-px tokens), the east and south half of it, 16-px column 3, row 1;
    # centre (200, 200): token 54 (row 6, column 6), its west and north half, 16-px column 12, row 12
    scene = {"size": [256, 256], "objects": [{"shape": "circle", "colour": "red", "box": [40, 8, 60, 28]},
                                             {"shape": "square", "colour": "blue", "box": [190, 190, 210, 210]}]}
    tokens = oracle_tokens(scene)  # (64, 8)
    for at, said in ((1, [" red", " circle", *extra]), (54, [" blue", " square", *extra_second])):
        assert torch.allclose(tokens[at], table[[words.index(w) for w in said]].sum(0))
    others = (torch.arange(64) != 1) & (torch.arange(64) != 54)
    assert torch.equal(tokens[others], table[0].expand(62, 8))


def test_demo_diagnostics_oracle_scores_boxes_by_overlap():
    answer_right = _diagnostics().answer_right
    reference = "<ref>red circle</ref><box>(100,100),(300,300)</box>"
    decode = {1: "<ref>red circle</ref><box>(110,90),(310,290)</box>", 2: "<ref>red circle</ref><box>(300,300),"
              "(500,500)</box>", 3: "<ref>red circle</ref><box>(100,100),(300,"}.get
    assert answer_right("grounding", [1], [9], reference, lambda ids: decode(ids[0])) == 1.0  # IoU 0.82
    assert answer_right("grounding", [2], [9], reference, lambda ids: decode(ids[0])) == 0.0  # no overlap
    assert answer_right("grounding", [3], [9], reference, lambda ids: decode(ids[0])) == 0.0  # cut short: no box
    assert answer_right("count", [5, 6], [5, 6], "3", decode) == 1.0
    assert answer_right("count", [5, 7], [5, 6], "3", decode) == 0.0


def test_demo_diagnostics_snap_a_box_to_its_centres_cell(tmp_path, capsys):
    diagnostics = _diagnostics()
    # centre (50, 18): 16-px cell (3, 1), whose centre is (56, 24); a 36-px square there is (38, 6)-(74, 42)
    assert syn.snapped_box([40, 8, 60, 28], [256, 256], 16) == syn.qwen_box([38, 6, 74, 42], [256, 256])
    assert syn.snapped_box([0, 230, 20, 256], [256, 256], 16) == syn.qwen_box([0, 230, 26, 256], [256, 256])
    scene = {"size": [256, 256], "objects": [{"shape": "circle", "colour": "red", "box": [40, 8, 60, 28]},
                                             {"shape": "star", "colour": "red", "box": [100, 100, 136, 136]}]}
    meta = {"task": "grounding", "shape": "star", "colour": "red", "images": [scene]}
    assert syn.snapped_grounding(meta, 16) == syn.format_grounding("red star", syn.qwen_box(
        [102, 102, 138, 138], [256, 256]))  # centre (118, 118) -> cell centre (120, 120)
    with pytest.raises(SmolVLMError, match="blue star"):
        syn.snapped_grounding({**meta, "colour": "blue"}, 16)
    with pytest.raises(SmolVLMError, match="positive"):
        syn.snapped_box([40, 8, 60, 28], [256, 256], 0)
    # the star's own box snapped to 16 px overlaps it well; snapped to 64 px (cell centre (96, 96)) it does not
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"id": "g", "task": "grounding", "meta": {
        **meta, "box": syn.qwen_box([100, 100, 136, 136], [256, 256])}}) + "\n")
    assert diagnostics.snap_ceiling(str(data), 16) == {"right": 1.0, "n": 1}
    assert diagnostics.snap_ceiling(str(data), 64) == {"right": 0.0, "n": 1}
    empty = tmp_path / "none.jsonl"
    empty.write_text(json.dumps({"id": "c", "task": "colour", "meta": {"task": "colour"}}) + "\n")
    assert diagnostics.main(["snap-ceiling", "--data", str(empty)]) == 1
    assert "no grounding questions" in capsys.readouterr().err


def test_demo_diagnostics_with_answer_keeps_the_question():
    diagnostics = _diagnostics()
    sample = Sample(None, "x:1", id="g", task="grounding", fetch=lambda: [
        {"role": "user", "content": [{"type": "text", "text": "Locate the red star."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "old"}]}])
    messages = diagnostics.with_answer(sample, "new").conversation()
    assert messages[0]["content"][0]["text"] == "Locate the red star."
    assert messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "new"}]}
    assert sample.conversation()[1]["content"][0]["text"] == "old"


def test_demo_diagnostics_name_a_missing_file_in_one_line(tmp_path, capsys):
    diagnostics = _diagnostics()
    assert diagnostics.main(["count-tokens", "--data", str(tmp_path / "none.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "none.jsonl" in err and "Traceback" not in err


def test_demo_diagnostics_oracle_saves_its_adapter_and_goes_on_from_it(tmp_path, monkeypatch):
    from checkpoints import write_tiny_checkpoint

    diagnostics = _diagnostics()
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    for name in ("preprocessor_config.json", "processor_config.json"):  # one 4-token view a picture, as the demo's
        config = json.loads((checkpoint / name).read_text())
        (config.get("image_processor", config))["do_image_splitting"] = False
        (checkpoint / name).write_text(json.dumps(config))
    monkeypatch.setattr(diagnostics, "GRID", 2)
    train = syn.write_dataset(tmp_path / "train", 4, seed=3, tasks="grounding", progress=False)
    evals = syn.write_dataset(tmp_path / "eval", 1, seed=3, split="eval", tasks="grounding", progress=False)

    def run(save, adapter=None, lr=1e-2):
        report = diagnostics.oracle(str(checkpoint), str(train), str(evals), "grounding", "grid", 2, lr, 2, 0,
                                    n_eval=1, every=1, snap=16, adapter=adapter, save=str(tmp_path / save))
        assert [row["step"] for row in report] == [1, 2]
        return read_adapter(tmp_path / save)[1]

    first = run("first")
    assert all(pair["lora_B"].abs().sum() > 0 for pair in first.values())  # trained: lora_B starts at zero
    kept = run("kept", adapter=str(tmp_path / "first"), lr=0.0)
    assert kept.keys() == first.keys()
    assert all(torch.equal(kept[name][w], first[name][w]) for name in first for w in ("lora_A", "lora_B"))
    moved = run("moved", adapter=str(tmp_path / "first"))
    assert any(not torch.equal(moved[name]["lora_B"], first[name]["lora_B"]) for name in first)


def test_demo_diagnostics_score_where_words_per_axis(monkeypatch):
    diagnostics = _diagnostics()
    names = token_word_list(where=True)
    at = {word: names.index(word) for word in (" red", " circle", " three", " second", " third", " blue", " bar")}
    words = torch.tensor([[0, NO_WORD, NO_WORD, NO_WORD],  # background
                          [at[" red"], at[" circle"], at[" three"], at[" second"]],  # a red circle in cell (3, 1)
                          [at[" blue"], at[" bar"], NO_WORD, NO_WORD]])  # a blue bar
    scores = torch.zeros(3, len(names))
    scores[0, 0] = 1.0
    scores[1, [at[" red"], at[" circle"], at[" three"], at[" third"]]] = 1.0  # its row read one too far down
    scores[1, at[" second"]] = 0.5
    scores[2, [at[" blue"], at[" bar"]]] = 1.0

    def fake_scores(model, scenes, where):
        assert where
        yield {"size": [256, 256]}, scores, words

    monkeypatch.setattr(diagnostics, "token_scores", fake_scores)
    monkeypatch.setattr(diagnostics, "load_scenes", lambda path: [{}])
    figures = diagnostics.token_accuracy("demo", "eval.jsonl", 10, where=True)
    assert {kind: row["right"] for kind, row in figures.items()} == {
        "background": 1.0, "bar": 1.0, "shape": 1.0, "shape: column": 1.0, "shape: row": 0.0,
        "shape: column and row": 0.0}
