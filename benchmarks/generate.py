"""Generation benchmark: smolvlm vs transformers on the same random weights at real SmolVLM shapes.

Each (implementation, shape) runs in its own subprocess so peak RSS is measured separately; both load the same
safetensors folder written once per shape. Measures prefill seconds for a one-tile image and for a split image
(4 tiles + global = 5 tiles), decode tokens/s at batch 1 and batch 8 (timed per step after the first new token,
so prefill is excluded), and peak RSS. smolvlm runs twice: its default eager engine, and with decode steps through
torch.compile (`load(..., compile=True)`, `--compile` on the CLI; warm-up time, which includes compiling, is
reported as warmup_seconds).

    python benchmarks/generate.py                       # 256M and 500M, CPU, fp32
    python benchmarks/generate.py --shapes 256M --json  # one shape, JSON on stdout
    python benchmarks/generate.py --device cuda         # the GPU benchmark (benchmarks/generate_cuda.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {"256M": "SmolVLM-256M-Instruct", "500M": "SmolVLM-500M-Instruct", "2.2B": "SmolVLM-Instruct"}
RESULTS = Path(__file__).parent / "results"
TEXT_TOKENS = (1, 11, 23, 57, 99, 131, 17, 42)  # a short made-up question around the image tokens


def build_checkpoint(shape: str, directory: Path, seed: int = 0, device: str = "cpu",
                     dtype: torch.dtype = torch.float32) -> None:
    """Write a random-weight SmolVLM folder at a preset's real shape, initialised on `device` (a GPU takes seconds)
    and saved in `dtype`."""
    from smolvlm.config import preset
    from smolvlm.model.smolvlm import SmolVLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = SmolVLM(preset(SHAPES[shape]))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.to("cpu", dtype).save_pretrained(directory)


def make_prompt(config, tiles: int, batch: int) -> dict[str, torch.Tensor]:
    """input_ids with `tiles` runs of image tokens (plus a little text) and matching pixel values."""
    per_tile = [config.image_token_id] * config.tokens_per_tile
    ids = list(TEXT_TOKENS[:4]) + per_tile * tiles + list(TEXT_TOKENS[4:])
    size = config.vision.image_size
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.tensor([ids] * batch),
        "attention_mask": torch.ones(batch, len(ids), dtype=torch.long),
        "pixel_values": torch.rand(batch, tiles, 3, size, size, generator=g) * 2 - 1,
        "pixel_attention_mask": torch.ones(batch, tiles, size, size, dtype=torch.bool),
    }


def _rate(tokens: int, seconds: float) -> float:
    """Tokens per second; 0 when nothing was decoded (a prefill-only run)."""
    return tokens / seconds if tokens > 0 and seconds > 0 else 0.0


class _StepClock:
    """A transformers streamer that records when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_ours(prompt: dict, new_tokens: int, step_mode: str = "eager") -> tuple[float, float]:
    """(prefill seconds, decode tok/s) for smolvlm's engine."""
    from smolvlm.engine.generate import Engine, GenerationConfig

    model = _CACHE["ours"]
    if step_mode not in _ENGINES:  # one engine per mode, so a compiled step is compiled once
        _ENGINES[step_mode] = Engine(model, lambda ids: "", eos_token_ids=[], step_mode=step_mode)
    engine = _ENGINES[step_mode]
    batch = prompt["input_ids"].shape[0]
    config = GenerationConfig(max_new_tokens=new_tokens)
    results = engine.generate(
        prompt["input_ids"], prompt["attention_mask"], [config] * batch, prompt["pixel_values"], prompt["pixel_attention_mask"]
    )
    r = results[0]
    return r.prefill_seconds, _rate(batch * (r.completion_tokens - 1), r.decode_seconds)


def run_transformers(prompt: dict, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tok/s) for transformers' generate, timed by a streamer."""
    model = _CACHE["transformers"]
    clock = _StepClock()
    batch = prompt["input_ids"].shape[0]
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            **prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
            pad_token_id=0,
        )
    # put() is called once with the prompt, then once per generated token.
    first, last = clock.times[1], clock.times[-1]
    return first - start, _rate(batch * (new_tokens - 1), last - first)


_CACHE: dict[str, torch.nn.Module] = {}
_ENGINES: dict[str, object] = {}  # the worker process loads one model
IMPLS = ("transformers", "ours", "ours-compiled")


