"""Batch-1 decode projections as one Triton kernel each: RMSNorm before, SiLU gate or residual add after.

At batch 1 a decode step's GEMMs are matrix-vector products, bound by reading the weights once, and on a small
model by the number of kernels: per layer the plain step launches a norm, the q/k/v GEMM, (attention), the output
GEMM, an add, a norm, the gate/up GEMM, SiLU, a multiply, the down GEMM and an add. With these kernels a layer is
five launches: norm + q/k/v, attention (decode_attention.py), output projection + residual, norm + gate/up + SiLU
gate, down projection + residual.

One program computes BLOCK_N outputs of one row: it streams BLOCK_N weight rows (contiguous, K long) through
(BLOCK_N, BLOCK_K) tiles against the row's input. Each program first reads the whole input row to get its RMS (a few
KiB, from L2), which saves the norm's own launch. K is a compile-time constant (a model has four or five), so the
masks along it vanish where BLOCK_K divides it. Intermediate values are rounded to the weights' dtype where the
unfused path rounds them (norm output, projection output, SiLU output, product), so in bf16 the two paths differ
only by the order of the sums.

Needs Triton, as decode_attention.py does; tests run it on the CPU through Triton's interpreter.
"""

from __future__ import annotations

from typing import Optional

import torch

from smolvlm.errors import GenerationError
from smolvlm.model import decode_attention

MAX_BATCH = 1  # rows a step may have to use these kernels: each row re-reads the weights, where a GEMM reads them once
# Weights a program loads per inner iteration (16 KiB in bf16, 32 a thread at 8 warps): with ~4 programs a
# multiprocessor that keeps ~64 KiB of loads in flight on each, about what HBM3 needs to stream at full rate.
TILE_ELEMENTS = 8192
MIN_PROGRAMS = 512  # ~4 per multiprocessor on an H100/H200, so that every one keeps loads in flight


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << (n - 1).bit_length()


def launch_options(n: int, k: int, gated: bool) -> dict[str, int]:
    """The kernel's block sizes and warps for n outputs over k inputs."""
    block_n, block_k = block_sizes(n, k, gated)
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 8 if block_n * block_k >= 8192 else 4}


def block_sizes(n: int, k: int, gated: bool) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for n outputs over k inputs: the largest row block (at most 16) that still gives
    MIN_PROGRAMS programs, and a K block that makes the tile (both tiles when gated) TILE_ELEMENTS large."""
    block_n = 16
    while block_n > 1 and -(-n // block_n) < MIN_PROGRAMS:
        block_n //= 2
    tile_k = TILE_ELEMENTS // block_n // (2 if gated else 1)
    return block_n, min(next_power_of_2(k), max(64, tile_k))


if decode_attention.available():
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_linear_kernel(
        x_ptr, w_ptr, norm_ptr, residual_ptr, out_ptr, N, stride_x, stride_w, stride_res, stride_out,
        K: tl.constexpr, K_POW2: tl.constexpr, EPS: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr,
        RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        block = tl.program_id(0)
        row = tl.program_id(1)
        dtype = w_ptr.dtype.element_ty
        outputs = block * BLOCK_N + tl.arange(0, BLOCK_N)  # (N_blk,)
        out_ok = outputs < N
        x_row = x_ptr + row * stride_x
        if NORM:  # the whole row in one load: a loop of small loads would wait on each in turn
            # (names of their own: a name the loop below assigns would be loop-carried, and must keep its shape)
            row_cols = tl.arange(0, K_POW2)
            whole = tl.load(x_row + row_cols, mask=row_cols < K, other=0.0).to(tl.float32)
            scale = 1.0 / tl.sqrt(tl.sum(whole * whole, 0) / K + EPS)
        acc = tl.zeros((BLOCK_N,), tl.float32)
        acc_up = tl.zeros((BLOCK_N,), tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)  # (K_blk,)
            col_ok = cols < K
            x = tl.load(x_row + cols, mask=col_ok, other=0.0).to(tl.float32)
            if NORM:  # the norm's output, rounded as F.rms_norm rounds it
                weight = tl.load(norm_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                x = (x * scale * weight).to(dtype).to(tl.float32)
            tile_ok = out_ok[:, None] & col_ok[None, :]
            at = outputs[:, None] * stride_w + cols[None, :]  # (N_blk, K_blk)
            w = tl.load(w_ptr + at, mask=tile_ok, other=0.0).to(tl.float32)
            acc += tl.sum(w * x[None, :], 1)
            if GATED:  # weight rows [gate (N) | up (N)]: this block's up rows are N further on
                w_up = tl.load(w_ptr + N * stride_w + at, mask=tile_ok, other=0.0).to(tl.float32)
                acc_up += tl.sum(w_up * x[None, :], 1)
        out = acc.to(dtype)
        if GATED:  # silu(gate) * up, each rounded as the unfused kernels round it
            gate = out.to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
            out = (silu.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
        if RESIDUAL:
            residual = tl.load(residual_ptr + row * stride_res + outputs, mask=out_ok, other=0.0)
            out = (out.to(tl.float32) + residual.to(tl.float32)).to(dtype)
        tl.store(out_ptr + row * stride_out + outputs, out, mask=out_ok)

    # Optional[...] rather than `| None` in the signature: the op's schema is inferred from it, and older torch
    # versions (2.11 on the GPU machines) may know only the former.
    @torch.library.triton_op("smolvlm::decode_linear", mutates_args=())
    def decode_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: Optional[torch.Tensor],  # noqa: UP045
                      residual: Optional[torch.Tensor], eps: float, gated: bool) -> torch.Tensor:  # noqa: UP045
        """x (B, K) -> (B, N): x @ weight.T, with x first RMS-normalised by `norm_weight` (K,) if given; `gated`:
        weight is (2N, K) [gate | up] and the result silu(gate) * up; `residual` (B, N) is added last."""
        B, K = x.shape
        rows = weight.shape[0]
        if weight.shape[1] != K or weight.stride(1) != 1 or x.stride(1) != 1 or x.dtype != weight.dtype:
            raise GenerationError(f"decode_linear needs x (B, K) and weight (N, K) with contiguous rows in one "
                                  f"dtype, got {tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}")
        if gated and rows % 2:
            raise GenerationError(f"a gated decode_linear needs [gate | up] weight rows, got {rows}")
        n = rows // 2 if gated else rows
        out = x.new_empty(B, n)
        options = launch_options(n, K, gated)
        res = residual if residual is not None else x  # any tensor but `out` (not read without RESIDUAL)
        torch.library.wrap_triton(_decode_linear_kernel)[(triton.cdiv(n, options["BLOCK_N"]), B)](
            x, weight, norm_weight if norm_weight is not None else x, res, out, n, x.stride(0), weight.stride(0),
            res.stride(0), out.stride(0), K=K, K_POW2=next_power_of_2(K), EPS=eps,
            NORM=norm_weight is not None, GATED=gated, RESIDUAL=residual is not None, **options,
        )
        return out
