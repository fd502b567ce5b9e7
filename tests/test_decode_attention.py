"""The fused decode kernels on the CPU, through Triton's interpreter: the attention kernel's (model/decode_attention.py)
output and cache writes equal the unfused rope + index_copy + SDPA, the projection kernels' (model/decode_linear.py)
the unfused norm + GEMM + gate / add, and engines using them decode the eager path's tokens. On a GPU, test_cuda.py
runs them compiled."""

from __future__ import annotations

import importlib.util
import os
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
