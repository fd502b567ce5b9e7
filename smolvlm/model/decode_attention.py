"""One-kernel decode attention for the static (CUDA-graph) step: rope, cache write and attention of one new token.

A decode step of a small model is bound by its kernel count, not by arithmetic. Per layer the plain path launches
a rope kernel, two cache writes, SDPA (and a memset before it); this Triton kernel does all of it in one launch per
layer. One program per (row, query head): it rotates its query and its kv head's new key, the group's first head
stores that key and the new value at the write position, and it attends over the cache under the row's mask with an
online softmax. The new key/value enter the attention from registers, so no program reads what another writes.
The kernel finds the layer's cache buffers through a table of addresses (KVCache.bind_pointers) rather than as
arguments, so a CUDA graph of the step holds the table's address only: the engine allocates each request's cache
after its vision tower ran, writes the new addresses into the table and replays the same graph.
A program per query head (not per kv head) keeps its tiles 2-D, (positions, head_dim), and gives a batch-1 step
HEADS programs instead of KV_HEADS: the first version, one program per kv head with (group, positions, head_dim)
tiles, took ~30 us a layer on an H200 at batch 1, slower than the five kernels it replaced.

Needs Triton (shipped with CUDA builds of torch); `available()` says whether it can run. Tests run the same kernel
on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import torch

from smolvlm.errors import GenerationError

MAX_CACHE_LEN = 4096  # one program per (row, head) walks the whole cache: beyond this, SDPA's split work wins
BLOCK_L = 128  # cache positions per inner iteration: a (128, 64) fp32 tile is 64 registers a thread


def available() -> bool:
    """True when Triton is importable (CUDA builds of torch ship it)."""
    return importlib.util.find_spec("triton") is not None


def compiler_found() -> bool:
    """True when Triton can build the small C launcher every compiled kernel needs (gcc, clang or $CC; Triton's
    interpreter needs none)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("CC"):
        return True
    return shutil.which("gcc") is not None or shutil.which("clang") is not None


