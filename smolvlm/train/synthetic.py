"""Synthetic visual tasks with exact short answers, written as a JSONL conversation dataset.

Every picture is drawn from a *scene*: a JSON-able dict (shapes with boxes, a sign with its text, a bar chart) that
fully determines its pixels through `render_scene`. A sample draws its scene(s) with a `random.Random`, asks one
question and reads the answer off the scene, so the answer can always be checked against the metadata.

Determinism and splits: sample `i` of split `s` made with seed `S` draws from
`random.Random("smolvlm-synth/{s}/{S}/{i}/{attempt}")` (string seeds are hashed with SHA-512, so the two splits use
unrelated streams), and is kept only when the SHA-256 of its scenes falls in its split's half of the hash space
(`scene_split`), otherwise the next attempt is drawn. So the train and eval splits never share a picture, whatever
seeds they were made with, and the same (split, seed, index) always gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import string
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from smolvlm.errors import DataError

SHAPES = ("circle", "square", "triangle", "diamond", "star")
# Far apart in RGB so a small jitter never makes a colour name ambiguous; all stand out on light backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (240, 205, 0),
    "green": (30, 150, 50),
    "blue": (30, 80, 225),
    "purple": (140, 50, 190),
    "brown": (120, 70, 30),
    "black": (25, 25, 25),
}
TASKS = ("caption", "count", "colour", "exists", "spatial", "ocr", "grounding", "compare", "chart")  # the default mix
# Tasks outside the default mix (so the default data stays byte-identical): `text` is a block of random characters.
EXTRA_TASKS = ("text",)
KNOWN_TASKS = TASKS + EXTRA_TASKS
TEXT_CHARACTERS = string.ascii_uppercase + string.digits  # what signs and text blocks are written with
SPLITS = ("train", "eval")
SIGN_WORDS = (
    "OPEN", "STOP", "EXIT", "CAFE", "SALE", "PARK", "BUS", "TAXI", "HOTEL", "BANK", "SHOP", "BOOK", "FOOD",
    "WEST", "EAST", "NORTH", "SOUTH", "CITY", "ROAD", "MAIN", "GATE", "HALL", "FREE", "HOT", "COLD", "NEW",
    "OLD", "GOLD", "STAR", "MOON", "SUN", "TOWN", "PIZZA", "BREAD", "MILK", "FISH", "TEA", "LAKE", "ZOO", "KEEP",
)
FONT_STYLES = ("sans", "sans-bold", "pixel")
# How sign text is set: proportional (as fonts space it), or monospace: each character centred in a cell 1/8 to 0.16
# of the picture wide, so that a model with 8 x 8 image tokens (the demo's) sees every character under a token of
# its own, however narrow the letter.
SIGN_LAYOUTS = ("proportional", "monospace")
# (sign fill, text colour): dark text on light signs, white text on dark ones.
SIGN_PAINTS = (
    ((250, 250, 250), (20, 20, 20)),
    ((245, 215, 40), (20, 20, 20)),
    ((20, 100, 50), (250, 250, 250)),
    ((25, 60, 160), (250, 250, 250)),
    ((185, 25, 25), (250, 250, 250)),
    ((30, 30, 30), (250, 250, 250)),
)
CHART_LABELS = "ABCDEFGH"
CHART_MAX = 10

Scene = dict[str, Any]
Box = list[int]  # [x0, y0, x1, y1] in pixels, x1 / y1 exclusive


# ----------------------------------------------------------------------------------------------- rendering

@lru_cache(maxsize=64)
def _sans_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled FreeType font (Aileron), so no system font is needed."""
    return ImageFont.load_default(size=size)


@lru_cache(maxsize=4)
def _pixel_font() -> ImageFont.ImageFont:
    """Pillow's bundled bitmap font, scaled up by whole factors to look like a blocky sign font."""
    return ImageFont.load_default_imagefont()


