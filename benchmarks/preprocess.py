"""Preprocessing benchmark: smolvlm's Processor vs transformers' SmolVLMProcessor (PIL image backend), one run.

Both read the same processor folder (SmolVLM-256M settings: longest edge 2048, 512-px tiles, 64 tokens per tile;
small trained tokenizer from tests/processing_fixtures.py) and must produce the same tensors, which is checked.
Cases:
  jpeg_4000x3000  one prompt, one 4000x3000 JPEG given by path (decode + EXIF + resize + tiles + tokens)
  photos_16       16 prompts, one scikit-image photo each (PIL images in memory), batched and padded

    python benchmarks/preprocess.py            # table
    python benchmarks/preprocess.py --json     # JSON on stdout
Results go to benchmarks/results/preprocess.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = Path(__file__).parent / "results"
PROMPT = "<|im_start|>User:<image>Describe this image.<end_of_utterance>\nAssistant:"
PHOTOS = ["astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "grass",
          "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket"]  # fmt: skip


def photo(name: str) -> Image.Image:
    """A scikit-image sample as a PIL image."""
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


def write_big_jpeg(path: Path) -> None:
    """A 4000x3000 photo-like JPEG: a sample upscaled with a little grain, so it does not compress to nothing."""
    rng = np.random.default_rng(0)
    base = np.asarray(photo("coffee").resize((4000, 3000), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-6, 7, base.shape, dtype=np.int16)
    Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(path, quality=90)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Seconds of each of `repeats` calls after one warm-up, and the last output."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def same(ours: Any, reference: Any) -> float:
    """Largest |pixel difference|; raises if ids or masks differ."""
    assert torch.equal(ours.input_ids, reference["input_ids"]), "input_ids differ"
    assert torch.equal(ours.attention_mask, reference["attention_mask"]), "attention_mask differ"
    assert torch.equal(ours.pixel_attention_mask, reference["pixel_attention_mask"].bool()), "pixel masks differ"
    return (ours.pixel_values - reference["pixel_values"]).abs().max().item()


def run(repeats: int) -> dict[str, Any]:
    import processing_fixtures as pf
    from smolvlm.processing import Processor

    work = Path(tempfile.mkdtemp(prefix="smolvlm-bench-"))
    folder = pf.write_processor_folder(work / "processor", "512", "v4")
    ours = Processor.from_pretrained(folder)
    reference = pf.reference_processor(folder)
    reference.tokenizer.padding_side = "left"
    jpeg = work / "photo_4000x3000.jpg"
    write_big_jpeg(jpeg)
    photos = [photo(name) for name in PHOTOS]
    cases = {
        "jpeg_4000x3000": (
            lambda: ours([PROMPT], [[str(jpeg)]]),
            lambda: reference(text=[PROMPT], images=[[str(jpeg)]], return_tensors="pt"),
        ),
        "photos_16": (
            lambda: ours([PROMPT] * len(photos), [[p] for p in photos]),
            lambda: reference(text=[PROMPT] * len(photos), images=[[p] for p in photos], padding=True,
                              return_tensors="pt"),
        ),
    }  # fmt: skip
    results = {}
    for name, (ours_fn, reference_fn) in cases.items():
        reference_times, reference_out = timed(reference_fn, repeats)
        ours_times, ours_out = timed(ours_fn, repeats)
        results[name] = {
            "ours_s": statistics.median(ours_times),
            "transformers_s": statistics.median(reference_times),
            "speedup": statistics.median(reference_times) / statistics.median(ours_times),
            "tiles": int(ours_out.pixel_values.shape[0] * ours_out.pixel_values.shape[1]),
            "max_abs_pixel_diff": same(ours_out, reference_out),
        }
    import transformers

    return {
        "benchmark": "preprocess",
        "repeats": repeats,
        "threads": ours.num_workers,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "pillow": Image.__version__, "numpy": np.__version__},  # fmt: skip
        "cases": results,
    }


def main() -> None:
    """Run both processors on the cases, print a table (or JSON) and write benchmarks/results/preprocess.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case after one warm-up (median)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    report = run(args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "preprocess.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{'case':16s} {'tiles':>5s} {'transformers s':>15s} {'smolvlm s':>10s} {'speedup':>8s} {'max |diff|':>10s}")
    for name, r in report["cases"].items():
        print(f"{name:16s} {r['tiles']:5d} {r['transformers_s']:15.3f} {r['ours_s']:10.3f} {r['speedup']:7.2f}x "
              f"{r['max_abs_pixel_diff']:10.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
