"""Trainer: overfitting proves the loop learns; a SIGKILLed run resumes bit-identically; stage policies, schedule,
per-part learning rates, gradient checkpointing and the checkpoint layout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoints import write_tiny_checkpoint
from smolvlm.errors import ConfigError, DataError
from smolvlm.train import synthetic
from smolvlm.train.commands import train_config, train_main
from smolvlm.train.data import answer_of, load_jsonl
from smolvlm.train.lora import load_adapter
from smolvlm.train.trainer import Trainer, TrainConfig, lr_factor, train
from smolvlm.weights.checkpoint import load_smolvlm, save_smolvlm

ROOT = Path(__file__).resolve().parents[1]


def trainable_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A tiny checkpoint with a trainable init (unit norms, zero biases, N(0, 0.05) weights) and one 64-px view per
    image (no splitting), so a few hundred CPU steps can fit it."""
    directory = write_tiny_checkpoint(directory, seed=seed)
    model = load_smolvlm(directory)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    save_smolvlm(model, directory)
    config = json.loads((directory / "preprocessor_config.json").read_text())
    config["do_image_splitting"] = False
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    return directory


def synthetic_set(directory: Path, n: int, split: str = "train", tasks: str = "colour,count,exists") -> Path:
    """n synthetic samples at 64 px; returns the JSONL path."""
    return synthetic.write_dataset(directory, n, seed=0, split=split, tasks=tasks, image_size=64, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return trainable_checkpoint(root / "ckpt"), synthetic_set(root / "data", 32)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a shared machine
    yield
    torch.set_num_threads(threads)


def test_overfits_32_samples(setup, tmp_path):
    model, data = setup
    config = TrainConfig(model=str(model), data=str(data), eval_data=str(data), out=str(tmp_path / "run"),
                         vision="frozen", connector="full", text="full", lr=3e-3, max_steps=240, batch_size=8,
                         warmup_steps=5, eval_every=120, eval_batch_size=32, eval_max_new_tokens=6, save_every=100,
                         keep_last=1,
                         progress=False, log_every=20)
    metrics = train(config)
    table = metrics["eval"]
    assert table["all"]["n"] == 32 and table["all"]["score"] >= 0.95, table
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.1 * losses[0]
    assert [r["step"] for r in records if "eval" in r] == [120, 240]
    assert all(r["tok_per_s"] > 0 for r in records if "loss" in r)
    assert list((tmp_path / "run").glob("tensorboard/events.out.tfevents.*"))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000200"]  # keep_last=1
    from smolvlm.api import load

    vlm = load(tmp_path / "run" / "final", device="cpu")  # the HF folder the run exports
    first = load_jsonl(data)[0]
    assert vlm.generate(first.messages[:1], max_new_tokens=6).strip() == answer_of(first)


def _train_argv(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", "12",
            "--batch-size", "4", "--micro-batch-size", "2", "--lr", "2e-3", "--warmup-steps", "3", "--text", "lora",
            "--lora-r", "4", "--lora-dropout", "0.1", "--lora-targets", "q_proj,v_proj,down_proj",
            "--connector", "full", "--save-every", "3", "--keep-last", "2", "--no-progress", "--no-tensorboard",
            *extra]


def _run(argv, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "smolvlm.train.commands", *argv], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_then_resume_is_bit_identical(setup, tmp_path):
    model, data = setup
    whole = _run(_train_argv(model, data, tmp_path / "whole"))
    killed = _run(_train_argv(model, data, tmp_path / "killed"))
    target = tmp_path / "killed" / "checkpoints" / "step-0000006"
    deadline = time.monotonic() + 240
    while not target.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "final").exists()
    resumed = _run(_train_argv(model, data, tmp_path / "killed", "--resume"))
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert "resumed from" in err and json.loads(out.splitlines()[-1])["step"] == 12
    _, err = whole.communicate(timeout=240)
    assert whole.returncode == 0, err
    for name in ("model.safetensors", "adapter_model.safetensors"):
        assert (tmp_path / "whole" / "final" / name).read_bytes() == (tmp_path / "killed" / "final" / name).read_bytes()
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert checkpoints == ["step-0000006", "step-0000009"]  # keep_last 2, no temp dirs left behind
    state = json.loads((tmp_path / "killed" / "checkpoints" / "step-0000009" / "trainer_state.json").read_text())
    assert state["step"] == 9