def text_mask(text: str, style: str, size: int, pitch: int | None = None) -> Image.Image:
    """Render one line of text as a tight 'L' mask about `size` pixels tall; with a `pitch`, monospaced: character
    k centred in columns [k * pitch, (k + 1) * pitch), all standing on one baseline."""
    if pitch is not None:
        return _monospace_mask(text, style, size, pitch)
    if style == "pixel":
        font = _pixel_font()
        x0, y0, x1, y1 = font.getbbox(text)
        mask = Image.new("L", (x1 - x0, y1 - y0), 0)
        ImageDraw.Draw(mask).text((-x0, -y0), text, font=font, fill=255)
        factor = max(1, round(size / 11))  # the bitmap glyphs are 11 px tall
        return mask.resize((mask.width * factor, mask.height * factor), Image.NEAREST)
    font = _sans_font(size)
    stroke = max(1, size // 16) if style == "sans-bold" else 0
    x0, y0, x1, y1 = font.getbbox(text, stroke_width=stroke)
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(mask).text((-x0, -y0), text, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    return mask


def _monospace_mask(text: str, style: str, size: int, pitch: int) -> Image.Image:
    """`text_mask` with every character in a cell of its own (a space leaves its cell empty)."""
    glyphs = [None if char == " " else text_mask(char, style, size) for char in text]
    height = max((g.height for g in glyphs if g is not None), default=1)
    mask = Image.new("L", (pitch * len(text), height), 0)
    for k, glyph in enumerate(glyphs):
        if glyph is not None:  # bottom-aligned: capitals and digits share a baseline and have no descenders
            mask.paste(255, (k * pitch + (pitch - glyph.width) // 2, height - glyph.height), glyph)
    return mask


def text_origin(width: int, height: int, centre: Sequence[int]) -> tuple[int, int]:
    """Top-left corner of a width x height text mask drawn centred on `centre`."""
    return centre[0] - width // 2, centre[1] - height // 2


def _paste_text(image: Image.Image, text: str, style: str, size: int, centre: Sequence[int], rgb: Sequence[int],
                pitch: int | None = None) -> None:
    """Paint a text line centred on `centre` (monospaced with a `pitch`)."""
    mask = text_mask(text, style, size, pitch)
    left, top = text_origin(mask.width, mask.height, centre)
    image.paste(tuple(rgb), (left, top, left + mask.width, top + mask.height), mask)


def _render_background(background: Mapping[str, Any], size: Sequence[int]) -> Image.Image:
    """Plain colour, linear gradient, or plain colour with seeded gaussian noise."""
    w, h = size
    kind = background["kind"]
    if kind == "plain":
        return Image.new("RGB", (w, h), tuple(background["colour"]))
    c1 = np.asarray(background["colour"], dtype=np.float32)
    if kind == "gradient":
        c2 = np.asarray(background["colour2"], dtype=np.float32)
        xs = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]  # (1, W)
        ys = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]  # (H, 1)
        t = {"horizontal": xs + 0 * ys, "vertical": ys + 0 * xs, "diagonal": (xs + ys) / 2}[background["direction"]]
        pixels = c1 + (c2 - c1) * t[..., None]  # (H, W, 3)
    elif kind == "noise":
        noise = np.random.default_rng(background["seed"]).standard_normal((h, w, 3), dtype=np.float32)
        pixels = c1 + background["sigma"] * noise  # (H, W, 3)
    else:
        raise DataError(f"scene background kind {kind!r} is unknown; expected plain, gradient or noise")
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _star_points(box: Box) -> list[tuple[float, float]]:
    """A five-pointed star stretched so that its tips touch the four sides of the box."""
    unit = []
    for k in range(10):
        angle = math.radians(-90 + 36 * k)
        radius = 1.0 if k % 2 == 0 else 0.45
        unit.append((radius * math.cos(angle), radius * math.sin(angle)))
    xs, ys = [p[0] for p in unit], [p[1] for p in unit]
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
    return [(x0 + (u - min(xs)) / (max(xs) - min(xs)) * (x1 - x0), y0 + (v - min(ys)) / (max(ys) - min(ys)) * (y1 - y0))
            for u, v in unit]


def draw_object(draw: ImageDraw.ImageDraw, obj: Mapping[str, Any], fill: Any = None) -> None:
    """Fill one shape so that its pixels span exactly its box (in its own colour unless `fill` is given)."""
    x0, y0, x1, y1 = obj["box"]
    fill = tuple(obj["rgb"]) if fill is None else fill
    cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
    shape = obj["shape"]
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), (cx, y0)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=fill)
    elif shape == "star":
        draw.polygon(_star_points(obj["box"]), fill=fill)
    else:
        raise DataError(f"scene object shape {shape!r} is unknown; expected one of {', '.join(SHAPES)}")


def chart_texts(scene: Mapping[str, Any]) -> list[tuple[str, tuple[int, int], tuple[int, int, int]]]:
    """(text, centre, rgb) of a chart's even tick labels, then of its bar labels."""
    px0, py0, px1, py1 = scene["plot"]
    unit = (py1 - py0) / CHART_MAX
    font_size = scene["font_size"]
    ticks = [(str(v), (px0 - font_size, round(py1 - v * unit)), (40, 40, 40)) for v in range(0, CHART_MAX + 1, 2)]
    labels = [(bar["label"], ((bar["box"][0] + bar["box"][2]) // 2, py1 + font_size), (20, 20, 20))
              for bar in scene["bars"]]
    return ticks + labels


def chart_axes(scene: Mapping[str, Any]) -> list[tuple[int, int, int, int]]:
    """The two axis lines (x0, y0, x1, y1), drawn 2 px wide."""
    px0, py0, px1, py1 = scene["plot"]
    return [(px0, py0, px0, py1), (px0, py1, px1, py1)]


def _draw_chart(image: Image.Image, scene: Mapping[str, Any]) -> None:
    """Axes, integer grid lines, even tick labels, bars and their labels."""
    draw = ImageDraw.Draw(image)
    px0, py0, px1, py1 = scene["plot"]
    unit = (py1 - py0) / CHART_MAX
    for v in range(1, CHART_MAX + 1):
        y = round(py1 - v * unit)
        draw.line((px0, y, px1, y), fill=(205, 205, 205))
    texts = chart_texts(scene)
    n_ticks = len(texts) - len(scene["bars"])
    for text, centre, rgb in texts[:n_ticks]:
        _paste_text(image, text, "sans-bold", scene["font_size"], centre, rgb)
    for bar, (text, centre, rgb) in zip(scene["bars"], texts[n_ticks:]):
        x0, y0, x1, y1 = bar["box"]
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=tuple(bar["rgb"]))
        _paste_text(image, text, "sans-bold", scene["font_size"], centre, rgb)
    for line in chart_axes(scene):
        draw.line(line, fill=(20, 20, 20), width=2)


def render_scene(scene: Mapping[str, Any]) -> Image.Image:
    """Draw a scene dict (shapes, sign or chart) as an RGB image; the same scene always gives the same pixels."""
    image = _render_background(scene["background"], scene["size"])
    draw = ImageDraw.Draw(image)
    for obj in scene.get("objects", []):
        draw_object(draw, obj)
    if "sign" in scene:
        sign = scene["sign"]
        x0, y0, x1, y1 = sign["box"]
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=tuple(sign["rgb"]), outline=tuple(sign["text_rgb"]),
                       width=sign["border"])
        for line, centre in zip(sign["lines"], sign["centres"]):
            _paste_text(image, line, sign["style"], sign["font_size"], centre, sign["text_rgb"], sign.get("pitch"))
    if "bars" in scene:
        _draw_chart(image, scene)
    return image


