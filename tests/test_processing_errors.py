"""Bad input gets a clear ImageError / PromptError that names the input and says what to do."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import processing_fixtures as pf
from smolvlm.errors import CheckpointError, ImageError, PromptError, SmolVLMError
from smolvlm.processing import Processor, Tokenizer, load_image


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    folder = pf.write_processor_folder(tmp_path_factory.mktemp("errors"), "512", size={"longest_edge": 512})
    return Processor.from_pretrained(folder, max_pixels=200 * 200)


def _jpeg(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_file_that_is_not_an_image(processor, tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels")
    with pytest.raises(ImageError, match="not an image file") as error:
        processor(["<image>"], [[str(path)]])
    assert str(path) in str(error.value) and "sample 0 image 0" in str(error.value)


def _cut(data: bytes) -> bytes:
    """The header intact, two thirds of the scan data."""
    return data[: len(data) * 2 // 3]


def test_truncated_jpeg(processor, tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(_cut(_jpeg()))
    with pytest.raises(ImageError, match="cannot decode image") as error:
        processor(["<image>"], [[path]])
    assert "cut.jpg" in str(error.value)


def test_truncated_jpeg_bytes():
    with pytest.raises(ImageError, match="bytes: cannot decode image"):
        load_image(_cut(_jpeg()))
    with pytest.raises(ImageError, match="400 bytes: cannot read image header"):
        load_image(_jpeg()[:400])


def test_truncated_jpeg_opened_lazily_by_the_caller():
    lazy = Image.open(io.BytesIO(_cut(_jpeg())))  # PIL reads only the header here
    with pytest.raises(ImageError, match="PIL image RGB 64x48: cannot decode image"):
        load_image(lazy)


@pytest.mark.parametrize("kind", ["path", "bytes", "pil", "array"])
def test_image_above_the_pixel_limit(processor, tmp_path, kind):
    """A decompression bomb is refused from its header size, before its pixels are decoded."""
    big = Image.new("RGB", (300, 300), "white")
    path = tmp_path / "big.png"
    big.save(path)
    source = {"path": path, "bytes": path.read_bytes(), "pil": big, "array": np.asarray(big)}[kind]
    with pytest.raises(ImageError, match="90000 pixels exceeds the limit of 40000") as error:
        processor(["<image>"], [[source]])
    assert "raise max_pixels" in str(error.value)
    if kind == "path":
        assert "big.png" in str(error.value)


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (1000, 1000)).save(path)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(path, max_pixels=1000)


@pytest.mark.parametrize("image", [np.zeros((0, 10, 3), np.uint8), Image.new("RGB", (0, 10))], ids=["array", "pil"])
def test_zero_size_image(processor, image):
    with pytest.raises(ImageError, match="zero size"):
        processor(["<image>"], [[image]])


def test_more_images_than_markers(processor):
    with pytest.raises(PromptError, match="1 <image> marker.*2 image") as error:
        processor(["Look <image>"], [[Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))]])
    assert "sample 0" in str(error.value)


def test_more_markers_than_images(processor):
    with pytest.raises(PromptError, match="2 <image> marker.*1 image"):
        processor(["<image> and <image>"], [[Image.new("RGB", (8, 8))]])
    with pytest.raises(PromptError, match="sample 1: the text has 1 <image> marker.*0 image"):
        processor(["text", "<image>"])  # no images at all


def test_flat_image_list_must_match_the_markers(processor):
    with pytest.raises(PromptError, match="3 <image> marker.*2 image"):
        processor(["<image>", "<image><image>"], [Image.new("RGB", (8, 8))] * 2)


def test_chat_image_part_without_an_image(processor):
    with pytest.raises(PromptError, match="message 0 part 1: image part without an image"):
        processor.encode_chat([{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image"}]}])


@pytest.mark.parametrize(
    "source, message",
    [
        ("https://example.com/cat.jpg", "http\\(s\\) URLs are not fetched here"),
        ("/no/such/picture.png", "/no/such/picture.png: image file not found"),
        ("data:image/png;base64,@@@not-base64@@@", "invalid base64"),
        ("data:image/png,rawdata", "only base64 data: URLs"),
        (42, "unsupported image input of type int"),
        (np.zeros((2, 3, 4, 5)), "expected an HW or HWC array"),
        (np.full((4, 4, 3), 2.5), "float pixel values must lie in \\[0, 1\\]"),
        (np.full((4, 4, 3), 300), "integer pixel values must lie in \\[0, 255\\]"),
        (Image.new("La", (4, 4)), "cannot convert mode La to RGB"),
    ],
    ids=["http", "missing", "bad-base64", "not-base64", "int", "4d", "float-range", "int-range", "mode"],
)
def test_unusable_sources(processor, source, message):
    with pytest.raises(ImageError, match=message):
        processor(["<image>"], [[source]])


def test_every_error_is_a_smolvlm_error_and_value_error():
    assert issubclass(ImageError, SmolVLMError) and issubclass(ImageError, ValueError)
    assert issubclass(PromptError, SmolVLMError) and issubclass(PromptError, ValueError)


def test_text_only_processor_refuses_images(processor):
    text_only = Processor(processor.tokenizer, image_config=None, chat_template=None)
    assert text_only(["plain text"]).pixel_values is None
    with pytest.raises(PromptError, match="no image settings"):
        text_only(["<image>"], [[Image.new("RGB", (8, 8))]])
    with pytest.raises(PromptError, match="no chat template"):
        text_only.encode_chat([{"role": "user", "content": "hi"}])


def test_tokenizer_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
