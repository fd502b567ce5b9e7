"""The GPU benchmark's run plan, which a lent machine's short call depends on (`--dry-run` needs no GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "generate.py"


def _plan(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--dry-run", *options],
                          capture_output=True, text=True, timeout=120)


def test_the_plan_runs_shape_by_shape_and_the_peers_compiled_path_last():
    done = _plan("--shapes", "256M", "2.2B", "--compiled-shapes", "2.2B", "--kernel-shapes", "2.2B",
                 "--skip", "2.2B:ours-compiled")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == [
        "256M ours", "256M transformers", "2.2B ours", "2.2B transformers", "2.2B ours-kernel",
        "2.2B ours-attention-kernel", "2.2B ours-compiled-kernel", "256M transformers-compiled"]


def test_impls_filter_the_plan_and_a_bad_skip_is_refused():
    done = _plan("--shapes", "500M", "--impls", "transformers", "ours-kernel", "--kernel-shapes", "500M")
    assert done.stdout.split() == ["500M", "transformers", "500M", "ours-kernel"]
    done = _plan("--skip", "256M")
    assert done.returncode == 2 and "--skip takes SHAPE:IMPL" in done.stderr