def test_stage_policy_and_per_part_learning_rates(setup, tmp_path):
    model, data = setup
    stage = tmp_path / "stage.json"
    stage.write_text(json.dumps({"vision": "lora", "connector": "full", "text": "frozen", "lr": 1e-3,
                                 "vision_lr": 1e-4, "max_steps": 1, "batch_size": 2}))
    config = train_config(["--config", str(stage), "--model", str(model), "--data", str(data), "--out",
                           str(tmp_path / "o"), "--connector-lr", "5e-3", "--no-progress"])
    trainer = Trainer(config)
    trainable = {n for n, _ in trainer.trainable}
    assert trainable and all((".lora_" in n and n.startswith("vision_model.")) or n.startswith("connector.")
                             for n in trainable)
    assert any(n.startswith("vision_model.") for n in trainable)
    lrs = {g["name"].split(".")[0]: g["base_lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {"vision": 1e-4, "connector": 5e-3}
    frozen = {n: p.clone() for n, p in trainer.model.named_parameters() if n.startswith("text_model.")}
    trainer.train()
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if n in frozen)
    with pytest.raises(ConfigError, match="every part is frozen"):
        TrainConfig(model="m", data="d", vision="frozen", connector="frozen", text="frozen").check()
    with pytest.raises(ConfigError, match="not a multiple"):
        Trainer(TrainConfig(model=str(model), data=str(data), batch_size=3, micro_batch_size=2))


def test_gradient_checkpointing_gives_the_same_step(setup, tmp_path):
    model, data = setup
    params = []
    for checkpointing in (False, True):
        trainer = Trainer(TrainConfig(model=str(model), data=str(data), out=str(tmp_path / str(checkpointing)),
                                      vision="full", max_steps=1, batch_size=2, gradient_checkpointing=checkpointing))
        metrics = trainer.train_step(0)
        params.append((metrics["loss"], [p.detach().clone() for _, p in trainer.trainable]))
    assert params[0][0] == pytest.approx(params[1][0], rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(params[0][1], params[1][1]))


def test_compiled_layers_give_the_same_steps(setup, tmp_path):
    model, data = setup
    runs = []
    for compile in (False, True):
        trainer = Trainer(TrainConfig(model=str(model), data=str(data), out=str(tmp_path / str(compile)),
                                      vision="frozen", connector="full", text="lora", lora_r=4, max_steps=2,
                                      batch_size=4, compile=compile, progress=False, tensorboard=False))
        losses = [trainer.train_step(step)["loss"] for step in range(2)]
        runs.append((losses, [p.detach().clone() for _, p in trainer.trainable]))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(runs[0][1], runs[1][1]))
    with pytest.raises(ConfigError, match="do not combine"):
        TrainConfig(model="m", data="d", compile=True, gradient_checkpointing=True).check()


def test_bf16_forward_passes_on_the_cpu_train_close_to_fp32(setup, tmp_path):
    model, data = setup
    runs = []
    for precision in ("fp32", "bf16"):
        trainer = Trainer(TrainConfig(model=str(model), data=str(data), out=str(tmp_path / precision),
                                      vision="frozen", connector="full", text="lora", lora_r=4, max_steps=2,
                                      batch_size=4, precision=precision, progress=False, tensorboard=False))
        losses = [trainer.train_step(step)["loss"] for step in range(2)]
        runs.append((losses, [p.detach().clone() for _, p in trainer.trainable]))
    (fp32_losses, _), (bf16_losses, bf16_params) = runs
    assert fp32_losses != bf16_losses  # bf16 matmuls really ran
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.02)
    assert all(p.dtype == torch.float32 for p in bf16_params)  # weights and their updates stay fp32
    with pytest.raises(ConfigError, match="--precision must be one of auto, bf16, fp32"):
        TrainConfig(model="m", data="d", precision="fp16").check()


def test_schedule_and_cli_errors(setup, capsys):
    assert lr_factor(0, 4, 100, 0.1) == 0.25 and lr_factor(3, 4, 100, 0.1) == 1.0
    assert lr_factor(100, 4, 100, 0.1) == pytest.approx(0.1) and 0.1 < lr_factor(50, 4, 100, 0.1) < 1.0
    model, _ = setup
    assert train_main(["--model", str(model), "--data", "/nonexistent.jsonl"]) == 2
    assert "/nonexistent.jsonl not found" in capsys.readouterr().err


