"""Images: decode → RGB → resize → split into tiles + a global view → rescale/normalize → padded batch.

Mirrors transformers' `SmolVLMImageProcessorPil` (the PIL backend the models were trained with) step by step, so the
pixels are identical: the same size arithmetic, the same LANCZOS resizes in the same order, the same float32
rescale/normalize (done here through a 256-entry lookup table per channel, which gives the reference's exact float32
values without its per-pixel float64 passes).

Input kinds: a path, bytes, a `data:` URL, a PIL image or a numpy array (HW or HWC, C in 1/3/4). Decoded images get
their EXIF orientation applied. Numpy arrays follow the reference's array rules (RGBA composited on white in float,
integer-valued data taken as is, floats in [0, 1] scaled by 255 and truncated) into uint8 RGB; the reference then
rescales floats a second time (its resize returns them in [0, 1] and `rescale_factor` applies again), which we do
not copy.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from smolvlm.errors import ConfigError, ImageError

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

MAX_IMAGE_SIZE = 4096  # the reference's absolute cap on either side after the first resize
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's decompression-bomb threshold


@dataclass
class ImageProcessorConfig:
    """Image processor settings; defaults are the reference class defaults (SmolVLMImageProcessorPil)."""

    do_convert_rgb: bool = True
    do_resize: bool = True
    longest_edge: int = 4 * 364  # `size.longest_edge`: the first resize target
    resample: int = Image.Resampling.LANCZOS
    do_image_splitting: bool = True
    tile_size: int = 364  # `max_image_size.longest_edge`: side of one tile
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_pad: bool = True
    # Keys of the source dict we do not model, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageProcessorConfig":
        """Build from a `preprocessor_config.json` dict (or the nested `image_processor` of processor_config.json)."""
        data = dict(data)
        kwargs: dict[str, Any] = {}
        for key in ("do_convert_rgb", "do_resize", "do_image_splitting", "do_rescale", "do_normalize", "do_pad"):
            if data.get(key) is not None:
                kwargs[key] = bool(data.pop(key))
        if data.get("size") is not None:
            kwargs["longest_edge"] = _longest_edge(data.pop("size"), "size")
        if data.get("max_image_size") is not None:
            kwargs["tile_size"] = _longest_edge(data.pop("max_image_size"), "max_image_size")
        if data.get("resample") is not None:
            kwargs["resample"] = int(data.pop("resample"))
        if data.get("rescale_factor") is not None:
            kwargs["rescale_factor"] = float(data.pop("rescale_factor"))
        for key in ("image_mean", "image_std"):
            if data.get(key) is not None:
                value = data.pop(key)
                kwargs[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
        kwargs["extra"] = {k: v for k, v in data.items() if v is not None}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The dict of a `preprocessor_config.json` that transformers' SmolVLM image processors read."""
        data = {k: v for k, v in asdict(self).items() if k not in ("extra", "longest_edge", "tile_size")}
        data.update(
            size={"longest_edge": self.longest_edge},
            max_image_size={"longest_edge": self.tile_size},
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
        )
        return {**self.extra, **data}


def _longest_edge(value: Any, name: str) -> int:
    if isinstance(value, dict) and "longest_edge" in value:
        return int(value["longest_edge"])
    if isinstance(value, int):
        return value
    raise ConfigError(f"image processor config: `{name}` must be {{'longest_edge': N}}, got {value!r}")


# ---- decoding ----


