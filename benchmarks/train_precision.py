"""How much faster does `smolvlm train --precision bf16` make a training step on this machine than fp32?

Two measurements, both in one run: a matmul of the decoder's MLP shape (the ceiling: on a CPU with AMX, bf16 matmuls
run on the tile units), then the demo recipe's answer step (LoRA r 16 on the language model, the connector full, the
tower frozen; batch 8) on the bundled demo model, timed over the same steps in fp32 and with bf16 autocast.

    python benchmarks/train_precision.py --steps 12 --out benchmarks/results/train-precision-cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from smolvlm.demo import demo_checkpoint, hardware
from smolvlm.train import synthetic
from smolvlm.train.trainer import TrainConfig, Trainer

DEMO_MIX = "colour=1,exists=2,count=3,spatial=2,chart=3,ocr=3,grounding=8"  # the recipe's stage 26


def matmul_seconds(dtype: torch.dtype, m: int = 1024, k: int = 576, n: int = 1536, repeats: int = 20) -> float:
    """Seconds of one (m, k) @ (k, n) matmul in `dtype` (warm)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return (time.perf_counter() - start) / repeats


def step_seconds(model: str, data: str, precision: str, steps: int, out: Path) -> tuple[float, list[float]]:
    """Mean seconds of the answer steps after the first two (warm-up), and every step's loss."""
    trainer = Trainer(TrainConfig(model=model, data=data, out=str(out / precision), vision="frozen",
                                  connector="full", connector_lr=5e-5, text="lora", lora_r=16, lora_alpha=32,
                                  lr=3e-4, warmup_steps=2, max_steps=steps, batch_size=8, precision=precision,
                                  progress=False, tensorboard=False))
    losses, times = [], []
    for step in range(steps):
        start = time.perf_counter()
        losses.append(trainer.train_step(step)["loss"])
        times.append(time.perf_counter() - start)
    return sum(times[2:]) / len(times[2:]), losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="", help="model folder (default: the bundled demo, assembled)")
    parser.add_argument("--data", default="", help="training JSONL (default: 96 fresh samples of stage 26's mix)")
    parser.add_argument("--steps", type=int, default=12, help="steps per precision; the first two are warm-up")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first two are warm-up)")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(demo_checkpoint())
        data = args.data or str(synthetic.write_dataset(Path(tmp) / "data", 96, seed=7, split="train",
                                                        tasks=DEMO_MIX, progress=False))
        fp32_mm, bf16_mm = matmul_seconds(torch.float32), matmul_seconds(torch.bfloat16)
        (fp32_step, fp32_losses), (bf16_step, bf16_losses) = (
            step_seconds(model, data, precision, args.steps, Path(tmp)) for precision in ("fp32", "bf16"))
    result: dict[str, Any] = {
        "machine": hardware(),
        "matmul_1024x576x1536_ms": {"fp32": fp32_mm * 1e3, "bf16": bf16_mm * 1e3, "speedup": fp32_mm / bf16_mm},
        "answer_step_s": {"fp32": fp32_step, "bf16": bf16_step, "speedup": fp32_step / bf16_step},
        "losses": {"fp32": fp32_losses, "bf16": bf16_losses}, "model": model, "steps": args.steps}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        mm, step = result["matmul_1024x576x1536_ms"], result["answer_step_s"]
        print(f"matmul 1024x576x1536: fp32 {mm['fp32']:.2f} ms, bf16 {mm['bf16']:.2f} ms ({mm['speedup']:.1f}x)")
        print(f"answer step, batch 8: fp32 {step['fp32']:.2f} s, bf16 {step['bf16']:.2f} s ({step['speedup']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
