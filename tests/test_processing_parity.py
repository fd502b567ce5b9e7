"""Parity with transformers' SmolVLMProcessor (PIL image backend) built from the same local folder.

Every image scikit-image ships (as PIL images through the whole pipeline, as numpy arrays through the conversion),
made-up sizes, PIL modes, both tile families, splitting on and off, batches, chat-driven encoding, both folder
layouts and folders we save: input_ids, attention_mask and pixel_attention_mask identical, pixel_values within 1e-5
(they come out bit-identical).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import processing_fixtures as pf
from smolvlm.processing import Processor, Tokenizer
from smolvlm.processing.image import ImageProcessorConfig, load_image, normalization_table

pytestmark = pytest.mark.filterwarnings("ignore")
SETTINGS = [("512", True), ("384", True), ("512", False), ("384", False)]  # (tile family, image splitting)


def _skimage_samples() -> list[tuple[str, np.ndarray]]:
    """(name, array) for every sample image bundled with scikit-image (those needing a download are skipped)."""
    import skimage.data

    samples = []
    for name in sorted(skimage.data.__all__):
        loader = getattr(skimage.data, name)
        if name in ("data_dir", "download_all", "file_hash", "lbp_frontal_face_cascade_filename", "cells3d"):
            continue
        try:
            array = loader()
        except Exception:  # not bundled: fetched on demand through pooch
            continue
        if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
            array = array[0]
        if name == "lfw_subset":  # a stack of 200 faces: take one
            array = array[0]
        samples.append((name, array))
    return samples


SAMPLES = _skimage_samples()


def _pil(array: np.ndarray) -> Image.Image:
    """The sample as a PIL image (floats in [0, 1] as 8-bit grey)."""
    if array.dtype.kind == "f":
        array = (array * 255).round().astype(np.uint8)
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    """make(family, splitting=True, layout='v4', variant='256m', **overrides) -> (ours, reference), cached."""
    cache = {}

    def build(family="512", splitting=True, layout="v4", variant="256m", **overrides):
        key = (family, splitting, layout, variant, repr(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"proc{family}")
            pf.write_processor_folder(folder, family, layout, variant, do_image_splitting=splitting, **overrides)
            cache[key] = (Processor.from_pretrained(folder), pf.reference_processor(folder))
        return cache[key]

    return build


def assert_same(ours, reference_out) -> None:
    """Our Batch equals a transformers BatchFeature (ids/masks exactly, pixels within 1e-5)."""
    assert torch.equal(ours.input_ids, reference_out["input_ids"])
    assert torch.equal(ours.attention_mask, reference_out["attention_mask"])
    if "pixel_values" not in reference_out:
        assert ours.pixel_values is None
        return
    assert ours.pixel_values.shape == reference_out["pixel_values"].shape
    assert ours.pixel_values.dtype == torch.float32
    assert (ours.pixel_values - reference_out["pixel_values"]).abs().max().item() <= 1e-5
    assert torch.equal(ours.pixel_attention_mask, reference_out["pixel_attention_mask"].bool())


def run_both(make, images, text="User:<image>Describe.<end_of_utterance>\nAssistant:", **kwargs):
    ours, ref = make(**kwargs)
    texts = [text] * len(images) if isinstance(images[0], list) else [text]
    images = images if isinstance(images[0], list) else [images]
    return ours(texts, images), ref(text=texts, images=images, return_tensors="pt")


@pytest.mark.parametrize("index", range(len(SAMPLES)), ids=[name for name, _ in SAMPLES])
def test_skimage_sample_pil(make, index):
    """Each sample through the whole pipeline; settings rotate over both families and splitting on/off."""
    name, array = SAMPLES[index]
    family, splitting = SETTINGS[index % len(SETTINGS)]
    ours, ref = run_both(make, [_pil(array)], family=family, splitting=splitting)
    assert_same(ours, ref)


@pytest.mark.parametrize("index", range(len(SAMPLES)), ids=[name for name, _ in SAMPLES])
def test_skimage_sample_numpy(make, index):
    """Each sample as the numpy array skimage returns; a config with one resize keeps this cheap.

    2-D arrays (which transformers rejects) are compared with their (H, W, 1) form, which it accepts. Float arrays
    are not compared here: see test_float_arrays_skip_the_reference_double_rescale.
    """
    name, array = SAMPLES[index]
    if array.dtype.kind == "f":
        pytest.skip("float input: covered by test_float_arrays_skip_the_reference_double_rescale")
    reference_input = array[:, :, None] if array.ndim == 2 else array
    ours_proc, ref_proc = make("512", splitting=False, do_resize=False)
    ours = ours_proc(["<image>"], [[array]])
    ref = ref_proc(text=["<image>"], images=[[reference_input]], return_tensors="pt")
    assert_same(ours, ref)


def test_numpy_rgba_through_whole_pipeline(make):
    """The float alpha compositing of arrays, through splitting (logo is the RGBA sample)."""
    logo = dict(SAMPLES)["logo"]
    assert logo.shape[2] == 4
    ours, ref = run_both(make, [logo], family="512", splitting=True)
    assert_same(ours, ref)


def test_float_arrays_skip_the_reference_double_rescale(make):
    """A float [0, 1] image: we scale it to uint8 once (as the reference's resize does) and normalize that.

    The reference hands its resized pixels back in [0, 1] and then applies rescale_factor again, so its values are
    ((v / 255) / 255 - 0.5) / 0.5, all within 0.008 of -1. We show that formula holds for the reference, and that
    ours equals the reference given the same uint8 image.
    """
    phantom = dict(SAMPLES)["shepp_logan_phantom"]
    assert phantom.dtype == np.float64 and phantom.max() <= 1
    ours_proc, ref_proc = make("512", splitting=False, do_resize=False)
    ours = ours_proc(["<image>"], [[phantom]])
    as_uint8 = np.asarray(load_image(phantom))
    same_uint8 = ref_proc(text=["<image>"], images=[[as_uint8]], return_tensors="pt")
    assert_same(ours, same_uint8)

    ref = ref_proc(text=["<image>"], images=[[phantom[:, :, None]]], return_tensors="pt")
    resized = np.asarray(Image.fromarray(as_uint8).resize((512, 512), Image.Resampling.LANCZOS))
    double = ((resized.astype(np.float64) / 255).astype(np.float32) / np.float32(255) - 0.5) / 0.5
    expected = torch.from_numpy(double.transpose(2, 0, 1).astype(np.float32))
    assert torch.allclose(ref["pixel_values"][0, 0], expected, atol=1e-6)
    largest = (ref["pixel_values"] - ours.pixel_values).abs().max().item()
    assert 1.9 < largest < 2.0  # white (1.0 ours) vs -0.992 (reference): the double rescale, nothing else


SIZES = [(1, 1), (1, 4000), (4000, 1), (383, 385), (512, 512), (2048, 1536), (5000, 3000)]  # (height, width)


def _noise(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("family", ["512", "384"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_made_up_sizes_split(make, size, family):
    ours, ref = run_both(make, [_noise(*size)], family=family, splitting=True)
    assert_same(ours, ref)


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_made_up_sizes_single_view(make, size):
    family = "512" if sum(size) % 2 else "384"
    ours, ref = run_both(make, [_noise(*size, seed=1)], family=family, splitting=False)
    assert_same(ours, ref)


def _mode_image(mode: str) -> Image.Image:
    base = _noise(37, 53, seed=2)
    if mode == "P+transparency":
        image = base.convert("P")
        image.info["transparency"] = 7
        return image
    if mode in ("I;16", "I", "F"):
        grey = np.asarray(base.convert("L"), dtype=np.int32) * (200 if mode == "I;16" else 3)
        image = Image.fromarray(grey.astype(np.uint16) if mode == "I;16" else grey)
        return image if mode != "F" else image.convert("F")
    if mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = np.asarray(base.convert("RGBA")).copy()
        rgba[..., 3] = np.linspace(0, 255, rgba.shape[1], dtype=np.uint8)[None, :]
        return Image.fromarray(rgba, "RGBA").convert(mode)
    return base.convert(mode)


@pytest.mark.parametrize(
    "mode", ["1", "L", "LA", "P", "P+transparency", "PA", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "I;16", "I", "F"]
)
def test_pil_modes(make, mode):
    image = _mode_image(mode)
    ours, ref = run_both(make, [image], family="512", splitting=True, size={"longest_edge": 1024})
    assert ours.pixel_values.shape[1] == 5  # 2x2 tiles + global: cheap but still split
    assert_same(ours, ref)


def test_exif_orientation_from_a_path(make, tmp_path):
    """A JPEG whose EXIF says 'rotate 90': both sides get the upright (transposed) image from a path."""
    image = _noise(60, 100, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    assert load_image(path).size == (60, 100)  # (width, height) after the transpose
    ours_proc, ref_proc = make("512", splitting=True, size={"longest_edge": 1024})
    ours = ours_proc(["<image>"], [[str(path)]])
    ref = ref_proc(text=["<image>"], images=[[str(path)]], return_tensors="pt")
    assert_same(ours, ref)


@pytest.mark.parametrize("kind", ["bytes", "data_url", "pathlib"])
def test_encoded_inputs_match_the_decoded_image(make, tmp_path, kind):
    image = _noise(90, 70, seed=4)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    (tmp_path / "x.png").write_bytes(data)
    source = {"bytes": data, "pathlib": tmp_path / "x.png",
              "data_url": "data:image/png;base64," + __import__("base64").b64encode(data).decode()}[kind]  # fmt: skip
    ours_proc, ref_proc = make("512", splitting=True, size={"longest_edge": 1024})
    assert_same(ours_proc(["<image>"], [[source]]), ref_proc(text=["<image>"], images=[[image]], return_tensors="pt"))


def test_batch_of_prompts_with_different_image_counts(make):
    """Left padding, tiles padded across samples (a text-only sample gets all-zero tiles and a False mask)."""
    ours_proc, ref_proc = make("512", splitting=True, size={"longest_edge": 1024})
    ref_proc.tokenizer.padding_side = "left"
    texts = ["No image here, just a longer piece of text to pad against.", "<image>One.", "<image><image>Two!"]
    images = [[], [_noise(300, 500, 5)], [_noise(50, 40, 6), _noise(700, 300, 7)]]
    ours = ours_proc(texts, images)
    ref = ref_proc(text=texts, images=images, padding=True, return_tensors="pt")
    assert_same(ours, ref)
    assert ours.attention_mask[0, 0] == 0 and ours.attention_mask[0, -1] == 1 and ours.attention_mask[2].all()
    assert not ours.pixel_attention_mask[0].any() and (ours.pixel_values[0] == 0).all()


def test_text_only(make):
    ours_proc, ref_proc = make("512")
    assert_same(ours_proc(["Hello, world 123!"]), ref_proc(text=["Hello, world 123!"], return_tensors="pt"))


def test_encode_chat_matches_apply_chat_template(make):
    """Messages carrying PIL images → the same tensors as transformers' apply_chat_template(tokenize=True)."""
    ours_proc, ref_proc = make("384", splitting=True, size={"longest_edge": 768})
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image", "image": _noise(200, 300, 8)},
                                     {"type": "text", "text": "And this one?"},
                                     {"type": "image", "image": _noise(400, 100, 9)}]},
    ]  # fmt: skip
    ours = ours_proc.encode_chat(conversation, add_generation_prompt=True)
    ref = ref_proc.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert_same(ours, ref)


