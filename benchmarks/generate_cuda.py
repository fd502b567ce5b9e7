"""GPU generation benchmark (`benchmarks/generate.py --device cuda`): smolvlm vs transformers, bf16, one tile.

Random weights at the real 256M / 500M / 2.2B shapes, written once per shape (bf16 safetensors) and loaded by every
implementation, each in its own process (its own peak-memory counter and compile caches):
  ours                   CUDA-graph decode slots, attention through rope + cache writes + SDPA (decode_kernel=False)
  ours-compiled          the same with the step through torch.compile (`load(..., compile=True)`)
  ours[-compiled]-kernel the same with each layer's rope, cache write and attention as one Triton kernel
                         (model/decode_attention.py), and at batch 1 each projection as one Triton kernel with its
                         norm, SiLU gate or residual add (model/decode_linear.py); ours-kernel is what a GPU runs
                         by default
  ours-attention-kernel  ours-kernel without the projection kernels (cuBLAS GEMMs, separate norms and adds)
  transformers           generate() with its default dynamic cache
  transformers-compiled  generate() with its static cache + torch.compile (mode "default": its CUDA-graph mode,
                         "reduce-overhead", fails for SmolVLM)
Decode tokens/s count the tokens after the first new one (prefill excluded) at batch 1 and 32; prefill is one tile at
batch 1 (best of 3; ours includes allocating the request's KV cache, and in the first of the three capturing the
new decode slot's graph); peak memory is torch.cuda.max_memory_allocated over one measured generation (and, for
the allocator's cache, max_memory_reserved after emptying it). The device-to-device copy bandwidth measured in the
same run gives the batch-1 roofline: bandwidth / bytes of the decoder and LM head weights, which every decode step
must read once.

    python benchmarks/generate.py --device cuda                          # all shapes, JSON in benchmarks/results/
    python benchmarks/generate.py --device cuda --shapes 256M --no-compiled
    python benchmarks/generate.py --device cuda --runs 256M:transformers 256M:ours-kernel --deadline 300

`--runs` picks the runs and their order; `--deadline` fits them into a device call of fixed length
(benchmarks/cuda_check.sh: the CUDA tests and this benchmark in one 10-minute call).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate import RESULTS, SHAPES, _rate, _StepClock, build_checkpoint, make_prompt  # noqa: E402

OURS = ("ours", "ours-compiled", "ours-kernel", "ours-compiled-kernel", "ours-attention-kernel")
IMPLS = (*OURS, "transformers", "transformers-compiled")
MIN_RUN_SECONDS = 20.0  # under --deadline, a run with less time left than this is not started
GOALS = {"256M decode b1 tok/s": 1000.0, "256M decode b32 vs transformers": 10.0, "2.2B b1 roofline fraction": 0.5}


def copy_bandwidth(gib: int = 1, repeats: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * repeats / (start.elapsed_time(end) / 1000)


def decode_weight_bytes(model) -> int:
    """Bytes a decode step reads at least once: every decoder weight except the embedding table, plus the LM head."""
    text = sum(p.nbytes for name, p in model.text_model.named_parameters() if not name.startswith("embed_tokens"))
    return text + model.lm_head.weight.nbytes


def step_profile(engine, prompt: dict, new_tokens: int, replays: int = 50) -> dict:
    """GPU time of one captured decode step (CUDA events over graph replays), and the kernels it launches with
    their GPU times (the same step uncaptured, under the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    # On the engine's stream, as its requests run: a stream of its own would get cuBLAS workspaces of its own.
    with torch.inference_mode(), torch.cuda.stream(engine._cuda_stream):  # the slots' buffers are inference tensors
        session, _ = engine._graphs.session(prompt["attention_mask"].cuda(), new_tokens)
    slot = session.slot
    try:
        with torch.inference_mode(), torch.cuda.stream(engine._cuda_stream):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):  # each replay advances the positions: replays < the cache's free columns
                slot.run()
            end.record()
            end.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                slot._forward()  # the same step, uncaptured, so each kernel shows
                torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    finally:
        session.close()
    counts: dict[str, int] = {}
    micros: dict[str, float] = {}  # GPU time of each kernel over the uncaptured step
    for e in kernels:
        counts[e.name[:90]] = counts.get(e.name[:90], 0) + 1
        micros[e.name[:90]] = micros.get(e.name[:90], 0.0) + e.time_range.elapsed_us()
    return {"graph_step_ms": start.elapsed_time(end) / replays, "gpu_ops_per_step": len(kernels),
            "gpu_ops": dict(sorted(counts.items(), key=lambda kv: -kv[1])[:12]),
            "gpu_op_us": {name: round(us, 1) for name, us in sorted(micros.items(), key=lambda kv: -kv[1])[:12]}}


