"""The fused decode kernels on the CPU, through Triton's interpreter: the attention kernel's (model/decode_attention.py)
output and cache writes equal the unfused rope + index_copy + SDPA, the projection kernels' (model/decode_linear.py)
the unfused norm + GEMM + gate / add, and engines using them decode the eager path's tokens. On a GPU, test_cuda.py
runs them compiled."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smolvlm.errors import ConfigError

TESTS = Path(__file__).resolve().parent


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter runs on a CPU)")
@pytest.mark.parametrize("kernels", ["decode_attention", "decode_linear"])
def test_kernels_and_engines_under_the_triton_interpreter(kernels):
    """decode_attention_check.py and decode_linear_check.py (the projection kernels of model/decode_linear.py)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    done = subprocess.run([sys.executable, str(TESTS / f"{kernels}_check.py")], env=env, cwd=TESTS,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"{kernels.replace('_', ' ')} checks passed" in done.stdout


def _hopper_ptx(kernel, args: dict, constexprs: dict, num_warps: int) -> str:
    """PTX of a Triton kernel for an H100/H200 (sm_90), compiled here without a GPU and specialised as Triton's
    JIT specialises a launch: `args` gives pointers as type strings ("*bf16"), aligned to 16 bytes, and ints."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = args.get(name)
        signature[name] = "constexpr" if name in constexprs else value if isinstance(value, str) else "i32"
        if name not in constexprs and (isinstance(value, str) or value % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    constants = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]


def _scalar_and_vector_loads(ptx: str) -> tuple[int, int]:
    """Global loads of one bf16 each, and of 16 bytes each."""
    return len(re.findall(r"ld\.global\.b16", ptx)), len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx))


needs_triton_cuda = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or "nvidia" not in importlib.import_module("triton.backends").backends,
    reason="needs Triton with its CUDA backend (it compiles for a GPU without one)")


@needs_triton_cuda
def test_decode_attention_compiles_for_hopper_with_vector_cache_loads():
    """The kernel reaches the caches through an address table, so only a hint tells the compiler they are aligned:
    without it each cached key and value element was a load of its own (the 2.2B batch-32 step lost ~20%)."""
    from smolvlm.model import decode_attention

    heads, length, head_dim = 32, 224, 64  # the 2.2B shape at the benchmark's cache length
    ptx = _hopper_ptx(decode_attention._decode_attention_kernel, {
        "qkv_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "cache_table_ptr": "*i64", "layer": 3,
        "num_layers": 24, "valid_ptr": "*i64", "position_ptr": "*i64", "out_ptr": "*bf16",
        "stride_qkv_b": 3 * heads * head_dim, "stride_rope_b": head_dim, "stride_cache_b": heads * length * head_dim,
        "stride_cache_h": length * head_dim, "stride_cache_l": head_dim, "stride_valid_b": length,
        "stride_out_b": heads * head_dim,
    }, dict(SCALE=head_dim**-0.5, CACHE_LEN=length, HEADS=heads, KV_HEADS=heads, HEAD_DIM=head_dim,
            BLOCK=decode_attention.BLOCK_L), num_warps=4)
    scalar, vector = _scalar_and_vector_loads(ptx)
    assert vector >= 16 and scalar <= 8, (scalar, vector)  # q / k / v of the new token may stay scalar


@needs_triton_cuda
@pytest.mark.parametrize("shape", [(6144, 2048, False, True, False), (8192, 2048, True, True, False),
                                   (2048, 8192, False, False, True), (960, 576, False, True, False)])
def test_decode_linear_compiles_for_hopper_with_vector_weight_loads(shape):
    """2.2B q/k/v (normed), gate/up (normed, gated), down (+ residual) and 256M q/k/v: 16-byte weight loads."""
    from smolvlm.model import decode_linear

    n, k, gated, norm, residual = shape
    options = decode_linear.launch_options(n, k, gated)
    num_warps = options.pop("num_warps")
    ptx = _hopper_ptx(decode_linear._decode_linear_kernel, {
        "x_ptr": "*bf16", "w_ptr": "*bf16", "norm_ptr": "*bf16", "residual_ptr": "*bf16", "out_ptr": "*bf16",
        "N": n, "stride_x": k, "stride_w": k, "stride_res": n, "stride_out": n,
    }, dict(K=k, K_POW2=decode_linear.next_power_of_2(k), EPS=1e-5, NORM=norm, GATED=gated, RESIDUAL=residual,
            **options), num_warps)
    scalar, vector = _scalar_and_vector_loads(ptx)
    assert vector >= 2 and scalar <= 1, (scalar, vector)  # the residual's one element a thread may be scalar


def test_without_triton_the_kernel_is_refused(monkeypatch):
    from helpers_model import tiny_config
    from smolvlm.model import decode_attention
    from smolvlm.model.text import TextDecoder

    monkeypatch.setattr(decode_attention, "available", lambda: False)
    with pytest.raises(ConfigError, match="needs Triton"):
        TextDecoder(tiny_config("256M").text).use_decode_kernel()


def test_without_a_c_compiler_the_kernel_is_refused(monkeypatch):
    from helpers_model import tiny_config
    from smolvlm.model import decode_attention
    from smolvlm.model.text import TextDecoder

    monkeypatch.setattr(decode_attention, "available", lambda: True)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(decode_attention.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="C compiler"):
        TextDecoder(tiny_config("256M").text).use_decode_kernel()


def test_the_kernel_needs_a_static_step_mode():
    from helpers_model import tiny_config
    from smolvlm.engine.generate import Engine
    from smolvlm.errors import GenerationError
    from smolvlm.model import SmolVLM

    with pytest.raises(GenerationError, match="static step"):
        Engine(SmolVLM(tiny_config("256M")), str, [0], step_mode="eager", decode_kernel=True)


def test_the_kernel_is_off_by_default_on_the_cpu_and_refused_for_odd_head_dims():
    from dataclasses import replace

    from helpers_model import tiny_config
    from smolvlm.engine.generate import Engine
    from smolvlm.model import SmolVLM
    from smolvlm.model.text import TextDecoder

    model = SmolVLM(tiny_config("256M"))
    Engine(model, str, [0], step_mode="graphs")
    assert model.text_model.decode_kernel_max_len == 0
    text = tiny_config("256M").text
    odd = TextDecoder(replace(text, hidden_size=text.num_attention_heads * 12, head_dim=12))
    reason = "power-of-two head_dim" if importlib.util.find_spec("triton") is not None else "needs Triton"
    assert reason in odd.decode_kernel_problem()
    with pytest.raises(ConfigError, match=reason):
        odd.use_decode_kernel()