def test_bad_samples_are_skipped_during_training(setup, tmp_path, caplog):
    model, data = setup
    lines = data.read_text().splitlines()[:3]
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join([lines[0], "{oops", json.dumps(long), *lines[1:]]) + "\n")
    (tmp_path / "images").symlink_to(data.parent / "images")  # image paths are relative to the data file
    config = TrainConfig(model=str(model), data=str(mixed), out=str(tmp_path / "run"), max_length=200, max_steps=4,
                         batch_size=2, micro_batch_size=1, progress=False, tensorboard=False)
    with caplog.at_level("WARNING", logger="smolvlm.train"):
        metrics = train(config)  # micro-batches made only of the too-long sample are skipped, not fatal
    assert metrics["step"] == 4 and metrics["skipped"] == 3  # the bad line once, the long sample in both epochs
    assert f"{mixed}:2: malformed JSON" in caplog.text and f"{mixed}:3: " in caplog.text
    config.strict = True
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: malformed JSON"):
        Trainer(config)


def test_worker_processes_build_the_same_batches(setup, tmp_path):
    model, data = setup
    lines = data.read_text().splitlines()[:5]
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join([*lines[:2], json.dumps(long), *lines[2:]]) + "\n")
    (tmp_path / "images").symlink_to(data.parent / "images")
    finals = []
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        metrics = train(TrainConfig(model=str(model), data=str(mixed), out=str(out), max_length=200, max_steps=6,
                                    batch_size=2, micro_batch_size=1, progress=False, tensorboard=False,
                                    data_workers=workers))
        assert metrics["step"] == 6 and metrics["skipped"] == 2  # the long sample, counted in the worker too
        finals.append((out / "final" / "model.safetensors").read_bytes())
    assert finals[0] == finals[1]


def test_logits_mask_selects_positions_of_the_full_forward(setup):
    ckpt, data = setup
    model = load_smolvlm(ckpt).eval()
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 3:5] = mask[1, 7] = True
    with torch.no_grad():
        full = model(ids).logits  # (2, 9, V)
        picked = model(ids, logits_mask=mask).logits  # (3, V)
    assert picked.shape == (3, full.shape[-1])
    torch.testing.assert_close(picked, full[mask], rtol=1e-5, atol=1e-5)


def test_continue_adapter_trains_a_merged_adapter_on(setup, tmp_path):
    # A later stage starts from a run's output (its LoRA merged in) and trains that same adapter on: the result is
    # again one adapter of the same rank on the original base, equal to the later stage's merged model.
    model, data = setup
    common = dict(data=str(data), text="lora", connector="full", lr=1e-2, max_steps=3, batch_size=4,
                  progress=False, tensorboard=False, lora_r=4, lora_alpha=8.0,
                  lora_targets=r"text_model.*(q_proj|down_proj)$")
    train(TrainConfig(model=str(model), out=str(tmp_path / "a"), **common))
    first = tmp_path / "a" / "final"
    config = TrainConfig(model=str(first), out=str(tmp_path / "b"), continue_adapter=str(first),
                         **{**common, "lora_r": 16})
    trainer = Trainer(config)
    inputs = trainer.micro_batches(0)[0].model_inputs()
    with torch.no_grad():
        merged_a = load_smolvlm(first)(**inputs).logits
    assert trainer.lora.r == 4 and trainer.lora.base_model == str(model)  # the adapter's own settings and base
    with torch.no_grad():  # taken out of the weights and put back as LoRA: the same function
        assert torch.allclose(trainer.model(**inputs).logits, merged_a, atol=1e-5)
    trainer.train()
    second = tmp_path / "b" / "final"
    adapter = json.loads((second / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(model)
    rebuilt = load_smolvlm(model)
    load_adapter(rebuilt, second)
    with torch.no_grad():
        ours = rebuilt(**inputs).logits
        assert torch.allclose(ours, load_smolvlm(second)(**inputs).logits, atol=1e-4)
        assert (ours - merged_a).abs().max() > 1e-3  # the second stage changed something
    with pytest.raises(ConfigError, match="continue-adapter"):
        TrainConfig(model="m", data="d", text="full", continue_adapter=str(first)).check()
