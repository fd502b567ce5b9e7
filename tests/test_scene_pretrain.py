"""Dense scene labels and `smolvlm train --objective scene` (the vision tower's first stage)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from smolvlm.errors import ConfigError, DataError
from smolvlm.train import synthetic
from smolvlm.train.commands import train_main
from smolvlm.model.connector import pixel_shuffle
from smolvlm.train.scene_labels import (
    CHAR_CLASSES, CHARACTERS, N_CLASSES, NO_WORD, SHAPE_CLASSES, instance_map, patch_targets, slack_tokens,
    token_word_list, token_words,
)
from smolvlm.train.scene_pretrain import align_losses, resolve_slack, word_ce
from smolvlm.train.synthetic import COLOURS, SHAPES, render_scene
from smolvlm.train.trainer import TrainConfig, train
from test_trainer import synthetic_set, trainable_checkpoint


def _scene(task: str, seed: int) -> dict:
    return synthetic.generate_sample(task, random.Random(seed))[3]["images"][0]


@pytest.mark.parametrize("seed", range(6))
def test_shape_labels_cover_exactly_the_drawn_pixels(seed):
    scene = _scene("count", seed)
    ids, instances = instance_map(scene)
    image = np.asarray(render_scene(scene)).astype(int)
    background = np.asarray(render_scene({**scene, "objects": []})).astype(int)
    drawn = np.abs(image - background).sum(-1) > 0
    assert np.array_equal(drawn, ids > 0)
    for k, obj in enumerate(scene["objects"], 1):
        label = SHAPE_CLASSES + SHAPES.index(obj["shape"]) * len(COLOURS) + list(COLOURS).index(obj["colour"])
        assert instances[k - 1].label == label and instances[k - 1].countable
        ys, xs = np.nonzero(ids == k)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == obj["box"]  # shapes span their box exactly
        assert np.all(image[ys, xs] == obj["rgb"])


@pytest.mark.parametrize("seed", range(6))
def test_sign_characters_are_labelled_in_reading_order(seed):
    scene = _scene("ocr", seed)
    ids, instances = instance_map(scene)
    chars = [CHARACTERS[i.label - CHAR_CLASSES] for i in instances if i.label >= CHAR_CLASSES]
    assert "".join(chars) == "".join(scene["sign"]["lines"]).replace(" ", "")
    lefts = [i.box[0] for i in instances if i.label >= CHAR_CLASSES]
    assert len(set(lefts)) == len(lefts)
    image = np.asarray(render_scene(scene)).astype(int)
    text_rgb = np.array(scene["sign"]["text_rgb"])
    on_text = ids > 0
    on_text &= np.isin(ids, [k for k, i in enumerate(instances, 1) if i.label >= CHAR_CLASSES])
    assert np.abs(image[on_text] - text_rgb).sum(-1).mean() < 60  # character pixels are (mostly) ink


def test_patch_targets_summarise_the_map():
    scene = _scene("grounding", 3)
    targets = patch_targets(scene, 16)
    assert targets.classes.shape == (256, N_CLASSES)
    np.testing.assert_allclose(targets.classes.sum(1), 1.0, rtol=1e-6)
    assert targets.centres.sum() == len(scene["objects"])
    for obj in scene["objects"]:
        x0, y0, x1, y1 = obj["box"]
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        patch = (cy // 16) * 16 + cx // 16
        assert targets.has_box[patch]
        np.testing.assert_allclose(targets.boxes[patch], np.array(obj["box"]) / 256, atol=1e-6)
    with pytest.raises(DataError, match="patch size"):
        patch_targets(scene, 24)


@pytest.mark.parametrize("connector, workers, compile, where, precision", [
    ("frozen", 0, False, False, "auto"), ("full", 2, True, False, "auto"), ("full", 0, False, True, "bf16")])
def test_scene_stage_trains_the_vision_tower_and_aligns_the_connector(tmp_path, connector, workers, compile, where,
                                                                      precision):
    torch.set_num_threads(1)
    ckpt = trainable_checkpoint(tmp_path / "ckpt")
    data = synthetic_set(tmp_path / "data", 48, tasks="colour,count,ocr,chart")
    out = tmp_path / "scene"
    metrics = train(TrainConfig(objective="scene", model=str(ckpt), data=str(data), out=str(out), vision="full",
                                connector=connector, lr=3e-3, max_steps=40, batch_size=16, warmup_steps=2,
                                eval_data=str(data), progress=False, data_workers=workers, compile=compile,
                                centre_slack=3.0 if connector == "full" else 0.0, where_words=where,
                                precision=precision))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    first, last = log[0], [r for r in log if "class_ce" in r][-1]
    assert last["step"] == 40
    assert last["class_ce"] < 0.7 * first["class_ce"] and last["box_l1"] < first["box_l1"]
    assert metrics["eval"]["class_ce"] < first["class_ce"]
    before, after = load_file(str(ckpt / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    parts = ("model.vision_model.", "model.connector.") if connector == "full" else ("model.vision_model.",)
    assert changed and all(k.startswith(parts) for k in changed)
    assert any(k.startswith("model.connector.") for k in changed) == (connector == "full")
    if connector == "full":
        assert last["align_mse"] < 0.5 * first["align_mse"] and last["align_ce"] < first["align_ce"]
        assert last["align_acc"] > first["align_acc"]
    else:
        assert "align_mse" not in last
    assert (out / "final" / "processor_config.json").is_file()


def test_scene_stage_errors(tmp_path, capsys):
    ckpt = trainable_checkpoint(tmp_path / "ckpt")
    data = synthetic_set(tmp_path / "data", 4)
    common = ["--objective", "scene", "--model", str(ckpt), "--out", str(tmp_path / "o"), "--max-steps", "1"]
    assert train_main([*common, "--data", str(data)]) == 2  # vision frozen by default
    assert "--vision full" in capsys.readouterr().err
    assert train_main([*common, "--data", str(data), "--vision", "full", "--connector", "lora"]) == 2
    assert "--connector full or frozen" in capsys.readouterr().err
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert train_main([*common, "--vision", "full", "--data", str(plain)]) == 2
    assert "meta.images" in capsys.readouterr().err
    assert train_main([*common, "--vision", "full", "--data", str(data), "--save-every", "1"]) == 2
    assert "writes OUT/final only" in capsys.readouterr().err
    for policy in (["--connector", "frozen"], ["--objective", "lm"]):
        assert train_main([*common, "--vision", "full", "--data", str(data), "--centre-slack", "2", *policy]) == 2
        assert "--centre-slack (pixels, >= 0) places" in capsys.readouterr().err
        assert train_main([*common, "--vision", "full", "--data", str(data), "--where-words", *policy]) == 2
        assert "--where-words adds words" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse names the choices
        train_main([*common, "--vision", "full", "--data", str(data), "--objective", "pixels"])
    assert "choose from 'lm', 'scene'" in capsys.readouterr().err
    split = json.loads((ckpt / "preprocessor_config.json").read_text())
    split["do_image_splitting"] = True
    (ckpt / "preprocessor_config.json").write_text(json.dumps(split))
    with pytest.raises(ConfigError, match="one unresized tile"):
        train(TrainConfig(objective="scene", model=str(ckpt), data=str(data), out=str(tmp_path / "o"),
                          vision="full", max_steps=1, batch_size=2, progress=False))


def test_image_tokens_are_row_major_regions_in_connector_order():
    side, scale = 8, 2
    index = torch.arange(side * side, dtype=torch.float32)[None, :, None]  # (1, P, 1): each patch's own index
    tokens = pixel_shuffle(index, scale)[0].long()  # (T, s²): the patches folded into each token, connector order
    grid = side // scale
    for t, patches in enumerate(tokens.tolist()):
        row, col = divmod(t, grid)  # token_words' order: regions row by row
        expected = {(row * scale + i) * side + col * scale + j for i in range(scale) for j in range(scale)}
        assert set(patches) == expected


def _words(scene: dict, token_size: int, where: bool = False) -> list[str]:
    """Each token's words joined with "+" (" red+ circle")."""
    table = token_word_list(where)
    return ["+".join(table[i] for i in row if i != NO_WORD) for row in token_words(scene, token_size, where=where)]


