"""One-kernel decode attention for the static (CUDA-graph) step: rope, cache write and attention of one new token.

A decode step of a small model is bound by its kernel count, not by arithmetic. Per layer the plain path launches
a rope kernel, two cache writes, SDPA (and a memset before it); this Triton kernel does all of it in one launch per
layer: for each (row, kv head) it rotates the new key, stores it and the new value at the write position, rotates
the query heads of that kv head and attends over the cache under the row's mask with an online softmax. The new
key/value enter the attention from registers, so no program reads what it has just written.

Needs Triton (shipped with CUDA builds of torch); `available()` says whether it can run. Tests run the same kernel
on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib.util

import torch

MAX_CACHE_LEN = 4096  # one program per (row, kv head) walks the whole cache: beyond this, SDPA's split work wins
BLOCK_L = 64  # cache positions per inner iteration


def available() -> bool:
    """True when Triton is importable (CUDA builds of torch ship it)."""
    return importlib.util.find_spec("triton") is not None


if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_attention_kernel(
        qkv_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, valid_ptr, position_ptr, out_ptr,
        stride_qkv_b, stride_rope_b, stride_cache_b, stride_cache_h, stride_cache_l, stride_valid_b, stride_out_b,
        scale, CACHE_LEN: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        dims = tl.arange(0, HALF)  # (HALF,)
        heads = tl.arange(0, GROUP_PAD)  # (G,)
        head_ok = heads < GROUP
        position = tl.load(position_ptr)

        # rope angles of this row: x -> (x1 cos1 + x2 ssin1, x2 cos2 + x1 ssin2), ssin = (-sin, +sin)
        rope = row * stride_rope_b
        cos1 = tl.load(cos_ptr + rope + dims).to(tl.float32)
        cos2 = tl.load(cos_ptr + rope + HALF + dims).to(tl.float32)
        sin1 = tl.load(sin_ptr + rope + dims).to(tl.float32)
        sin2 = tl.load(sin_ptr + rope + HALF + dims).to(tl.float32)

        # the new key and value (qkv rows are [q heads | k heads | v heads], each 2 * HALF wide)
        base = qkv_ptr + row * stride_qkv_b
        k_at = base + (HEADS + kv_head) * 2 * HALF
        v_at = base + (HEADS + KV_HEADS + kv_head) * 2 * HALF
        k1 = tl.load(k_at + dims).to(tl.float32)
        k2 = tl.load(k_at + HALF + dims).to(tl.float32)
        new_k1 = k1 * cos1 + k2 * sin1
        new_k2 = k2 * cos2 + k1 * sin2
        new_v1 = tl.load(v_at + dims).to(tl.float32)
        new_v2 = tl.load(v_at + HALF + dims).to(tl.float32)
        cache = row * stride_cache_b + kv_head * stride_cache_h
        slot = cache + position * stride_cache_l
        out_dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + slot + dims, new_k1.to(out_dtype))
        tl.store(k_cache_ptr + slot + HALF + dims, new_k2.to(out_dtype))
        tl.store(v_cache_ptr + slot + dims, new_v1.to(out_dtype))
        tl.store(v_cache_ptr + slot + HALF + dims, new_v2.to(out_dtype))
        # attention reads the rounded values, as the unfused path reads them back from the cache
        new_k1 = new_k1.to(out_dtype).to(tl.float32)
        new_k2 = new_k2.to(out_dtype).to(tl.float32)
        new_v1 = new_v1.to(out_dtype).to(tl.float32)
        new_v2 = new_v2.to(out_dtype).to(tl.float32)

        # the query heads of this kv head, rotated and scaled: (G, HALF) halves
        q_at = base + (kv_head * GROUP + heads[:, None]) * 2 * HALF + dims[None, :]
        q1 = tl.load(q_at, mask=head_ok[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_at + HALF, mask=head_ok[:, None], other=0.0).to(tl.float32)
        rq1 = (q1 * cos1[None, :] + q2 * sin1[None, :]).to(out_dtype).to(tl.float32) * scale
        rq2 = (q2 * cos2[None, :] + q1 * sin2[None, :]).to(out_dtype).to(tl.float32) * scale

        best = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        total = tl.zeros((GROUP_PAD,), tl.float32)
        acc1 = tl.zeros((GROUP_PAD, HALF), tl.float32)
        acc2 = tl.zeros((GROUP_PAD, HALF), tl.float32)
        for start in range(0, CACHE_LEN, BLOCK):
            cols = start + tl.arange(0, BLOCK)  # (L,)
            inside = cols < CACHE_LEN
            attend = (tl.load(valid_ptr + row * stride_valid_b + cols, mask=inside, other=0) != 0) & inside
            here = (cols == position)[:, None]  # the new token's column comes from registers
            at = k_cache_ptr + cache + cols[:, None] * stride_cache_l + dims[None, :]  # (L, HALF)
            key1 = tl.where(here, new_k1[None, :], tl.load(at, mask=inside[:, None], other=0.0).to(tl.float32))
            key2 = tl.where(here, new_k2[None, :], tl.load(at + HALF, mask=inside[:, None], other=0.0).to(tl.float32))
            scores = tl.sum(rq1[:, None, :] * key1[None, :, :], 2) + tl.sum(rq2[:, None, :] * key2[None, :, :], 2)
            scores = tl.where(attend[None, :], scores, float("-inf"))  # (G, L)
            new_best = tl.maximum(best, tl.max(scores, 1))
            safe = tl.where(new_best == float("-inf"), 0.0, new_best)  # a block with nothing to attend adds 0
            weights = tl.exp(scores - safe[:, None])  # (G, L)
            shrink = tl.exp(best - safe)
            total = total * shrink + tl.sum(weights, 1)
            vat = v_cache_ptr + cache + cols[:, None] * stride_cache_l + dims[None, :]
            val1 = tl.where(here, new_v1[None, :], tl.load(vat, mask=inside[:, None], other=0.0).to(tl.float32))
            val2 = tl.where(here, new_v2[None, :], tl.load(vat + HALF, mask=inside[:, None], other=0.0).to(tl.float32))
            acc1 = acc1 * shrink[:, None] + tl.sum(weights[:, :, None] * val1[None, :, :], 1)
            acc2 = acc2 * shrink[:, None] + tl.sum(weights[:, :, None] * val2[None, :, :], 1)
            best = new_best

        out_at = out_ptr + row * stride_out_b + (kv_head * GROUP + heads[:, None]) * 2 * HALF + dims[None, :]
        tl.store(out_at, (acc1 / total[:, None]).to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
        tl.store(out_at + HALF, (acc2 / total[:, None]).to(out_ptr.dtype.element_ty), mask=head_ok[:, None])

    @torch.library.triton_op("smolvlm::decode_attention", mutates_args={"k_cache", "v_cache"})
    def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, valid: torch.Tensor, position: torch.Tensor, heads: int
                         ) -> torch.Tensor:
        """qkv (B, (H + 2 KV) hd) of one new token per row, rope cos / signed sin (B, hd), caches (B, KV, L, hd),
        valid (B, L) nonzero = attend (this token's column included), position (1,) -> attention out (B, H hd);
        the rotated key and the value are written at column `position` of the caches."""
        B = qkv.shape[0]
        kv_heads, cache_len, head_dim = k_cache.shape[1:]
        group = heads // kv_heads
        out = qkv.new_empty(B, heads * head_dim)
        grid = (B, kv_heads)
        torch.library.wrap_triton(_decode_attention_kernel)[grid](
            qkv, cos, sin, k_cache, v_cache, valid, position, out,
            qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), valid.stride(0),
            out.stride(0), head_dim**-0.5,
            CACHE_LEN=cache_len, HEADS=heads, KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
            HALF=head_dim // 2, BLOCK=BLOCK_L,
        )
        return out