def test_v5_layout_reads_the_same(make):
    v4, ref = make("384", layout="v4")
    v5, _ = make("384", layout="v5")
    assert v5.image_config.to_dict() == {**v4.image_config.to_dict(), "image_processor_type": "SmolVLMImageProcessor",
                                         "processor_class": "SmolVLMProcessor"}  # fmt: skip
    assert (v5.image_seq_len, v5.chat_template) == (v4.image_seq_len, v4.chat_template)
    assert v5.tokenizer.special_tokens == v4.tokenizer.special_tokens
    image = _noise(500, 700, 10)
    assert_same(v5(["<image>"], [[image]]), ref(text=["<image>"], images=[[image]], return_tensors="pt"))


def test_2b_tokenizer_spells_row_tokens_as_text(make):
    """SmolVLM-Instruct (2.2B) has no <row_r_col_c> / <global-img> tokens: the expansion is tokenized as text."""
    ours_proc, ref_proc = make("384", variant="2.2b", size={"longest_edge": 768})
    assert ours_proc.tokenizer.backend.token_to_id("<row_1_col_1>") is None
    ours, ref = run_both(make, [_noise(300, 700, 11)], family="384", variant="2.2b", size={"longest_edge": 768})
    assert_same(ours, ref)


def test_saved_folder_loads_in_transformers(make, tmp_path):
    """save() → transformers' PIL image processor, tokenizer (AutoTokenizer too) and processor dict read it back."""
    from transformers import AutoTokenizer

    ours_proc, ref_proc = make("512", splitting=True, size={"longest_edge": 1024})
    ours_proc.save(tmp_path)
    reloaded_ref = pf.reference_processor(tmp_path)
    reloaded = Processor.from_pretrained(tmp_path)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = reloaded_ref.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == ref_proc.apply_chat_template(conversation, add_generation_prompt=True)
    image = _noise(333, 444, 12)
    expected = ref_proc(text=[prompt], images=[[image]], return_tensors="pt")
    assert_same(ours_proc([prompt], [[image]]), reloaded_ref(text=[prompt], images=[[image]], return_tensors="pt"))
    assert_same(reloaded([prompt], [[image]]), expected)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Hi <image> there <end_of_utterance> 42"
    assert auto(text)["input_ids"] == ours_proc.tokenizer.encode(text)
    assert auto.pad_token == "<|im_end|>" and auto.eos_token == "<end_of_utterance>"