def test_token_words_say_each_thing_at_its_centre():
    scene = {**_scene("colour", 0), "objects": [
        {"shape": "star", "colour": "green", "rgb": [0, 160, 0], "box": [70, 10, 110, 50]},  # centre (90, 30)
        {"shape": "circle", "colour": "red", "rgb": [200, 0, 0], "box": [200, 200, 240, 240]},  # centre (220, 220)
    ]}
    words = _words(scene, 32)  # an 8 x 8 grid of tokens
    assert words[0 * 8 + 2] == " green+ star"
    assert words[6 * 8 + 6] == " red+ circle"
    assert sum(w != " background" for w in words) == 2


def test_where_words_name_the_cell_of_a_shapes_centre():
    scene = {**_scene("colour", 0), "objects": [
        {"shape": "star", "colour": "green", "rgb": [0, 160, 0], "box": [70, 10, 110, 50]},  # centre (90, 30)
        {"shape": "circle", "colour": "red", "rgb": [200, 0, 0], "box": [200, 200, 240, 256]},  # centre (220, 228)
    ]}
    assert token_word_list(True)[: len(token_word_list())] == token_word_list()  # old ids keep their words
    assert token_words(scene, 32, where=True).shape == (64, 4)
    words = _words(scene, 32, where=True)
    assert words[0 * 8 + 2] == " green+ star+ five+ second"  # 16-px cell (5, 1)
    assert words[7 * 8 + 6] == " red+ circle+ thirteen+ fifteenth"  # (13, 14)
    assert sum(w != " background" for w in words) == 2
    for task in ("ocr", "chart"):  # characters and bars say what they said
        other = _scene(task, 1)
        assert _words(other, 32, where=True) == _words(other, 32)


