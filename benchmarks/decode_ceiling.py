"""How fast can batch-1 fp32 decoding be on this machine? The weight-streaming floor against transformers.

Decoding one token multiplies a single hidden vector by every linear weight of the decoder plus the LM head, so
each token reads all of those weights from memory once. This benchmark measures that floor directly: one
`F.linear` of a (1, K) vector by each weight matrix of a real-shape decoder (in layer order, weights far larger
than the caches, so they stream from RAM as in decoding), nothing else. No implementation that computes in fp32 can
decode faster than 1 / floor tokens per second. It then measures transformers' own decode at batch 1 on the same
shape, both the bare language model (LlamaForCausalLM) and the full VLM (SmolVLMForConditionalGeneration, one tile),
and reports the largest speedup over transformers the floor leaves room for.

    python benchmarks/decode_ceiling.py --shape 256M --out benchmarks/results/decode-ceiling-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from generate import RESULTS, SHAPES, build_checkpoint, make_prompt, run_transformers  # noqa: E402
import generate  # noqa: E402


def linear_weights(config) -> list[torch.Tensor]:
    """Random fp32 weights with the shapes of every linear a decode step runs (layers in order, then the LM head)."""
    text = config.text
    d, kv, ff = text.hidden_size, text.num_key_value_heads * text.head_dim, text.intermediate_size
    per_layer = [(text.num_attention_heads * text.head_dim, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff)]
    shapes = per_layer * text.num_hidden_layers + [(text.vocab_size, d)]
    return [torch.randn(shape) for shape in shapes]


def streaming_floor(weights: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """Best seconds per token for one matrix-vector product through every weight; and the bytes read per token."""
    with torch.inference_mode():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for w in weights:
                F.linear(torch.ones(1, w.shape[1]), w)
            best = min(best, time.perf_counter() - start)
    total = sum(w.numel() * w.element_size() for w in weights)
    return {"seconds_per_token": best, "weight_bytes_per_token": total, "gb_per_s": total / best / 1e9,
            "max_tok_s": 1.0 / best}


def transformers_bare_lm(config, new_tokens: int) -> float:
    """Decode tok/s of transformers' LlamaForCausalLM at the VLM's text shape (random weights, 64-token prompt)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    text = config.text
    llama = LlamaConfig(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                        intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
                        num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
                        rope_theta=text.rope_theta, tie_word_embeddings=True)
    model = LlamaForCausalLM(llama).eval()
    ids = torch.randint(0, text.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    clock = generate._StepClock()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                       pad_token_id=0)
    return (new_tokens - 1) / (clock.times[-1] - clock.times[1])


def main(argv: list[str] | None = None) -> int:
    """Measure the floor and transformers' decode; print a table or JSON and write it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="256M", choices=list(SHAPES))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=RESULTS / "decode-ceiling-cpu.json")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import SmolVLMForConditionalGeneration

    from smolvlm.config import preset

    config = preset(SHAPES[args.shape])
    floor = streaming_floor(linear_weights(config), args.repeats)
    bare = transformers_bare_lm(config, args.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(args.shape, Path(tmp))
        generate._CACHE["transformers"] = SmolVLMForConditionalGeneration.from_pretrained(
            tmp, dtype=torch.float32).eval()
        prompt = make_prompt(config, 1, 1)
        run_transformers(prompt, args.new_tokens)  # warm-up
        vlm = run_transformers(prompt, args.new_tokens)[1]
    report = {"shape": args.shape, "dtype": "float32", "threads": args.threads, "floor": floor,
              "transformers_bare_lm_tok_s": bare, "transformers_vlm_tok_s": vlm,
              "max_speedup_over_transformers_vlm": floor["max_tok_s"] / vlm,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.shape} fp32, {args.threads} threads: the weights of one decode step are "
              f"{floor['weight_bytes_per_token'] / 2**20:.0f} MiB")
        print(f"  matrix-vector products alone: {floor['seconds_per_token'] * 1e3:.1f} ms/token "
              f"({floor['gb_per_s']:.1f} GB/s) -> at most {floor['max_tok_s']:.1f} tok/s")
        print(f"  transformers VLM decode:      {vlm:.1f} tok/s; bare LlamaForCausalLM: {bare:.1f} tok/s")
        print(f"  largest possible speedup over transformers' VLM: {report['max_speedup_over_transformers_vlm']:.2f}x")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