TOKENIZER_TEXTS = [
    "Hello world",
    "  leading and   multiple   spaces\n\nnew lines\ttabs",
    "numbers 1234567890 and 3.14159",
    "unicode: café, naïve, 日本語, emoji 🙂👍",
    "def f(x):\n    return x ** 2  # code",
    "<|im_start|>User:<image>What?<end_of_utterance>\nAssistant:",
    "<fake_token_around_image><row_1_col_2><global-img><|reserved_special_token_3|>",
    "",
]


@pytest.mark.parametrize("text", TOKENIZER_TEXTS)
def test_tokenizer_encode_decode(make, text):
    ours_proc, ref_proc = make("512")
    ours, ref = ours_proc.tokenizer, ref_proc.tokenizer
    ids = ours.encode(text)
    assert ids == ref(text)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def test_tokenizer_batch_left_padding(make):
    ours_proc, ref_proc = make("512")
    texts = ["short", "a rather longer text with more tokens in it", ""]
    input_ids, attention_mask = ours_proc.tokenizer.encode_batch(texts)
    ref = ref_proc.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(input_ids, ref["input_ids"]) and torch.equal(attention_mask, ref["attention_mask"])
    assert input_ids[0, 0].item() == ours_proc.tokenizer.pad_token_id == ref_proc.tokenizer.pad_token_id