def load(impl: str, directory: Path):
    """The model and a `run(prompt, new_tokens) -> (prefill s, decode tok/s)` for one implementation."""
    if impl.startswith("ours"):
        from smolvlm.engine.generate import Engine, GenerationConfig
        from smolvlm.model.smolvlm import SmolVLM

        model = SmolVLM.from_pretrained(directory, device="cuda", dtype=torch.bfloat16).eval()
        engine = Engine(model, lambda ids: "", eos_token_ids=[],
                        step_mode="compiled-graphs" if "compiled" in impl else "graphs",
                        decode_kernel=impl.endswith("-kernel"), decode_linear=impl != "ours-attention-kernel")

        def run(prompt: dict, new_tokens: int) -> tuple[float, float]:
            batch = prompt["input_ids"].shape[0]
            results = engine.generate(prompt["input_ids"], prompt["attention_mask"],
                                      [GenerationConfig(max_new_tokens=new_tokens)] * batch,
                                      prompt["pixel_values"], prompt["pixel_attention_mask"])
            r = results[0]
            return r.prefill_seconds, _rate(batch * (r.completion_tokens - 1), r.decode_seconds)

        run.engine = engine
        return model, model.config, run

    from transformers import CompileConfig, SmolVLMForConditionalGeneration

    from smolvlm.config import SmolVLMConfig

    model = SmolVLMForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16).cuda().eval()
    options = {}
    if impl == "transformers-compiled":
        options = dict(cache_implementation="static", compile_config=CompileConfig(mode="default"))

    def run(prompt: dict, new_tokens: int) -> tuple[float, float]:
        clock = _StepClock()
        batch = prompt["input_ids"].shape[0]
        inputs = {k: v.cuda() for k, v in prompt.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           streamer=clock, pad_token_id=0, **options)
        first, last = clock.times[1], clock.times[-1]  # put() gets the prompt, then each token (synchronised)
        return first - start, _rate(batch * (new_tokens - 1), last - first)

    return model, SmolVLMConfig.from_json_file(directory / "config.json"), run


