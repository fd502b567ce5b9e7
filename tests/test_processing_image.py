"""Image pipeline units: size arithmetic, tiles, prompt expansion, input kinds, configs and batching."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import processing_fixtures as pf
from smolvlm.processing import Batch, ImageProcessorConfig, Processor, expand_image_markers, image_prompt, load_image
from smolvlm.processing.image import (
    ImageTiles,
    batch_tiles,
    resize_for_longest_edge,
    resize_to_tile_multiple,
    split_image,
    to_rgb,
)

CONFIG_512 = ImageProcessorConfig.from_dict(pf.image_processor_config("512"))


def _noise(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_worked_example_100x80():
    """A 100x80 (W x H) image → 1638x2048 (H x W) → 2048x2048 → 4x4 tiles + global: 17 tiles, 1088 image tokens."""
    assert resize_for_longest_edge(80, 100, 2048) == (1638, 2048)
    assert resize_to_tile_multiple(1638, 2048, 512) == (2048, 2048)
    tiles = split_image(_noise(80, 100), CONFIG_512)
    assert (tiles.rows, tiles.cols, len(tiles.tiles)) == (4, 4, 17)
    assert all(t.shape == (512, 512, 3) for t in tiles.tiles)
    prompt = image_prompt(tiles.rows, tiles.cols, 64)
    assert prompt.count("<image>") == 1088 and prompt.count("<fake_token_around_image>") == 18


@pytest.mark.parametrize(
    "height, width, longest, expected",
    [
        (1, 1, 2048, (2048, 2048)),
        (1, 4000, 2048, (1, 2048)),  # 2048/4000 truncates to 0, raised to the 1-pixel minimum
        (4000, 1, 2048, (2048, 1)),
        (383, 385, 2048, (2038, 2048)),  # 2037 rounded up to even
        (3000, 5000, 1536, (922, 1536)),
        (100, 200, 6000, (2048, 4096)),  # capped at the absolute maximum 4096, aspect kept
    ],
)
def test_resize_for_longest_edge(height, width, longest, expected):
    assert resize_for_longest_edge(height, width, longest) == expected


def test_small_image_without_split_needs_no_grid():
    config = ImageProcessorConfig.from_dict({**pf.image_processor_config("384"), "size": {"longest_edge": 384}})
    tiles = split_image(_noise(100, 150), config)
    assert (tiles.rows, tiles.cols, len(tiles.tiles)) == (0, 0, 1) and tiles.tiles[0].shape == (384, 384, 3)


def test_global_view_is_the_whole_image_squeezed_to_one_tile():
    image = _noise(1000, 3000)
    tiles = split_image(image, CONFIG_512)
    assert (tiles.rows, tiles.cols) == (2, 4)  # (H, W) 1000x3000 → 682x2048 → 1024x2048
    stage = image.resize((2048, 682), Image.Resampling.LANCZOS).resize((2048, 1024), Image.Resampling.LANCZOS)
    assert np.array_equal(tiles.tiles[5], np.asarray(stage)[512:, 512:1024])  # row 2, column 2
    assert np.array_equal(tiles.tiles[-1], np.asarray(stage.resize((512, 512), Image.Resampling.LANCZOS)))


def test_single_view_when_splitting_is_off():
    config = ImageProcessorConfig.from_dict({**pf.image_processor_config("512"), "do_image_splitting": False})
    tiles = split_image(_noise(300, 900), config)
    assert (tiles.rows, tiles.cols, len(tiles.tiles)) == (0, 0, 1) and tiles.tiles[0].shape == (512, 512, 3)


def test_image_prompt_patterns():
    single = image_prompt(0, 0, 3)
    assert single == "<fake_token_around_image><global-img><image><image><image><fake_token_around_image>"
    grid = image_prompt(2, 3, 1)
    rows = grid.split("\n")
    assert rows[0] == "".join(f"<fake_token_around_image><row_1_col_{c}><image>" for c in (1, 2, 3))
    assert rows[1] == "".join(f"<fake_token_around_image><row_2_col_{c}><image>" for c in (1, 2, 3))
    assert rows[2] == "" and rows[3] == single.replace("<image><image><image>", "<image>")


def test_expand_image_markers_in_order():
    out = expand_image_markers(["a<image>b<image>c", "none"], [["[1]", "[2]"], []])
    assert out == ["a[1]b[2]c", "none"]


def test_input_kinds_decode_to_the_same_pixels(tmp_path):
    image = _noise(30, 40)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    (tmp_path / "x.png").write_bytes(buffer.getvalue())
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    expected = np.asarray(image)
    for source in (image, np.asarray(image), str(tmp_path / "x.png"), tmp_path / "x.png", buffer.getvalue(), data_url):
        assert np.array_equal(np.asarray(to_rgb(load_image(source))), expected)


def test_exif_orientation_applies_to_pil_inputs_too():
    """An EXIF-rotated photo opened with PIL comes out upright (transformers leaves PIL inputs as they are)."""
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 CCW to display
    _noise(20, 50).save(buffer, format="JPEG", exif=exif)
    opened = Image.open(io.BytesIO(buffer.getvalue()))
    assert opened.size == (50, 20) and load_image(opened).size == (20, 50)


def test_alpha_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent → white
    rgba[0, 1] = (10, 20, 30, 255)  # opaque → itself
    assert np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))[0].tolist() == [[255, 255, 255], [10, 20, 30]]
    assert np.asarray(load_image(rgba))[0].tolist() == [[255, 255, 255], [10, 20, 30]]


def test_array_rules():
    assert np.array_equal(np.asarray(load_image(np.full((2, 2), 7, np.uint8))), np.full((2, 2, 3), 7))
    assert np.asarray(load_image(np.ones((2, 2), bool))).max() == 1  # integer-valued: taken as is (0/1)
    assert np.asarray(load_image(np.full((2, 2, 3), 0.999))).max() == 254  # floats: x255, truncated


def test_config_defaults_are_the_reference_class_defaults():
    from transformers import SmolVLMImageProcessorPil

    reference = SmolVLMImageProcessorPil()
    ours = ImageProcessorConfig()
    assert ours.longest_edge == reference.size.longest_edge and ours.tile_size == reference.max_image_size["longest_edge"]
    assert ours.resample == reference.resample and ours.rescale_factor == reference.rescale_factor
    assert list(ours.image_mean) == list(reference.image_mean) and list(ours.image_std) == list(reference.image_std)
    assert (ours.do_image_splitting, ours.do_pad) == (reference.do_image_splitting, reference.do_pad)


def test_config_round_trip_keeps_unknown_keys():
    data = {**pf.image_processor_config("384"), "video_sampling": {"fps": 1, "max_frames": 64}}
    config = ImageProcessorConfig.from_dict(data)
    assert (config.longest_edge, config.tile_size, config.resample) == (1536, 384, 1)
    assert config.to_dict() == data


def test_batch_tiles_pads_and_masks():
    config = CONFIG_512
    a = ImageTiles([np.full((4, 6, 3), 255, np.uint8)], 0, 0)
    b = ImageTiles([np.zeros((5, 5, 3), np.uint8), np.zeros((5, 5, 3), np.uint8)], 1, 1)
    pixel_values, mask = batch_tiles([[a], [b], []], config)
    assert pixel_values.shape == (3, 2, 3, 5, 6) and mask.shape == (3, 2, 5, 6) and mask.dtype == torch.bool
    assert (pixel_values[0, 0, :, :4, :6] == 1).all() and (pixel_values[0, 0, :, 4:] == 0).all()
    assert mask[0, 0, :4, :6].all() and not mask[0, 0, 4:].any() and not mask[0, 1].any()
    assert (pixel_values[1, :, :, :, :5] == -1).all() and not mask[2].any()


def test_threads_change_nothing(tmp_path):
    folder = pf.write_processor_folder(tmp_path, "384", size={"longest_edge": 768})
    images = [[_noise(200 + 50 * i, 300, i) for i in range(3)], [_noise(120, 80, 9)]]
    texts = ["<image><image><image>three", "<image>one"]
    serial = Processor.from_pretrained(folder, num_workers=1)(texts, images)
    threaded = Processor.from_pretrained(folder, num_workers=4)(texts, images)
    for name in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"):
        assert torch.equal(getattr(serial, name), getattr(threaded, name))


def test_with_image_config_and_batch_to(tmp_path):
    processor = Processor.from_pretrained(pf.write_processor_folder(tmp_path, "512"))
    single = processor.with_image_config(do_image_splitting=False)(["<image>"], [[_noise(600, 900)]])
    assert single.pixel_values.shape == (1, 1, 3, 512, 512)
    assert single.input_ids.shape[1] == 64 + 3  # fake, global, 64 x <image>, fake
    half = single.to(dtype=torch.bfloat16)
    assert isinstance(half, Batch) and half.pixel_values.dtype == torch.bfloat16 and half.input_ids.dtype == torch.long
    assert processor.image_token_id == processor.tokenizer.token_to_id("<image>")
    assert processor.stop_token_ids == [processor.tokenizer.token_to_id("<end_of_utterance>")]


def test_text_only_processor_saves_only_tokenizer_files(tmp_path):
    source = Processor.from_pretrained(pf.write_processor_folder(tmp_path / "src", "512"))
    text_only = Processor(source.tokenizer, image_config=None, chat_template=pf.SMOLVLM_CHAT_TEMPLATE)
    text_only.save(tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["chat_template.jinja", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    reloaded = Processor.from_pretrained(tmp_path / "out")
    assert reloaded.image_config is None and reloaded.chat_template == pf.SMOLVLM_CHAT_TEMPLATE
    assert reloaded.tokenizer.encode("Hi <image>!") == source.tokenizer.encode("Hi <image>!")