def test_tokenizer_from_built_object_with_id_special_tokens(make):
    """The GGUF path: a built tokenizers.Tokenizer plus special tokens given by id, and a template string."""
    ours_proc, _ = make("512")
    backend = pf.build_tokenizer()
    special = {"bos_token_id": 1, "eos_token": "<end_of_utterance>", "pad_token_id": 2, "unk_token_id": 0}
    tokenizer = Tokenizer(backend, special, chat_template=pf.SMOLVLM_CHAT_TEMPLATE)
    assert (tokenizer.bos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.eos_token_id == ours_proc.tokenizer.eos_token_id
    assert tokenizer.encode("Hi <image> 12") == ours_proc.tokenizer.encode("Hi <image> 12")


def test_normalization_table_is_the_reference_float_math():
    """The lookup table holds exactly float32(float64(v) * (1/255)), then (x - mean) / std in float32."""
    config = ImageProcessorConfig(image_mean=(0.1, 0.2, 0.3), image_std=(0.4, 0.5, 0.6))
    table = normalization_table(config)
    from transformers.image_transforms import normalize, rescale

    levels = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256))
    expected = normalize(rescale(levels, 1 / 255), config.image_mean, config.image_std, input_data_format="channels_first")
    assert np.array_equal(table, expected[:, 0, :])


@pytest.mark.parametrize("add_bos, add_eos", [(True, False), (False, True), (True, True), (False, False)])
def test_tokenizer_bos_eos_flags_without_tokenizer_json(add_bos, add_eos):
    """Built from a tokenizer object (the GGUF path), explicit add_bos/eos flags act as in transformers."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    special = {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|im_end|>"}
    flags = {"add_bos_token": add_bos, "add_eos_token": add_eos}
    ours = Tokenizer(pf.build_tokenizer(), special, config=flags)
    ref = TokenizersBackend(tokenizer_object=pf.build_tokenizer(), **special, **flags)
    for text in ("hi there", "<image> 12"):
        assert ours.encode(text) == ref(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