def test_align_losses_split_a_token_evenly_over_its_words():
    torch.manual_seed(0)
    table = torch.randn(40, 256)
    words = torch.tensor([[[0, NO_WORD, NO_WORD, NO_WORD], [3, 9, 20, 33], [5, 7, NO_WORD, NO_WORD]]])  # (1, 3, 4)
    tokens = torch.stack([table[0], table[[3, 9, 20, 33]].sum(0), table[5] + table[7]])[None]  # exact targets
    losses = align_losses(tokens, words, table)
    assert float(losses["align_mse"]) == pytest.approx(0.0, abs=1e-6) and float(losses["word_acc"]) == 1.0
    log_probs = (tokens @ table.T).log_softmax(-1)
    expected = -log_probs[0, 1, [3, 9, 20, 33]].mean()  # a quarter of the target on each of the four words
    assert float(word_ce(log_probs, words)[0, 1]) == pytest.approx(float(expected), rel=1e-6)
    tokens[0, 1] = table[[3, 9, 20]].sum(0)  # one word short: its four nearest words are not its four
    assert float(align_losses(tokens, words, table)["word_acc"]) == pytest.approx(0.5)


def test_token_words_keep_the_first_claim_and_read_characters():
    scene = {**_scene("colour", 0), "objects": [
        {"shape": "square", "colour": "blue", "rgb": [0, 0, 200], "box": [0, 0, 30, 30]},  # token 0
        {"shape": "diamond", "colour": "black", "rgb": [0, 0, 0], "box": [2, 2, 28, 28]},  # token 0 too: unsaid
        {"shape": "star", "colour": "red", "rgb": [200, 0, 0], "box": [34, 0, 60, 30]},  # token 1
    ]}
    assert _words(scene, 32)[:3] == [" blue+ square", " red+ star", " background"]
    sign = _scene("ocr", 3)
    said = [w for w in _words(sign, 16) if w != " background"]
    letters = "".join(c for line in sign["sign"]["lines"] for c in line.upper() if c.isalnum())
    assert "".join(w.strip() for w in said) == letters  # 16-px tokens: one per character, in reading order
    with pytest.raises(DataError, match="multiple"):
        token_words(sign, 48)


