"""The `smolvlm` command on a tiny checkpoint written by the test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from checkpoints import write_tiny_checkpoint
from smolvlm.cli import find_images, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40 + 10 * i, 90, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_json_and_streaming_agree(checkpoint, photos, capsys):
    args = ["run", "-m", str(checkpoint), "-i", str(photos / "p0.png"), "Describe.", "--max-new-tokens", "6"]
    code, out, _ = _cli(capsys, *args, "--json")
    assert code == 0
    record = json.loads(out)
    assert record["usage"]["completion_tokens"] >= 1 and record["finish_reason"] in ("stop", "length")
    code, streamed, _ = _cli(capsys, *args)
    assert code == 0 and streamed.rstrip("\n") == record["answer"]


def test_run_several_images_and_errors_are_one_line(checkpoint, photos, capsys):
    code, out, _ = _cli(capsys, "run", "-m", str(checkpoint), "-i", str(photos / "p0.png"), "-i", str(photos / "p1.png"),
                        "Compare.", "--max-new-tokens", "3", "--json")
    assert code == 0 and json.loads(out)["usage"]["prompt_tokens"] > 20
    code, _, err = _cli(capsys, "run", "-m", str(checkpoint), "-i", str(photos / "broken.jpg"), "What?")
    assert code == 1 and err.startswith("error:") and "broken.jpg" in err and "Traceback" not in err
    code, _, err = _cli(capsys, "run", "-m", str(checkpoint / "nope"), "What?")
    assert code == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_info_json(checkpoint, capsys):
    code, out, _ = _cli(capsys, "info", "-m", str(checkpoint), "--json")
    info = json.loads(out)
    assert code == 0 and info["tokens_per_tile"] == 4 and info["tile_size"] == 64 and info["kind"] == "vision-language"


def test_chat_attaches_images_and_resets(checkpoint, photos, monkeypatch, capsys):
    import io

    lines = f"Hello\n/image {photos / 'p2.png'}\nWhat is this?\n/image {photos / 'missing.png'}\n/reset\nBye\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code, out, err = _cli(capsys, "chat", "-m", str(checkpoint), "--max-new-tokens", "3")
    assert code == 0
    assert len(out.strip().splitlines()) == 3  # three answers
    assert "attached" in err and "missing.png" in err and "reset" in err


def test_describe_reports_corrupt_images_and_resumes(checkpoint, photos, tmp_path, capsys):
    out_file = tmp_path / "answers.jsonl"
    code, out, err = _cli(capsys, "describe", "-m", str(checkpoint), str(photos), "-o", str(out_file),
                          "--batch-size", "2", "--max-new-tokens", "3", "--json")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == {"out": str(out_file), "answered": 5, "failed": 1, "skipped_done": 0}
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert {Path(r["image"]).name for r in records if "answer" in r} == {f"p{i}.png" for i in range(5)}
    assert [Path(r["image"]).name for r in records if "error" in r] == ["broken.jpg"]
    # A second run without --resume refuses to clobber; with --resume it has nothing left but the broken file.
    assert _cli(capsys, "describe", "-m", str(checkpoint), str(photos), "-o", str(out_file))[0] == 1
    code, out, _ = _cli(capsys, "describe", "-m", str(checkpoint), str(photos), "-o", str(out_file), "--resume", "--json")
    assert json.loads(out.strip().splitlines()[-1])["skipped_done"] == 5


def test_os_errors_are_one_line(checkpoint, photos, capsys):
    # The answers' folder cannot be made (a file is in the way), as with a full disk or a read-only folder.
    blocked = photos / "p0.png" / "answers.jsonl"
    code, _, err = _cli(capsys, "describe", "-m", str(checkpoint), str(photos), "-o", str(blocked))
    assert code == 1 and err.startswith("error:") and "p0.png" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(OSError):
        main(["describe", "-m", str(checkpoint), str(photos), "-o", str(blocked), "--debug"])


def test_describe_resume_after_kill(checkpoint, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    out_file = tmp_path / "many.jsonl"
    cmd = [sys.executable, "-m", "smolvlm", "describe", "-m", str(checkpoint), str(folder), "-o", str(out_file),
           "--batch-size", "1", "--max-new-tokens", "24", "--resume"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out_file.exists() or len(out_file.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = [json.loads(line) for line in out_file.read_text().splitlines() if line.endswith("}")]
    assert 3 <= len(partial) < 20
    done = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["skipped_done"] >= 3
    names = [json.loads(line)["image"] for line in out_file.read_text().splitlines() if line.strip().endswith("}")]
    assert sorted(set(names)) == sorted(str(p) for p in folder.glob("*.png"))


def test_find_images_folders_globs_and_files(photos):
    assert len(find_images([str(photos)])) == 6
    assert [p.name for p in find_images([str(photos / "p*.png")])] == [f"p{i}.png" for i in range(5)]
    assert find_images([str(photos / "p0.png"), str(photos / "p0.png")]) == [photos / "p0.png"]