def worker(impl: str, directory: Path, new_tokens: int, batches: list[int]) -> dict:
    """Load one implementation and measure it; the figures as a dict."""
    start = time.perf_counter()
    model, config, run = load(impl, directory)
    out: dict = {"load_seconds": time.perf_counter() - start,
                 "mem_after_load_mib": torch.cuda.memory_allocated() / 2**20}
    if impl.startswith("ours"):
        out["decode_weight_bytes"] = decode_weight_bytes(model)
    # Warm-ups capture (and compile) each batch size's step; a static-cache peer compiles per cache length, so
    # its warm-up generates as many tokens as the measurement, while eager peers need only a few.
    warmup_tokens = new_tokens if impl != "transformers" else 8
    start = time.perf_counter()
    run(make_prompt(config, 1, 1), warmup_tokens)
    out["warmup_seconds"] = time.perf_counter() - start
    out["mem_after_warmup_mib"] = torch.cuda.memory_allocated() / 2**20
    out["prefill_1_tile_s"] = min(run(make_prompt(config, 1, 1), 1)[0] for _ in range(3))
    for batch in batches:
        prompt = make_prompt(config, 1, batch)
        if batch != 1:
            start = time.perf_counter()
            run(prompt, warmup_tokens)
            out[f"warmup_b{batch}_seconds"] = time.perf_counter() - start
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # reserved-memory peaks then count only what this generation asked the driver for
        torch.cuda.reset_peak_memory_stats()
        out[f"decode_b{batch}_tok_s"] = run(prompt, new_tokens)[1]
        out[f"peak_mem_b{batch}_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out[f"peak_reserved_b{batch}_mib"] = torch.cuda.max_memory_reserved() / 2**20
    for batch in batches if impl.startswith("ours") else []:  # after every peak: profiling allocates too
        try:  # diagnostics only: never lose the measurements above to them
            for key, value in step_profile(run.engine, make_prompt(config, 1, batch), new_tokens).items():
                out[f"{key}_b{batch}"] = value
        except Exception as e:  # noqa: BLE001
            out[f"profile_error_b{batch}"] = repr(e)
    return out


def summarize(report: dict) -> list[str]:
    """Ratios against transformers' default path and the goals, as lines of text (also stored in the report)."""
    lines, goals = [], {}
    for shape, figures in report["shapes"].items():
        ref = figures.get("transformers", {})
        for impl in (*OURS, "transformers-compiled"):
            f = figures.get(impl)
            if not f or "error" in f or not ref or "error" in ref:
                continue
            ratios = {}
            for key in [k for k in f if k.startswith("decode_b")]:
                ratios[key.replace("_tok_s", "_speedup")] = f[key] / ref[key]
            ratios["prefill_1_tile_speedup"] = ref["prefill_1_tile_s"] / f["prefill_1_tile_s"]
            for key in [k for k in f if k.startswith(("peak_mem_", "peak_reserved_"))]:
                ratios[key.replace("_mib", "_ratio")] = f[key] / ref[key]
            figures[f"ratios-{impl}"] = ratios
            lines.append(f"{shape:5} {impl:22} " + "  ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
        ours = [figures[i] for i in OURS if i in figures and "error" not in figures[i]]
        if not ours:
            continue
        best_b1 = max(f["decode_b1_tok_s"] for f in ours)
        roofline = report["copy_bandwidth_gb_s"] * 1e9 / ours[0]["decode_weight_bytes"]
        figures["b1_roofline_tok_s"] = roofline
        figures["b1_roofline_fraction"] = best_b1 / roofline
        lines.append(f"{shape:5} best batch-1 decode {best_b1:.0f} tok/s = {best_b1 / roofline:.1%} of the "
                     f"{roofline:.0f} tok/s bandwidth roofline")
        if shape == "256M":
            goals["256M decode b1 tok/s"] = best_b1
            if ref and "error" not in ref and "decode_b32_tok_s" in ref:
                goals["256M decode b32 vs transformers"] = max(f.get("decode_b32_tok_s", 0) for f in ours) / ref[
                    "decode_b32_tok_s"]
        if shape == "2.2B":
            goals["2.2B b1 roofline fraction"] = best_b1 / roofline
    report["goals"] = {name: {"measured": goals.get(name), "goal": goal,
                              "met": goals.get(name) is not None and goals[name] >= goal}
                       for name, goal in GOALS.items()}
    lines += [f"goal {name}: {v['measured']} (>= {v['goal']}) {'met' if v['met'] else 'NOT met'}"
              for name, v in report["goals"].items()]
    return lines


def run_plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (shape, implementation) runs the options select, in the order they run."""

    def impls(shape: str) -> list[str]:
        compiled = not args.no_compiled and shape in args.compiled_shapes
        kernel = shape in args.kernel_shapes
        return ["ours", "transformers", *(["ours-kernel", "ours-attention-kernel"] if kernel else []),
                *(["ours-compiled-kernel"] if kernel and compiled else []), *(["ours-compiled"] if compiled else [])]

    # Shape by shape, so that a run cut short keeps whole shapes; the peer's compiled path (slow, in no goal) last.
    plan = [(shape, impl) for shape in args.shapes for impl in impls(shape)]
    if not args.no_compiled:
        plan += [(shape, "transformers-compiled") for shape in args.shapes if shape in args.peer_compiled_shapes]
    if args.impls:
        plan = [(shape, impl) for shape, impl in plan if impl in args.impls]
    return plan


def parse_runs(parser: argparse.ArgumentParser, items: list[str], option: str) -> list[tuple[str, str]]:
    """SHAPE:IMPL items as (shape, impl) pairs; a malformed one is a usage error naming the option."""
    runs = [tuple(item.split(":", 1)) for item in items]
    for run in runs:
        if len(run) != 2 or run[0] not in SHAPES or run[1] not in IMPLS:
            parser.error(f"{option} takes SHAPE:IMPL with SHAPE in {list(SHAPES)} and IMPL in {list(IMPLS)}")
    return runs


def main(argv: list[str] | None = None) -> int:
    """Run the GPU benchmark and write JSON (rewritten after every measurement, so a cut-off run keeps its part)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda"])
    parser.add_argument("--shapes", nargs="+", default=["256M", "2.2B", "500M"], choices=list(SHAPES))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--compiled-shapes", nargs="*", default=["256M", "2.2B"],
                        help="shapes that also run ours-compiled (compiling takes a minute or so per batch size)")
    parser.add_argument("--peer-compiled-shapes", nargs="*", default=["256M"],
                        help="shapes that also run transformers' static cache + torch.compile (batch 1)")
    parser.add_argument("--kernel-shapes", nargs="*", default=["256M", "2.2B"],
                        help="shapes that also run ours with the fused decode kernel (graphs, and compiled where "
                             "--compiled-shapes has the shape)")
    parser.add_argument("--no-compiled", action="store_true", help="skip both compiled variants")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="run only these implementations (of those the "
                        "other options select)")
    parser.add_argument("--skip", nargs="*", default=[], metavar="SHAPE:IMPL",
                        help="leave out these runs, e.g. 256M:ours-compiled")
    parser.add_argument("--runs", nargs="+", metavar="SHAPE:IMPL",
                        help="run exactly these, in this order (instead of the plan the options above select)")
    parser.add_argument("--worker-timeout", type=int, default=240)
    parser.add_argument("--deadline", type=float, metavar="SECONDS",
                        help="start no run after this many seconds from the start, and cut each run off there "
                             "(for a device call of fixed length; the runs left out are listed in the JSON)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs the options select, run nothing")
    parser.add_argument("--out", type=Path, default=RESULTS / "generate-cuda.json")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    skip = set(parse_runs(parser, args.skip, "--skip"))
    plan = parse_runs(parser, args.runs, "--runs") if args.runs else run_plan(args)
    plan = [run for run in plan if run not in skip]
    if args.dry_run:
        print("\n".join(f"{shape} {impl}" for shape, impl in plan))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU (torch.cuda.is_available() is False)")
    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpoint, args.new_tokens, args.batches)))
        return 0

    began = time.perf_counter()
    report = {
        "device": torch.cuda.get_device_name(),
        "dtype": "bfloat16",
        "new_tokens": args.new_tokens,
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "copy_bandwidth_gb_s": copy_bandwidth() / 1e9,
        "shapes": {shape: {} for shape in dict.fromkeys(shape for shape, _ in plan)},
        "not_run": [],
    }
    torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def seconds_left() -> float:
        return float("inf") if args.deadline is None else args.deadline - (time.perf_counter() - began)

    lines = summarize(report)
    with tempfile.TemporaryDirectory() as tmp:
        for shape, impl in plan:
            if seconds_left() < MIN_RUN_SECONDS:
                report["not_run"].append(f"{shape}:{impl}")
                print(f"{shape} {impl}: not run, --deadline {args.deadline:.0f}s", file=sys.stderr, flush=True)
                args.out.write_text(json.dumps(report, indent=2) + "\n")
                continue
            directory = Path(tmp) / shape
            if not directory.exists():
                start = time.perf_counter()
                build_checkpoint(shape, directory, device="cuda", dtype=torch.bfloat16)
                print(f"{shape}: checkpoint written in {time.perf_counter() - start:.1f}s", file=sys.stderr)
            batches = [1] if impl == "transformers-compiled" else args.batches
            cmd = [sys.executable, __file__, "--worker", impl, "--checkpoint", str(directory),
                   "--new-tokens", str(args.new_tokens), "--batches", *map(str, batches)]
            timeout = max(1.0, min(args.worker_timeout, seconds_left()))
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                if done.returncode:
                    figures = {"error": done.stderr.strip()[-2000:]}
                else:
                    figures = json.loads(done.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                figures = {"error": f"timed out after {timeout:.0f}s"}
            report["shapes"][shape][impl] = figures
            print(f"{shape} {impl}: {json.dumps(figures)}", file=sys.stderr, flush=True)
            lines = summarize(report)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"copy bandwidth {report['copy_bandwidth_gb_s']:.0f} GB/s on {report['device']}")
    print("\n".join(lines))
    if report["not_run"]:
        print(f"not run (--deadline {args.deadline:.0f}s): {' '.join(report['not_run'])}")
    if args.json:
        print(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