# ----------------------------------------------------------------------------------------------- scene sampling

def _light_colour(rng: random.Random) -> list[int]:
    """A light, nearly neutral colour: every palette colour stands out against it."""
    level = rng.randint(195, 245)
    return [min(255, level + rng.randint(-12, 12)) for _ in range(3)]


def _background(rng: random.Random) -> dict[str, Any]:
    """A random plain, gradient or lightly noisy light background."""
    kind = rng.choice(("plain", "gradient", "noise"))
    background: dict[str, Any] = {"kind": kind, "colour": _light_colour(rng)}
    if kind == "gradient":
        background["colour2"] = _light_colour(rng)
        background["direction"] = rng.choice(("horizontal", "vertical", "diagonal"))
    elif kind == "noise":
        background["sigma"] = rng.choice((4, 6, 8))
        background["seed"] = rng.getrandbits(32)
    return background


def _jitter(rng: random.Random, colour: str) -> list[int]:
    """The palette colour of `colour` moved by at most 10 per channel."""
    return [min(255, max(0, c + rng.randint(-10, 10))) for c in COLOURS[colour]]


def _apart(a: Box, b: Box, gap: int) -> bool:
    """True when the boxes are at least `gap` pixels apart on some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place_boxes(rng: random.Random, size: Sequence[int], sides: Sequence[int], avoid: Sequence[Box] = ()
                 ) -> list[Box] | None:
    """Square boxes of the given sides, apart from each other and from `avoid`; None when they do not fit."""
    w, h = size
    margin, gap = max(2, w // 40), max(3, w // 32)
    boxes: list[Box] = []
    for side in sides:
        for _ in range(100):
            x0, y0 = rng.randint(margin, w - margin - side), rng.randint(margin, h - margin - side)
            box = [x0, y0, x0 + side, y0 + side]
            if all(_apart(box, other, gap) for other in [*avoid, *boxes]):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _shape_scene(rng: random.Random, size: Sequence[int], specs: Sequence[tuple[str, str]],
                 sides: tuple[float, float] = (0.10, 0.18),
                 accept: Callable[[list[dict[str, Any]]], bool] = lambda objects: True) -> Scene:
    """A background with one non-overlapping object per (shape, colour) spec, redrawn until `accept` holds."""
    w = size[0]
    background = _background(rng)
    while True:
        side_px = [rng.randint(round(sides[0] * w), round(sides[1] * w)) for _ in specs]
        boxes = _place_boxes(rng, size, side_px)
        if boxes is None:
            continue
        objects = [{"shape": s, "colour": c, "rgb": _jitter(rng, c), "box": b} for (s, c), b in zip(specs, boxes)]
        if accept(objects):
            return {"kind": "shapes", "size": list(size), "background": background, "objects": objects}


def _combos(rng: random.Random, k: int, exclude: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """k distinct (shape, colour) pairs, none of them in `exclude`."""
    pool = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in exclude]
    return rng.sample(pool, k)


def _others(rng: random.Random, k: int, not_shape: str) -> list[tuple[str, str]]:
    """k random (shape, colour) pairs whose shape is not `not_shape`."""
    return [(rng.choice([s for s in SHAPES if s != not_shape]), rng.choice(list(COLOURS))) for _ in range(k)]


def _shuffled(rng: random.Random, items: Sequence[Any]) -> list[Any]:
    """A shuffled copy."""
    items = list(items)
    rng.shuffle(items)
    return items


def _centre(box: Box) -> tuple[float, float]:
    """Centre of a box."""
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _phrase(shape: str, colour: str) -> str:
    """'red circle'."""
    return f"{colour} {shape}"


def _with_article(phrase: str) -> str:
    """'a red circle' / 'an orange star'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe(objects: Sequence[Mapping[str, Any]]) -> str:
    """Caption of shape objects, left to right: 'a red circle, a blue square and a green star'."""
    ordered = sorted(objects, key=lambda o: _centre(o["box"])[0])
    parts = [_with_article(_phrase(o["shape"], o["colour"])) for o in ordered]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def qwen_box(box: Box, size: Sequence[int]) -> list[int]:
    """A pixel box as Qwen-VL integer coordinates in [0, 1000)."""
    w, h = size
    return [min(999, box[0] * 1000 // w), min(999, box[1] * 1000 // h),
            min(999, box[2] * 1000 // w), min(999, box[3] * 1000 // h)]


def format_grounding(phrase: str, box: Sequence[int]) -> str:
    """Qwen-VL grounding answer: '<ref>red circle</ref><box>(x1,y1),(x2,y2)</box>'."""
    return f"<ref>{phrase}</ref><box>({box[0]},{box[1]}),({box[2]},{box[3]})</box>"


# Location bins (as Pix2Seq's and Kosmos-2's): a training answer whose box is a function of one discrete thing, the
# cell that holds the shape's centre, which an image token can name; scored against the true boxes, such answers at
# 16-px cells are right (IoU >= 0.5) for 87-89% of the shapes (`scripts/demo_diagnostics.py snap-ceiling`).
SNAP_SIDE = 36  # px on a 256-px picture (it scales with the picture): the typical side of a shape, 26 to 46 px


def grounded_box(meta: Mapping[str, Any]) -> list[int]:
    """The pixel box of the shape a grounding question (its `meta`) asks for."""
    for thing in meta["images"][0]["objects"]:
        if (thing["shape"], thing["colour"]) == (meta["shape"], meta["colour"]):
            return thing["box"]
    raise DataError(f"no {meta['colour']} {meta['shape']} in the question's scene")


def snapped_box(box: Sequence[int], size: Sequence[int], cell: int) -> list[int]:
    """Qwen-VL coordinates of a SNAP_SIDE square centred on the `cell`-px cell that holds the box's centre."""
    if cell < 1:
        raise DataError(f"a snapping cell is a positive number of pixels, not {cell}")
    corners = []
    for lo, hi, side in ((box[0], box[2], size[0]), (box[1], box[3], size[1])):
        centre = (lo + hi) // 2 // cell * cell + cell // 2
        half = SNAP_SIDE * side // 256 // 2
        corners.append((max(0, centre - half), min(side, centre + half)))
    (x0, x1), (y0, y1) = corners
    return qwen_box([x0, y0, x1, y1], size)


def snapped_target(meta: Mapping[str, Any], cell: int) -> list[int]:
    """The box a grounding question (its `meta`) asks for, snapped to `cell`-px cells (`snapped_box`)."""
    return snapped_box(grounded_box(meta), meta["images"][0]["size"], cell)


def snapped_grounding(meta: Mapping[str, Any], cell: int) -> str:
    """A grounding question's answer with its box snapped to `cell`-px cells."""
    return format_grounding(_phrase(meta["shape"], meta["colour"]), snapped_target(meta, cell))


# ----------------------------------------------------------------------------------------------- tasks
# Each task draws scenes and returns (scenes, question, answer, query) where `query` names what was asked about.

TaskResult = tuple[list[Scene], str, str, dict[str, Any]]


def _task_caption(rng: random.Random, size: Sequence[int]) -> TaskResult:
    specs = _combos(rng, rng.randint(1, 3))
    min_dx = 0.1 * size[0]  # keeps the left-to-right order of the caption unambiguous

    def ordered(objects: list[dict[str, Any]]) -> bool:
        xs = sorted(_centre(o["box"])[0] for o in objects)
        return all(b - a >= min_dx for a, b in zip(xs, xs[1:]))

    scene = _shape_scene(rng, size, specs, accept=ordered)
    question = rng.choice(("Describe the image.", "What shapes are in the picture?"))
    return [scene], question, describe(scene["objects"]), {}


def _task_count(rng: random.Random, size: Sequence[int]) -> TaskResult:
    shape = rng.choice(SHAPES)
    specs = [(shape, rng.choice(list(COLOURS))) for _ in range(rng.randint(1, 6))]
    specs = _shuffled(rng, specs + _others(rng, rng.randint(0, 2), shape))
    scene = _shape_scene(rng, size, specs, sides=(0.08, 0.14))
    question = rng.choice((f"How many {shape}s are there?", f"Count the {shape}s."))
    return [scene], question, str(sum(s == shape for s, _ in specs)), {"shape": shape}


def _task_colour(rng: random.Random, size: Sequence[int]) -> TaskResult:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    specs = _shuffled(rng, [(shape, colour)] + _others(rng, rng.randint(0, 2), shape))
    scene = _shape_scene(rng, size, specs)
    question = rng.choice((f"What colour is the {shape}?", f"What is the colour of the {shape}?"))
    return [scene], question, colour, {"shape": shape}


def _task_exists(rng: random.Random, size: Sequence[int]) -> TaskResult:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    present = rng.random() < 0.5
    specs = _combos(rng, rng.randint(0, 3) if present else rng.randint(1, 4), exclude=[(shape, colour)])
    if present:
        specs.append((shape, colour))
    elif rng.random() < 0.5:  # a near miss: right shape in another colour, or right colour on another shape
        near = rng.choice([(shape, c) for c in COLOURS if c != colour] + [(s, colour) for s in SHAPES if s != shape])
        specs[0] = near
    scene = _shape_scene(rng, size, _shuffled(rng, specs))
    question = f"Is there {_with_article(_phrase(shape, colour))}?"
    return [scene], question, "yes" if present else "no", {"shape": shape, "colour": colour}


def spatial_relation(subject: Box, other: Box, axis: str) -> str | None:
    """'left'/'right' (axis 'horizontal') or 'above'/'below' ('vertical') when the boxes do not overlap on it."""
    lo, hi = (0, 2) if axis == "horizontal" else (1, 3)
    if subject[hi] <= other[lo]:
        return "left" if axis == "horizontal" else "above"
    if other[hi] <= subject[lo]:
        return "right" if axis == "horizontal" else "below"
    return None


def _task_spatial(rng: random.Random, size: Sequence[int]) -> TaskResult:
    specs = _combos(rng, 2 + rng.randint(0, 2))  # subject, object, then distractors
    axis = rng.choice(("horizontal", "vertical"))
    gap = size[0] // 25

    def clear(objects: list[dict[str, Any]]) -> bool:
        a, b = objects[0]["box"], objects[1]["box"]
        lo, hi = (0, 2) if axis == "horizontal" else (1, 3)
        return a[hi] + gap <= b[lo] or b[hi] + gap <= a[lo]

    scene = _shape_scene(rng, size, specs, accept=clear)
    subject, other = (_phrase(*specs[0]), _phrase(*specs[1]))
    words = "left or right of" if axis == "horizontal" else "above or below"
    question = f"Is the {subject} {words} the {other}?"
    answer = spatial_relation(scene["objects"][0]["box"], scene["objects"][1]["box"], axis)
    scene["objects"] = _shuffled(rng, scene["objects"])
    query = {"subject": list(specs[0]), "object": list(specs[1]), "axis": axis}
    return [scene], question, answer, query


def _task_grounding(rng: random.Random, size: Sequence[int]) -> TaskResult:
    specs = _combos(rng, rng.randint(1, 4))
    scene = _shape_scene(rng, size, specs)
    target = rng.choice(scene["objects"])
    phrase = _phrase(target["shape"], target["colour"])
    question = rng.choice((f"Locate the {phrase}.", f"Give the bounding box of the {phrase}."))
    box = qwen_box(target["box"], size)
    return [scene], question, format_grounding(phrase, box), {"shape": target["shape"], "colour": target["colour"],
                                                              "box": box}


def _change_scene(rng: random.Random, scene: Scene) -> tuple[Scene, str]:
    """A copy of a shape scene with one visible change: recolour, reshape, remove or add an object."""
    changed = json.loads(json.dumps(scene))
    objects = changed["objects"]
    kinds = ["recolour", "reshape", "add"] + (["remove"] if len(objects) > 1 else [])
    kind = rng.choice(kinds)
    if kind == "add":
        side = rng.randint(round(0.10 * scene["size"][0]), round(0.18 * scene["size"][0]))
        boxes = _place_boxes(rng, scene["size"], [side], avoid=[o["box"] for o in objects])
        if boxes is None:
            kind = "recolour"
        else:
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            objects.append({"shape": shape, "colour": colour, "rgb": _jitter(rng, colour), "box": boxes[0]})
    if kind == "remove":
        objects.pop(rng.randrange(len(objects)))
    elif kind == "recolour":
        obj = rng.choice(objects)
        obj["colour"] = rng.choice([c for c in COLOURS if c != obj["colour"]])
        obj["rgb"] = _jitter(rng, obj["colour"])
    elif kind == "reshape":
        obj = rng.choice(objects)
        obj["shape"] = rng.choice([s for s in SHAPES if s != obj["shape"]])
    return changed, kind


def _task_compare(rng: random.Random, size: Sequence[int]) -> TaskResult:
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        counts = rng.sample(range(1, 7), 2)
        scenes = []
        for n in counts:
            specs = [(shape, rng.choice(list(COLOURS))) for _ in range(n)] + _others(rng, rng.randint(0, 2), shape)
            scenes.append(_shape_scene(rng, size, _shuffled(rng, specs), sides=(0.08, 0.14)))
        question = f"Which image has more {shape}s?"
        return scenes, question, "first" if counts[0] > counts[1] else "second", {"mode": "more", "shape": shape}
    first = _shape_scene(rng, size, _combos(rng, rng.randint(1, 4)))
    if rng.random() < 0.5:
        second, change = json.loads(json.dumps(first)), "none"
    else:
        second, change = _change_scene(rng, first)
    question = "Are the two images the same or different?"
    return [first, second], question, "same" if change == "none" else "different", {"mode": "same", "change": change}


def _sign_type(rng: random.Random, width: int, signs: str) -> tuple[int | None, int]:
    """(pitch, font size) of a sign's text: a monospaced cell 1/8 to 0.16 of the picture wide with a font as tall or
    a quarter taller, or proportional text 0.09 to 0.14 of the picture tall (pitch None)."""
    if signs == "monospace":
        pitch = rng.randint(-(-width // 8), int(0.16 * width))
        return pitch, rng.randint(pitch, round(1.25 * pitch))
    return None, rng.randint(round(0.09 * width), round(0.14 * width))


def _sign_spacing(font_size: int) -> tuple[int, int]:
    """(padding around the text, spacing between lines) of a sign."""
    return font_size // 2, font_size // 3


def _line_room(width: int, font_size: int, pitch: int | None) -> float:
    """How wide a sign's line may be: a monospaced sign is as wide as its longest line plus padding."""
    return 0.8 * width if pitch is None else 0.92 * width - 2 * _sign_spacing(font_size)[0]


SignExtent = tuple[int, int, int]  # (line height, sign width, sign height) in pixels


def _sign_extent(lines: Sequence[str], style: str, font_size: int, pitch: int | None) -> SignExtent:
    """How tall a line is and how large the padded sign holding `lines` is."""
    pad, spacing = _sign_spacing(font_size)
    masks = [text_mask(line, style, font_size, pitch) for line in lines]
    line_h = max(m.height for m in masks)
    return line_h, max(m.width for m in masks) + 2 * pad, len(lines) * line_h + (len(lines) - 1) * spacing + 2 * pad


def _fits(extent: SignExtent, size: Sequence[int]) -> bool:
    """Whether a sign of this extent fits in 0.92 of the picture's width and height."""
    _, sign_w, sign_h = extent
    return sign_w <= 0.92 * size[0] and sign_h <= 0.92 * size[1]


def _place_sign(rng: random.Random, size: Sequence[int], lines: list[str], style: str, font_size: int,
                pitch: int | None, extent: SignExtent) -> dict[str, Any]:
    """Put a sign holding `lines` (of `extent`, which must fit) somewhere in the picture and paint it."""
    w, h = size
    line_h, sign_w, sign_h = extent
    pad, spacing = _sign_spacing(font_size)
    x0, y0 = rng.randint(w // 25, w - w // 25 - sign_w), rng.randint(h // 25, h - h // 25 - sign_h)
    centres = [[x0 + sign_w // 2, y0 + pad + k * (line_h + spacing) + line_h // 2] for k in range(len(lines))]
    fill, text_rgb = rng.choice(SIGN_PAINTS)
    return {"box": [x0, y0, x0 + sign_w, y0 + sign_h], "rgb": list(fill), "text_rgb": list(text_rgb),
            "border": rng.choice((0, 2, 3)), "style": style, "font_size": font_size, "lines": lines,
            "centres": centres, **({} if pitch is None else {"pitch": pitch})}


def _layout_sign(rng: random.Random, size: Sequence[int], tokens: Sequence[str], signs: str = "proportional"
                 ) -> dict[str, Any]:
    """Wrap the tokens into lines that fit, size a sign around them and place it in the picture. Monospaced signs
    put each character in a cell of its own, 1/8 to 0.16 of the picture wide (see SIGN_LAYOUTS)."""
    w, h = size
    style = rng.choice(FONT_STYLES)
    pitch, font_size = _sign_type(rng, w, signs)
    while True:
        fit = _line_room(w, font_size, pitch)
        lines: list[str] = []
        for token in tokens:  # greedy wrap
            if lines and text_mask(f"{lines[-1]} {token}", style, font_size, pitch).width <= fit:
                lines[-1] = f"{lines[-1]} {token}"
            else:
                lines.append(token)
        extent = _sign_extent(lines, style, font_size, pitch)
        if _fits(extent, size):
            return _place_sign(rng, size, lines, style, font_size, pitch, extent)
        font_size = font_size * 9 // 10  # the pitch stays: five characters of it fit in 0.8 of the width


def _task_ocr(rng: random.Random, size: Sequence[int], signs: str = "proportional") -> TaskResult:
    tokens: list[str] = []
    k = rng.randint(1, 3)
    while len(tokens) < k:
        token = rng.choice(SIGN_WORDS) if rng.random() < 0.75 else str(rng.randint(0, 99))
        if token not in tokens:
            tokens.append(token)
    sign = _layout_sign(rng, size, tokens, signs)
    scene = {"kind": "sign", "size": list(size), "background": _background(rng), "sign": sign}
    question = rng.choice(("What does the sign say?", "Read the text on the sign."))
    text = " ".join(tokens)
    return [scene], question, text, {"text": text}


def _task_text(rng: random.Random, size: Sequence[int], signs: str = "proportional") -> TaskResult:
    """Read a block of random characters: no word to guess from, and about twice a sign's characters a picture."""
    w, h = size
    style = rng.choice(FONT_STYLES)
    pitch, font_size = _sign_type(rng, w, signs)
    fit = _line_room(w, font_size, pitch)
    pad, spacing = _sign_spacing(font_size)
    widest = 1  # characters a line holds, judged by the widest letter
    while text_mask("W" * (widest + 1), style, font_size, pitch).width <= fit:
        widest += 1
    line_h = text_mask(TEXT_CHARACTERS, style, font_size).height
    most = max(1, int((0.92 * h - 2 * pad + spacing) // (line_h + spacing)))
    lines = ["".join(rng.choice(TEXT_CHARACTERS) for _ in range(rng.randint(max(1, widest - 2), widest)))
             for _ in range(rng.randint(max(1, most - 1), most))]
    extent = _sign_extent(lines, style, font_size, pitch)
    while len(lines) > 1 and not _fits(extent, size):
        lines.pop()
        extent = _sign_extent(lines, style, font_size, pitch)
    scene = {"kind": "sign", "size": list(size), "background": _background(rng),
             "sign": _place_sign(rng, size, lines, style, font_size, pitch, extent)}
    question = rng.choice(("Read the text.", "What does the text say?"))
    text = " ".join(lines)
    return [scene], question, text, {"text": text}


def _task_chart(rng: random.Random, size: Sequence[int]) -> TaskResult:
    w, h = size
    k = rng.randint(3, 5)
    labels = sorted(rng.sample(CHART_LABELS, k))
    while True:  # a unique largest bar
        values = [rng.randint(1, CHART_MAX) for _ in labels]
        if values.count(max(values)) == 1:
            break
    if rng.random() < 0.5:
        colours = [rng.choice(list(COLOURS))] * k
    else:
        colours = rng.sample(list(COLOURS), k)
    plot = [round(0.17 * w), round(0.07 * h), round(0.96 * w), round(0.82 * h)]
    slot = (plot[2] - plot[0]) / k
    unit = (plot[3] - plot[1]) / CHART_MAX
    bars = []
    for i, (label, value, colour) in enumerate(zip(labels, values, colours)):
        x0 = round(plot[0] + (i + 0.2) * slot)
        x1 = round(plot[0] + (i + 0.8) * slot)
        bars.append({"label": label, "value": value, "colour": colour, "rgb": _jitter(rng, colour),
                     "box": [x0, round(plot[3] - value * unit), x1, plot[3]]})
    background = {"kind": "plain", "colour": _light_colour(rng)}
    scene = {"kind": "chart", "size": list(size), "background": background, "plot": plot,
             "font_size": round(0.07 * w), "bars": bars}
    if rng.random() < 0.5:
        question = rng.choice(("Which bar is the largest?", "Which bar is the tallest?"))
        return [scene], question, labels[values.index(max(values))], {"question": "largest"}
    i = rng.randrange(k)
    return [scene], f"What is the value of bar {labels[i]}?", str(values[i]), {"question": "value", "label": labels[i]}


_TASK_FNS: dict[str, Callable[[random.Random, Sequence[int]], TaskResult]] = {
    "caption": _task_caption, "count": _task_count, "colour": _task_colour, "exists": _task_exists,
    "spatial": _task_spatial, "grounding": _task_grounding, "compare": _task_compare, "chart": _task_chart,
}
_SIGN_TASK_FNS: dict[str, Callable[[random.Random, Sequence[int], str], TaskResult]] = {
    "ocr": _task_ocr, "text": _task_text,
}


def _check_size(image_size: int) -> tuple[int, int]:
    """Validate the image side and return (width, height)."""
    if not isinstance(image_size, int) or image_size < 64:
        raise DataError(f"image size {image_size!r} is too small for legible scenes; use an integer >= 64 (e.g. 256)")
    return image_size, image_size


def _check_signs(signs: str) -> None:
    """Validate a sign layout name."""
    if signs not in SIGN_LAYOUTS:
        raise DataError(f"unknown sign layout {signs!r}; choose from {', '.join(SIGN_LAYOUTS)}")


def _build(task: str, rng: random.Random, image_size: int, signs: str = "proportional"
           ) -> tuple[list[Scene], str, str, dict[str, Any]]:
    """Scenes, question, answer and metadata of one sample, without rendering."""
    if task not in KNOWN_TASKS:
        raise DataError(f"unknown synthetic task {task!r}; choose from {', '.join(KNOWN_TASKS)}")
    _check_signs(signs)
    size = _check_size(image_size)
    if task in _SIGN_TASK_FNS:
        scenes, question, answer, query = _SIGN_TASK_FNS[task](rng, size, signs)
    else:
        scenes, question, answer, query = _TASK_FNS[task](rng, size)
    return scenes, question, answer, {"task": task, "images": scenes, **query}


def generate_sample(task: str, rng: random.Random, image_size: int = 256, signs: str = "proportional"
                    ) -> tuple[list[Image.Image], str, str, dict[str, Any]]:
    """One sample of `task`: (images, question, exact answer, metadata with the scenes that were drawn)."""
    scenes, question, answer, meta = _build(task, rng, image_size, signs)
    return [render_scene(s) for s in scenes], question, answer, meta


def scene_split(meta: Mapping[str, Any]) -> str:
    """The split ('train' or 'eval') a sample's pictures belong to: one bit of the SHA-256 of its scenes."""
    digest = hashlib.sha256(json.dumps(meta["images"], sort_keys=True).encode()).digest()
    return SPLITS[digest[0] & 1]


def split_sample(task: str, seed: int, split: str, index: int, image_size: int = 256, signs: str = "proportional"
                 ) -> tuple[list[Image.Image], str, str, dict[str, Any]]:
    """Sample `index` of a split: the first draw from the (split, seed, index) stream whose scenes hash into it."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    for attempt in range(1000):
        rng = random.Random(f"smolvlm-synth/{split}/{seed}/{index}/{attempt}")
        scenes, question, answer, meta = _build(task, rng, image_size, signs)
        if scene_split(meta) == split:
            return [render_scene(s) for s in scenes], question, answer, meta
    raise AssertionError("a fair hash bit never came up in 1000 draws")  # probability 2**-1000


# ----------------------------------------------------------------------------------------------- task mix and writer

def parse_task_mix(spec: str | Sequence[str] | Mapping[str, float] | None) -> dict[str, float]:
    """Task weights from None (all tasks equally), names, a mapping, or 'count=2,ocr,chart=0.5' text."""
    if spec is None:
        return dict.fromkeys(TASKS, 1.0)
    if isinstance(spec, str):
        items: list[tuple[str, float]] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, weight = part.partition("=")
            try:
                items.append((name.strip(), float(weight) if weight else 1.0))
            except ValueError:
                raise DataError(f"task mix entry {part!r} has a weight that is not a number; write e.g. count=2")
        mix = dict(items)
    elif isinstance(spec, Mapping):
        mix = {str(k): float(v) for k, v in spec.items()}
    else:
        mix = dict.fromkeys(spec, 1.0)
    unknown = [t for t in mix if t not in KNOWN_TASKS]
    if unknown:
        raise DataError(f"unknown synthetic task(s) {', '.join(unknown)}; choose from {', '.join(KNOWN_TASKS)}")
    if not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise DataError(f"task mix {spec!r} needs at least one task with a positive weight and none negative")
    return {t: w for t, w in mix.items() if w > 0}


def task_schedule(mix: Mapping[str, float], n: int) -> list[str]:
    """The task of each of n samples: every prefix follows the weights as closely as whole counts allow."""
    total = sum(mix.values())
    counts = dict.fromkeys(mix, 0)
    schedule = []
    for i in range(n):
        task = max(mix, key=lambda t: mix[t] / total * (i + 1) - counts[t])  # the task furthest behind its share
        counts[task] += 1
        schedule.append(task)
    return schedule


def qa_record(sample_id: str, task: str, image_paths: Sequence[str], question: str, answer: str,
               meta: Mapping[str, Any]) -> dict[str, Any]:
    """One JSONL line: a user turn with the images then the question, an assistant turn with the answer."""
    content: list[dict[str, str]] = [{"type": "image", "image": p} for p in image_paths]
    content.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return {"id": sample_id, "task": task, "messages": messages, "meta": meta}


def write_dataset(out_dir: str | Path, n: int, seed: int, split: str = "train",
                  tasks: str | Sequence[str] | Mapping[str, float] | None = None, image_size: int = 256,
                  progress: bool = True, signs: str = "proportional", box_cell: int = 0) -> Path:
    """Write `n` samples to OUT/{split}.jsonl with PNGs in OUT/images/; return the JSONL path. `box_cell` > 0:
    grounding answers give the box snapped to `box_cell`-px cells (`snapped_box`), a training target."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if box_cell < 0:
        raise DataError(f"--box-cell is a cell side in pixels (0: the true boxes), not {box_cell}")
    if box_cell and split != "train":
        raise DataError("--box-cell snaps training answers; an eval set keeps the true boxes it is scored on")
    if n < 0:
        raise DataError(f"sample count {n} is negative; pass --n 1 or more")
    _check_size(image_size)
    _check_signs(signs)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.jsonl"
    schedule = task_schedule(parse_task_mix(tasks), n)
    with path.open("w", encoding="utf-8") as f:
        for index, task in enumerate(tqdm(schedule, desc=f"synth {split}", unit="sample", disable=not progress)):
            images, question, answer, meta = split_sample(task, seed, split, index, image_size, signs)
            if box_cell and task == "grounding":
                answer = snapped_grounding(meta, box_cell)
            names = [f"{split}-{index:06d}.png"] if len(images) == 1 else \
                [f"{split}-{index:06d}-{k}.png" for k in range(len(images))]
            for image, name in zip(images, names):
                image.save(out / "images" / name, format="PNG")
            record = qa_record(f"{split}-{index:06d}", task, [f"images/{nm}" for nm in names], question, answer, meta)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `data synth` options, for embedding in the main CLI."""
    parser.add_argument("--n", type=int, required=True, help="number of samples")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--out", required=True, help="output folder: {split}.jsonl and images/")
    parser.add_argument("--split", choices=SPLITS, default="train",
                        help="train or eval; the two never share a picture")
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated tasks with optional weights, e.g. 'count=2,ocr,chart'; "
                             f"default: all of {','.join(TASKS)}; also {','.join(EXTRA_TASKS)} (a block of random "
                             "characters to read)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square pictures in pixels")
    parser.add_argument("--signs", choices=SIGN_LAYOUTS, default="proportional",
                        help="how sign text is set: proportional, or monospace (a cell of 1/8 to 0.16 of the picture "
                             "width per character, so 8 x 8 image tokens give every character its own token)")
    parser.add_argument("--box-cell", type=int, default=0, metavar="PX",
                        help="train split: grounding answers give a fixed-size box centred on the PX-px cell that "
                             "holds the shape's centre (location bins; 16 on 256-px pictures), not the true box")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of a sentence")


def run(args: argparse.Namespace) -> int:
    """Run `data synth` with parsed arguments."""
    mix = parse_task_mix(args.tasks)
    path = write_dataset(args.out, args.n, args.seed, split=args.split, tasks=mix, image_size=args.image_size,
                         progress=not args.json, signs=args.signs, box_cell=args.box_cell)
    counts: dict[str, int] = {}
    for task in task_schedule(mix, args.n):
        counts[task] = counts.get(task, 0) + 1
    if args.json:
        print(json.dumps({"path": str(path), "split": args.split, "n": args.n, "seed": args.seed,
                          "image_size": args.image_size, "signs": args.signs, "box_cell": args.box_cell,
                          "tasks": counts}))
    else:
        print(f"wrote {args.n} {args.split} samples to {path} ({', '.join(f'{t} {c}' for t, c in counts.items())})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`smolvlm data synth --n N --seed S --out DIR [--split] [--tasks] [--image-size] [--json]`."""
    parser = argparse.ArgumentParser(prog="smolvlm data synth", description="Write a synthetic VQA dataset.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