if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_attention_kernel(
        qkv_ptr, cos_ptr, sin_ptr, cache_table_ptr, layer, num_layers, valid_ptr, position_ptr, out_ptr,
        stride_qkv_b, stride_rope_b, stride_cache_b, stride_cache_h, stride_cache_l, stride_valid_b, stride_out_b,
        SCALE: tl.constexpr, CACHE_LEN: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        kv_head = head // (HEADS // KV_HEADS)
        dims = tl.arange(0, HEAD_DIM)  # (hd,)
        half = HEAD_DIM // 2
        partner = tl.where(dims < half, dims + half, dims - half)  # rotate_half's source of each dim
        position = tl.load(position_ptr)

        # rope of this row: x -> x cos + x[partner] ssin, with ssin the signed sin (-sin | +sin)
        cos = tl.load(cos_ptr + row * stride_rope_b + dims).to(tl.float32)
        ssin = tl.load(sin_ptr + row * stride_rope_b + dims).to(tl.float32)

        # qkv rows are [q heads | k heads | v heads], each HEAD_DIM wide
        base = qkv_ptr + row * stride_qkv_b
        q_at = base + head * HEAD_DIM
        k_at = base + (HEADS + kv_head) * HEAD_DIM
        v_at = base + (HEADS + KV_HEADS + kv_head) * HEAD_DIM
        out_dtype = qkv_ptr.dtype.element_ty  # the cache's dtype too (the op checks)
        # The table holds addresses in 16-byte units. Only multiple_of tells the compiler that they are aligned:
        # without it every cache element is a load of its own (PTX ld.global.b16; test_decode_attention.py checks).
        k_address = tl.load(cache_table_ptr + layer) * 16
        v_address = tl.load(cache_table_ptr + num_layers + layer) * 16
        k_cache_ptr = tl.multiple_of(k_address.to(tl.pointer_type(out_dtype)), 16)
        v_cache_ptr = tl.multiple_of(v_address.to(tl.pointer_type(out_dtype)), 16)
        query = tl.load(q_at + dims).to(tl.float32) * cos + tl.load(q_at + partner).to(tl.float32) * ssin
        query = query.to(out_dtype).to(tl.float32) * SCALE  # rounded as the unfused rope's output is
        new_k = tl.load(k_at + dims).to(tl.float32) * cos + tl.load(k_at + partner).to(tl.float32) * ssin
        new_k = new_k.to(out_dtype)
        new_v = tl.load(v_at + dims)
        cache = row * stride_cache_b + kv_head * stride_cache_h
        # the group's first program writes the shared kv head: (hd,), all true there, all false elsewhere
        writer = dims + head % (HEADS // KV_HEADS) * HEAD_DIM < HEAD_DIM
        tl.store(k_cache_ptr + cache + position * stride_cache_l + dims, new_k, mask=writer)
        tl.store(v_cache_ptr + cache + position * stride_cache_l + dims, new_v.to(out_dtype), mask=writer)
        # attention reads the rounded values, as the unfused path reads them back from the cache
        new_k = new_k.to(tl.float32)
        new_v = new_v.to(out_dtype).to(tl.float32)

        best = float("-inf")
        total = 0.0
        acc = tl.zeros((HEAD_DIM,), tl.float32)
        for start in range(0, CACHE_LEN, BLOCK):
            cols = start + tl.arange(0, BLOCK)  # (L,)
            inside = cols < CACHE_LEN
            attend = (tl.load(valid_ptr + row * stride_valid_b + cols, mask=inside, other=0) != 0) & inside
            here = (cols == position)[:, None]  # the new token's column comes from registers
            at = cache + cols[:, None] * stride_cache_l + dims[None, :]  # (L, hd)
            keys = tl.load(k_cache_ptr + at, mask=inside[:, None], other=0.0).to(tl.float32)
            values = tl.load(v_cache_ptr + at, mask=inside[:, None], other=0.0).to(tl.float32)
            keys = tl.where(here, new_k[None, :], keys)
            values = tl.where(here, new_v[None, :], values)
            scores = tl.where(attend, tl.sum(keys * query[None, :], 1), float("-inf"))  # (L,)
            new_best = tl.maximum(best, tl.max(scores, 0))
            safe = tl.where(new_best == float("-inf"), 0.0, new_best)  # a block with nothing to attend adds 0
            weights = tl.exp(scores - safe)  # (L,)
            shrink = tl.exp(best - safe)
            total = total * shrink + tl.sum(weights, 0)
            acc = acc * shrink + tl.sum(weights[:, None] * values, 0)
            best = new_best
        tl.store(out_ptr + row * stride_out_b + head * HEAD_DIM + dims, (acc / total).to(out_ptr.dtype.element_ty))

    # Declared pure: the caches it writes are reached through the table, which nothing else in a decode step reads.
    @torch.library.triton_op("smolvlm::decode_attention", mutates_args=())
    def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_like: torch.Tensor,
                         cache_table: torch.Tensor, layer: int, valid: torch.Tensor, position: torch.Tensor,
                         heads: int) -> torch.Tensor:
        """qkv (B, (H + 2 KV) hd) of one new token per row, rope cos / signed sin (B, hd), `cache_table` (2, layers)
        int64 the addresses in 16-byte units (KVCache.bind_pointers) of the layers' key / value caches (B, KV, L,
        hd), shaped and strided as `cache_like`, valid (B, L) nonzero = attend (this token's column included),
        position (1,) -> attention out (B, H hd); the rotated key and the value are written at column `position`
        of layer `layer`'s caches."""
        B = qkv.shape[0]
        kv_heads, cache_len, head_dim = cache_like.shape[1:]
        if cache_like.dtype != qkv.dtype or cache_table.dtype != torch.int64 or cache_like.stride(3) != 1:
            raise GenerationError("decode_attention needs caches in qkv's dtype with contiguous rows, and an int64 "
                                  "address table")
        out = qkv.new_empty(B, heads * head_dim)
        grid = (B, heads)
        torch.library.wrap_triton(_decode_attention_kernel)[grid](
            qkv, cos, sin, cache_table, layer, cache_table.shape[1], valid, position, out,
            qkv.stride(0), cos.stride(0), cache_like.stride(0), cache_like.stride(1), cache_like.stride(2),
            valid.stride(0), out.stride(0), SCALE=head_dim**-0.5, CACHE_LEN=cache_len, HEADS=heads,
            KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK=min(BLOCK_L, triton.next_power_of_2(cache_len)),
        )
        return out
