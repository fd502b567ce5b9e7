"""The GPU benchmark's run plan, which a lent machine's short call depends on (`--dry-run` needs no GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import torch

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


def test_runs_set_the_order_and_a_bad_run_is_refused():
    done = _plan("--runs", "2.2B:ours-kernel", "256M:transformers", "500M:ours", "--skip", "500M:ours")
    assert done.stdout.split("\n")[:-1] == ["2.2B ours-kernel", "256M transformers"]
    done = _plan("--runs", "256M:nope")
    assert done.returncode == 2 and "--runs takes SHAPE:IMPL" in done.stderr


def test_the_deadline_cuts_each_run_off_and_lists_the_runs_left_out(tmp_path, monkeypatch):
    """No GPU needed: the workers, the checkpoint and the clock are stand-ins; each run takes 30 fake seconds."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import generate_cuda

    now, timeouts = [0.0], []

    def worker_process(cmd, timeout, **_):
        timeouts.append(timeout)
        now[0] += 30
        impl = cmd[cmd.index("--worker") + 1]
        figures = {"prefill_1_tile_s": 0.05, "decode_b1_tok_s": 10.0 if impl == "transformers" else 500.0,
                   "peak_mem_b1_mib": 500.0, **({} if impl == "transformers" else {"decode_weight_bytes": 10**9})}
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(figures) + "\n", stderr="")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "stand-in GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(generate_cuda, "copy_bandwidth", lambda: 1e12)
    monkeypatch.setattr(generate_cuda, "build_checkpoint", lambda shape, directory, **_: directory.mkdir())
    monkeypatch.setattr(generate_cuda, "subprocess", types.SimpleNamespace(
        run=worker_process, TimeoutExpired=subprocess.TimeoutExpired))
    monkeypatch.setattr(generate_cuda, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    out = tmp_path / "generate-cuda.json"
    assert generate_cuda.main(["--runs", "256M:transformers", "256M:ours-kernel", "2.2B:ours-kernel",
                               "--batches", "1", "--deadline", "70", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert timeouts == [70, 40]  # the worker timeout (240 s) cut to the time left; 10 s left is under a run
    assert report["not_run"] == ["2.2B:ours-kernel"]
    assert set(report["shapes"]["256M"]) >= {"transformers", "ours-kernel"} and report["shapes"]["2.2B"] == {}
    assert report["goals"]["256M decode b1 tok/s"] == {"measured": 500.0, "goal": 1000.0, "met": False}
