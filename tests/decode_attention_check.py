"""Checks of the fused decode-attention kernel, run as a script under TRITON_INTERPRET=1 (see
test_decode_attention.py): the interpreter must be chosen before the kernel is defined, so it gets its own process."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helpers_model import image_prompt, left_pad, ours_from_hf, hf_smolvlm, random_tiles, tiny_config
from smolvlm.engine.generate import Engine, GenerationConfig
from smolvlm.engine.kv_cache import KVCache
from smolvlm.model import decode_attention  # noqa: F401  (registers torch.ops.smolvlm.decode_attention)
from smolvlm.model.text import Attention, apply_rotary


def reference(qkv, cos, sin, k_cache, v_cache, valid, position, heads):
    """The unfused path: rope, index_copy into the caches, SDPA under the additive mask."""
    B = qkv.shape[0]
    kv_heads, _, hd = k_cache.shape[1:]
    q, k, v = qkv.view(B, 1, heads + 2 * kv_heads, hd).split([heads, kv_heads, kv_heads], dim=2)
    c, s = cos.view(B, 1, 1, hd), sin.view(B, 1, 1, hd)
    q, k = apply_rotary(q, c, s).transpose(1, 2), apply_rotary(k, c, s).transpose(1, 2)
    k_cache.index_copy_(2, position, k)
    v_cache.index_copy_(2, position, v.transpose(1, 2))
    mask = torch.zeros(valid.shape, dtype=qkv.dtype).masked_fill(valid == 0, float("-inf"))[:, None, None, :]
    q = q.reshape(B, kv_heads, heads // kv_heads, hd)
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask).reshape(B, heads * hd)


def check_kernel(heads: int, kv_heads: int, length: int, position: int, dtype: torch.dtype, tolerance: float) -> None:
    gen = torch.Generator().manual_seed(heads * 100 + length)
    B, hd = 3, 16
    qkv = torch.randn(B, (heads + 2 * kv_heads) * hd, generator=gen).to(dtype)
    angles = torch.rand(B, hd // 2, generator=gen) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([-angles.sin(), angles.sin()], -1).to(dtype)
    caches = KVCache(2, B, kv_heads, hd, length, dtype=dtype)  # the kernel writes layer 1, reached by its table
    for buffer in caches.keys + caches.values:
        buffer.copy_(torch.randn(buffer.shape, generator=gen))
    k_cache, v_cache = caches.keys[1].clone(), caches.values[1].clone()
    before_layer0 = caches.keys[0].clone(), caches.values[0].clone()
    valid = (torch.rand(B, length, generator=gen) > 0.3).long()
    valid[:, position + 1 :] = 0
    valid[:, position] = 1
    valid[1, :position] = 0  # a row that sees only the new token
    at = torch.tensor([position])
    ours_k, ours_v = caches.keys[1], caches.values[1]
    out = torch.ops.smolvlm.decode_attention(qkv, cos, sin, ours_k, caches.bind_pointers(), 1, valid, at, heads)
    assert torch.equal(caches.keys[0], before_layer0[0]) and torch.equal(caches.values[0], before_layer0[1])
    ref_k, ref_v = k_cache.float().clone(), v_cache.float().clone()  # the reference writes into these
    want = reference(qkv.float(), cos.float(), sin.float(), ref_k, ref_v, valid, at, heads)
    assert out.dtype == dtype and out.shape == (B, heads * hd)
    assert (out.float() - want).abs().max() <= tolerance, (out.float() - want).abs().max()
    assert (ours_k.float() - ref_k).abs().max() <= tolerance and (ours_v.float() - ref_v).abs().max() == 0
    untouched = torch.ones(length, dtype=torch.bool)
    untouched[position] = False
    assert torch.equal(ours_k[:, :, untouched], k_cache[:, :, untouched])


def check_engine(family: str) -> None:
    config = tiny_config(family)
    model = ours_from_hf(hf_smolvlm(config, seed=3), config)
    ids, mask = left_pad([image_prompt(config, tiles=n, text_before=3, text_after=2, seed=n) for n in (1, 2)])
    pixels, pixel_mask = random_tiles(config, [1, 2], seed=1)
    configs = [GenerationConfig(max_new_tokens=n) for n in (5, 9)]  # the first row leaves early

    def tokens(**options) -> list[list[int]]:
        engine = Engine(model, lambda t: " ".join(map(str, t)), [config.text.vocab_size - 1], **options)
        results = engine.generate(ids, mask, configs, pixel_values=pixels, pixel_attention_mask=pixel_mask)
        return [r.token_ids for r in results]

    plain = tokens(step_mode="eager")
    calls = []
    fused = Attention.decode_attention  # the kernel's call, with or without decode_linear.py's projections
    Attention.decode_attention = lambda self, *args: calls.append(1) or fused(self, *args)
    try:
        assert tokens(step_mode="graphs", decode_kernel=True) == plain
        assert tokens(step_mode="static", decode_kernel=True) == plain
        # A slot's later requests each decode in a cache of their own, bound to the slot's address table.
        engine = Engine(model, str, [config.text.vocab_size - 1], step_mode="graphs", decode_kernel=True)
        for _ in range(2):
            results = engine.generate(ids, mask, configs, pixel_values=pixels, pixel_attention_mask=pixel_mask)
            assert [r.token_ids for r in results] == plain
    finally:
        Attention.decode_attention = fused
    assert len(calls) == 4 * 8 * config.text.num_hidden_layers  # 8 static steps per run, every layer fused


if __name__ == "__main__":
    check_kernel(heads=6, kv_heads=2, length=80, position=41, dtype=torch.float32, tolerance=1e-5)
    check_kernel(heads=4, kv_heads=4, length=128, position=127, dtype=torch.float32, tolerance=1e-5)
    check_kernel(heads=9, kv_heads=3, length=64, position=0, dtype=torch.bfloat16, tolerance=0.05)
    for family in ("256M", "2.2B"):
        check_engine(family)
    print("decode attention checks passed")