def worker(impl: str, directory: Path, new_tokens: int, repeats: int) -> dict:
    """Load one implementation and measure it; returns the figures as a dict."""
    start = time.perf_counter()
    if impl.startswith("ours"):
        from smolvlm.model.smolvlm import SmolVLM

        model = SmolVLM.from_pretrained(directory, device="cpu", dtype=torch.float32).eval()
        config = model.config
        mode = "compiled" if impl == "ours-compiled" else "eager"

        def run(prompt: dict, new_tokens: int) -> tuple[float, float]:
            return run_ours(prompt, new_tokens, mode)

        impl = "ours"
    else:
        from transformers import SmolVLMForConditionalGeneration

        model = SmolVLMForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
        from smolvlm.config import SmolVLMConfig

        config = SmolVLMConfig.from_json_file(directory / "config.json")
        run = run_transformers
    _CACHE[impl] = model
    load_seconds = time.perf_counter() - start

    def best_prefill(tiles: int) -> float:
        return min(run(make_prompt(config, tiles, 1), 1)[0] for _ in range(repeats))

    start = time.perf_counter()
    # Warm-up with the measured shapes (a compiled step compiles once per batch size and cache length).
    for batch in (1, 8):
        run(make_prompt(config, 1, batch), new_tokens)
    out = {
        "load_seconds": load_seconds,
        "warmup_seconds": time.perf_counter() - start,
        "prefill_1_tile_s": best_prefill(1),
        "prefill_5_tiles_s": best_prefill(5),
        "decode_b1_tok_s": run(make_prompt(config, 1, 1), new_tokens)[1],
        "decode_b8_tok_s": run(make_prompt(config, 1, 8), new_tokens)[1],
    }
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def ratios(ours: dict, ref: dict) -> dict:
    """Speedups (>1: ours faster) and the memory ratio (<1: ours smaller) against transformers."""
    return {
        "decode_b1_speedup": ours["decode_b1_tok_s"] / ref["decode_b1_tok_s"],
        "decode_b8_speedup": ours["decode_b8_tok_s"] / ref["decode_b8_tok_s"],
        "prefill_1_tile_speedup": ref["prefill_1_tile_s"] / ours["prefill_1_tile_s"],
        "prefill_5_tiles_speedup": ref["prefill_5_tiles_s"] / ours["prefill_5_tiles_s"],
        "peak_rss_ratio": ours["peak_rss_mib"] / ref["peak_rss_mib"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write JSON to benchmarks/results/."""
    argv = sys.argv[1:] if argv is None else argv
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="cpu")
    if device.parse_known_args(argv)[0].device == "cuda":
        import generate_cuda

        return generate_cuda.main(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["256M", "500M"], choices=list(SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: see generate_cuda.py")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="prefill runs per measurement (best is kept)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=RESULTS / "generate-cpu.json")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--no-compiled", action="store_true", help="skip smolvlm's torch.compile decode step")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpoint, args.new_tokens, args.repeats)))
        return 0

    report = {
        "device": args.device,
        "dtype": "float32",
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "shapes": {},
    }
    for shape in args.shapes:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            build_checkpoint(shape, directory)
            figures = {}
            for impl in IMPLS[:2] if args.no_compiled else IMPLS:
                cmd = [sys.executable, __file__, "--worker", impl, "--checkpoint", str(directory),
                       "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    sys.stderr.write(done.stderr)
                    raise SystemExit(f"{impl} worker failed for {shape}")
                figures[impl] = json.loads(done.stdout.strip().splitlines()[-1])
                if not args.json:
                    print(f"{shape} {impl}: {figures[impl]}", file=sys.stderr)
            for impl in [i for i in IMPLS[1:] if i in figures]:
                figures[f"ratios-{impl}" if impl != "ours" else "ratios"] = ratios(figures[impl],
                                                                                  figures["transformers"])
            report["shapes"][shape] = figures
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'shape':6} {'metric':24} {'transformers':>13} {'smolvlm':>10} {'ratio':>7} {'compiled':>10} {'ratio':>7}")
        for shape, f in report["shapes"].items():
            for key, ratio_key in [("prefill_1_tile_s", "prefill_1_tile_speedup"), ("prefill_5_tiles_s", "prefill_5_tiles_speedup"),
                                   ("decode_b1_tok_s", "decode_b1_speedup"), ("decode_b8_tok_s", "decode_b8_speedup"),
                                   ("peak_rss_mib", "peak_rss_ratio")]:
                line = f"{shape:6} {key:24} {f['transformers'][key]:13.2f} {f['ours'][key]:10.2f} {f['ratios'][ratio_key]:7.2f}x"
                if "ours-compiled" in f:
                    line += f" {f['ours-compiled'][key]:10.2f} {f['ratios-ours-compiled'][ratio_key]:7.2f}x"
                print(line)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