def load_image(image: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode any accepted input into a PIL image (EXIF orientation applied), refusing images above `max_pixels`."""
    label = name or _describe(image)
    if isinstance(image, Image.Image):
        pil = image
        _check_pixels(pil.size[0], pil.size[1], label, max_pixels)
        _decode_pixels(pil, label)  # a lazily opened image may still fail here
    elif isinstance(image, np.ndarray):
        pil = _array_to_pil(image, label)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        pil = _open(io.BytesIO(bytes(image)), label, max_pixels)
    elif isinstance(image, (str, os.PathLike)):
        pil = _open_source(os.fspath(image), label, max_pixels)
    else:
        raise ImageError(
            f"{label}: unsupported image input of type {type(image).__name__}; pass a path, bytes, a data: URL, "
            "a PIL image or a numpy array"
        )
    width, height = pil.size
    if width == 0 or height == 0:
        raise ImageError(f"{label}: image has zero size ({width}x{height})")
    _check_pixels(width, height, label, max_pixels)
    try:
        if pil.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return pil  # upright already (exif_transpose would copy it)
        return ImageOps.exif_transpose(pil)
    except Exception as e:  # a broken EXIF block must not hide the image
        raise ImageError(f"{label}: cannot apply EXIF orientation ({e})") from e


def _describe(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        return text if len(text) <= 80 else text[:60] + "..."
    if isinstance(image, np.ndarray):
        return f"array {image.shape} {image.dtype}"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"{len(image)} bytes"
    if isinstance(image, Image.Image):
        return f"PIL image {image.mode} {image.size[0]}x{image.size[1]}"
    return type(image).__name__


def _check_pixels(width: int, height: int, label: str, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{label}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
            "(a decompression-bomb guard); downscale the image or raise max_pixels"
        )


def _open_source(source: str, label: str, max_pixels: int | None) -> Image.Image:
    if source.startswith(("http://", "https://")):
        raise ImageError(f"{label}: http(s) URLs are not fetched here; download the image and pass its path or bytes")
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise ImageError(f"{label}: only base64 data: URLs are supported (data:image/...;base64,...)")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"{label}: invalid base64 in data: URL ({e})") from e
        return _open(io.BytesIO(raw), label, max_pixels)
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"{label}: image file not found")
    return _open(path, label, max_pixels)


def _open(source: Path | io.BytesIO, label: str, max_pixels: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
            # the header gives the size: refuse a bomb before decoding its pixels
            _check_pixels(image.size[0], image.size[1], label, max_pixels)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{label}: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{label}: not an image file Pillow can decode") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{label}: cannot read image header ({e})") from e
    _decode_pixels(image, label)
    return image


def _decode_pixels(image: Image.Image, label: str) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(f"{label}: cannot decode image ({e})") from e


def _array_to_pil(array: np.ndarray, label: str) -> Image.Image:
    """HW / HWC arrays to a uint8 PIL image with the reference's array rules."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(f"{label}: expected an HW or HWC array with 1, 3 or 4 channels")
    if array.size == 0:
        raise ImageError(f"{label}: image has zero size")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = _composite_on_white(array, label)
    return Image.fromarray(np.ascontiguousarray(_to_uint8(array, label)), mode="RGB")


def _composite_on_white(array: np.ndarray, label: str) -> np.ndarray:
    """RGBA array over white, in the reference's float arithmetic (keeps the dtype)."""
    if np.issubdtype(array.dtype, np.floating):
        if array.min() < 0.0 or array.max() > 1.0:
            raise ImageError(f"{label}: a float RGBA array must hold values in [0, 1]")
        white = 1.0
    else:
        white = 255
    alpha = array[..., 3:4] / white
    composite = alpha * array[..., :3] + (1 - alpha) * white
    return np.round(composite).astype(array.dtype) if white == 255 else composite.astype(array.dtype)


def _to_uint8(array: np.ndarray, label: str) -> np.ndarray:
    """The reference's conversion to PIL's uint8: integer-valued data as is, [0, 1] floats scaled by 255."""
    if array.dtype == np.uint8:
        return array
    if np.allclose(array, array.astype(int)):
        if array.min() < 0 or array.max() > 255:
            raise ImageError(f"{label}: integer pixel values must lie in [0, 255], got [{array.min()}, {array.max()}]")
        return array.astype(np.uint8)
    if array.min() >= 0 and array.max() <= 1:
        return (array.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    raise ImageError(f"{label}: float pixel values must lie in [0, 1], got [{array.min()}, {array.max()}]")


def to_rgb(image: Image.Image, label: str = "image") -> Image.Image:
    """RGB the reference's way: anything with alpha or a transparency key is composited onto white."""
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{label}: cannot convert mode {image.mode} to RGB ({e})") from e


# ---- sizes (the reference's arithmetic, integer for integer) ----


def resize_for_longest_edge(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Longest side to `longest_edge`, aspect kept, the other side rounded up to even; both capped at 4096."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    # scale below the absolute maximum, aspect kept
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def resize_to_tile_multiple(height: int, width: int, tile: int) -> tuple[int, int]:
    """Both sides up to multiples of `tile` (the longer side first, the other from the aspect ratio)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


# ---- one image → tiles ----


@dataclass
class ImageTiles:
    """One image cut for the model: `tiles` (HWC uint8, row-major, then the global view) and the grid shape.

    rows = cols = 0 means a single view (no split), as the prompt expansion expects.
    """

    tiles: list[np.ndarray]
    rows: int
    cols: int


def split_image(image: Image.Image, config: ImageProcessorConfig, label: str = "image") -> ImageTiles:
    """Resize and cut one decoded image exactly as the reference does (still uint8)."""
    if config.do_convert_rgb:
        image = to_rgb(image, label)
    elif image.mode != "RGB":
        raise ImageError(f"{label}: mode {image.mode} needs do_convert_rgb=True")
    resample = config.resample
    if config.do_resize:
        height, width = resize_for_longest_edge(image.height, image.width, config.longest_edge)
        image = image.resize((width, height), resample=resample)
    tile = config.tile_size
    if not config.do_image_splitting:
        return ImageTiles([np.asarray(image.resize((tile, tile), resample=resample))], 0, 0)
    height, width = resize_to_tile_multiple(image.height, image.width, tile)
    image = image.resize((width, height), resample=resample)
    pixels = np.asarray(image)  # (H, W, 3)
    if height <= tile and width <= tile:
        return ImageTiles([pixels], 0, 0)
    rows, cols = height // tile, width // tile
    tiles = [pixels[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(rows) for c in range(cols)]
    tiles.append(np.asarray(image.resize((tile, tile), resample=resample)))
    return ImageTiles(tiles, rows, cols)


# ---- batch ----


def normalization_table(config: ImageProcessorConfig) -> np.ndarray:
    """(3, 256) float32: the normalized value of every uint8 level, computed in the reference's float order."""
    levels = np.arange(256, dtype=np.float64)
    values = (levels * config.rescale_factor if config.do_rescale else levels).astype(np.float32)
    values = np.broadcast_to(values, (3, 256))
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(config.image_std, dtype=np.float32)[:, None]
        values = (values - mean) / std
    return np.ascontiguousarray(values, dtype=np.float32)


def batch_tiles(
    samples: list[list[ImageTiles]], config: ImageProcessorConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalize and pad: pixel_values (B, max_tiles, 3, H, W) float32, pixel_attention_mask (B, max_tiles, H, W)."""
    per_sample = [[t for image in images for t in image.tiles] for images in samples]
    all_tiles = [t for tiles in per_sample for t in tiles]
    if not all_tiles:
        raise ImageError("no images to batch")
    max_tiles = max(len(tiles) for tiles in per_sample)
    height = max(t.shape[0] for t in all_tiles)
    width = max(t.shape[1] for t in all_tiles)
    pixel_values = np.zeros((len(samples), max_tiles, 3, height, width), dtype=np.float32)
    mask = np.zeros((len(samples), max_tiles, height, width), dtype=bool)
    table = normalization_table(config)
    for b, tiles in enumerate(per_sample):
        for i, tile in enumerate(tiles):
            h, w = tile.shape[:2]
            for c in range(3):  # (h, w) uint8 levels -> (h, w) float32 through the table
                np.take(table[c], tile[:, :, c], out=pixel_values[b, i, c, :h, :w], mode="clip")
            mask[b, i, :h, :w] = True
    return torch.from_numpy(pixel_values), torch.from_numpy(mask)