@pytest.mark.parametrize("task", ["ocr", "text"])
@pytest.mark.parametrize("size", [256, 128])
def test_monospace_signs_give_every_character_a_token_of_its_own(size, task):
    # With proportional text two narrow letters often share a 32-px token, so the second goes unsaid; a monospaced
    # sign's cells are at least 1/8 of the picture wide, so on 8 x 8 tokens every character is said, in order.
    for seed in range(40):
        scene = synthetic.generate_sample(task, random.Random(seed), size, signs="monospace")[3]["images"][0]
        pitch = scene["sign"]["pitch"]
        assert size // 8 <= pitch <= 0.16 * size
        said = [w for w in _words(scene, size // 8) if w != " background"]
        letters = "".join(c for line in scene["sign"]["lines"] for c in line if c.isalnum())
        assert "".join(w.strip() for w in said) == letters
        ids, instances = instance_map(scene)
        chars = [i for i in instances if i.label >= CHAR_CLASSES]
        line_rows = {c.centre()[1] for c in chars}
        assert line_rows <= {float(y) for _, y in scene["sign"]["centres"]}  # named on their line's centre row
        centres = sorted(c.centre()[0] for c in chars if c.centre()[1] == chars[0].centre()[1])
        assert all(b - a >= pitch for a, b in zip(centres, centres[1:]))


def test_slack_tokens_offer_the_other_side_of_a_near_border():
    scene = {**_scene("count", 0), "objects": [
        {"shape": "circle", "colour": "red", "rgb": [200, 0, 0], "box": [46, 100, 84, 138]},  # centre (65, 119)
        {"shape": "star", "colour": "blue", "rgb": [0, 0, 200], "box": [143, 143, 177, 177]},  # centre (160, 160)
        {"shape": "square", "colour": "green", "rgb": [0, 160, 0], "box": [180, 28, 220, 68]},  # centre (200, 48)
    ]}
    rows = slack_tokens(scene, 32, 3.0).tolist()
    circle = 3 * 8 + 2  # (65, 119): column 2, 1 px right of the border with column 1; row 3
    corner = 5 * 8 + 5  # (160, 160): the corner of four tokens
    assert sorted(rows) == sorted([[circle, circle - 1, -1, -1], [corner, corner - 9, corner - 8, corner - 1]])
    assert slack_tokens(scene, 32, 0.5).tolist() == [[corner, corner - 9, corner - 8, corner - 1]]


def test_resolve_slack_says_a_thing_once_where_its_tokens_lean():
    table = torch.randn(6, 16)
    words = torch.tensor([[[0, NO_WORD], [1, 4], [0, NO_WORD], [0, NO_WORD]]])  # (1, T=4, 2): token 1 says 1 + 4
    tokens = torch.zeros(1, 4, 16)
    tokens[0, 0] = 8 * (table[1] + table[4])  # the tower already says the thing at token 0, the other side
    tokens[0, 1] = 8 * table[0]
    log_probs = (tokens @ table.T).log_softmax(-1)
    slack = torch.tensor([[[1, 0, -1, -1], [-1, -1, -1, -1]]])  # (1, K=2, 4): one thing, padding
    moved = resolve_slack(log_probs, words, slack)
    assert moved.tolist() == [[[1, 4], [0, NO_WORD], [0, NO_WORD], [0, NO_WORD]]]
    tokens[0, 0], tokens[0, 1] = tokens[0, 1].clone(), tokens[0, 0].clone()  # leaning to its own token: stays
    assert torch.equal(resolve_slack((tokens @ table.T).log_softmax(-1), words, slack), words)
    losses = align_losses(tokens, words, table, slack)
    assert float(losses["word_acc"]) == 1.0
