"""Checks of the batch-1 projection kernels (model/decode_linear.py), run as a script under TRITON_INTERPRET=1 (see
test_decode_attention.py): each equals the unfused norm / GEMM / SiLU gate / residual add, and engines whose
batch-1 steps run every layer through them decode the eager path's tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helpers_model import image_prompt, random_tiles, randomize_, tiny_config
from smolvlm.engine.generate import Engine, GenerationConfig
from smolvlm.model import SmolVLM, decode_linear
from smolvlm.model.text import DecoderLayer


def reference(x, weight, norm_weight, residual, eps, gated):
    """The unfused path, in x's dtype: rms_norm, linear, silu(gate) * up, + residual."""
    if norm_weight is not None:
        x = F.rms_norm(x.float(), norm_weight.shape, norm_weight.float(), eps).to(x.dtype)
    out = F.linear(x, weight)
    if gated:
        gate, up = out.chunk(2, dim=-1)
        out = F.silu(gate) * up
    return out if residual is None else out + residual


def check_op(rows: int, n: int, k: int, dtype: torch.dtype, tolerance: float) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + k)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(k, generator=gen)).to(dtype)
    for gated in (False, True):
        weight = (torch.randn(2 * n if gated else n, k, generator=gen) / k**0.5).to(dtype)
        residual = torch.randn(rows, n, generator=gen).to(dtype)
        for norm, res in ((norm_weight, None), (None, residual), (norm_weight, residual), (None, None)):
            got = torch.ops.smolvlm.decode_linear(x, weight, norm, res, 1e-5, gated)
            want = reference(x.double(), weight.double(), None if norm is None else norm.double(),
                             None if res is None else res.double(), 1e-5, gated)
            assert got.dtype == dtype and got.shape == (rows, n)
            error = (got.double() - want).abs().max().item()
            assert error <= tolerance, (rows, n, k, gated, norm is not None, res is not None, error)


def check_engine(family: str) -> None:
    config = tiny_config(family)
    model = randomize_(SmolVLM(config).eval(), seed=11)
    ids = image_prompt(config, tiles=1, text_before=3, text_after=2, seed=4)[None]  # one row: batch-1 steps
    mask = torch.ones_like(ids)
    pixels, pixel_mask = random_tiles(config, [1], seed=2)
    configs = [GenerationConfig(max_new_tokens=8)]

    def tokens(**options) -> list[int]:
        engine = Engine(model, str, [config.text.vocab_size - 1], **options)
        return engine.generate(ids, mask, configs, pixel_values=pixels, pixel_attention_mask=pixel_mask)[0].token_ids

    plain = tokens(step_mode="eager")
    calls = []
    step = DecoderLayer.decode_step
    DecoderLayer.decode_step = lambda self, *args: calls.append(1) or step(self, *args)
    try:
        assert tokens(step_mode="graphs", decode_kernel=True, decode_linear=False) == plain
        assert not calls
        assert tokens(step_mode="graphs", decode_kernel=True) == plain
        assert len(calls) == 7 * config.text.num_hidden_layers, len(calls)  # 7 static steps, every layer
    finally:
        DecoderLayer.decode_step = step


if __name__ == "__main__":
    check_op(rows=1, n=37, k=40, dtype=torch.float32, tolerance=1e-5)
    check_op(rows=2, n=64, k=96, dtype=torch.bfloat16, tolerance=0.1)
    decode_linear.TILE_ELEMENTS, decode_linear.MIN_PROGRAMS = 64, 4  # several K blocks, and row blocks of 8
    assert decode_linear.block_sizes(37, 300, gated=False) == (8, 64)
    check_op(rows=1, n=37, k=300, dtype=torch.float32, tolerance=1e-5)
    for family in ("256M", "2.2B"):
        check_engine(family)
    print("decode linear checks passed")
