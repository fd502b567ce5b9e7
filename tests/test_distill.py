"""Distillation: the student's KL to the teacher falls on a held-out set; mismatched tokenizers are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from checkpoints import write_tiny_checkpoint
from smolvlm.errors import ConfigError
from smolvlm.processing import Processor
from smolvlm.train.data import Collator, load_jsonl
from smolvlm.train.distill import distill_loss_sum, kl_sum, mean_kl
from smolvlm.train.trainer import Trainer, TrainConfig
from smolvlm.weights.checkpoint import load_smolvlm
from test_trainer import one_thread, synthetic_set, trainable_checkpoint  # noqa: F401 - autouse fixture


def test_kl_terms():
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    expected = sum(F.kl_div(F.log_softmax(student[i] / 2, -1), F.softmax(teacher[i] / 2, -1), reduction="sum")
                   for i in range(5)) * 4
    assert kl_sum(student, teacher, 2.0) == pytest.approx(float(expected), rel=1e-5)
    assert kl_sum(teacher, teacher) == pytest.approx(0.0, abs=1e-5)
    logits = torch.randn(1, 4, 11)
    labels = torch.tensor([[-100, -100, 3, 7]])
    mixed, ce, kl = distill_loss_sum(logits, logits + 1.0, labels, weight=0.25, temperature=1.0)
    assert kl == pytest.approx(0.0, abs=1e-5)  # a constant shift leaves the distribution unchanged
    assert ce == pytest.approx(float(F.cross_entropy(logits[0, 1:3], labels[0, 2:], reduction="sum")), rel=1e-5)
    assert mixed == pytest.approx(0.75 * float(ce), rel=1e-5)


def test_student_kl_to_teacher_falls_on_held_out_set(tmp_path):
    student = trainable_checkpoint(tmp_path / "student")
    teacher = write_tiny_checkpoint(tmp_path / "teacher", seed=1, std=0.3)  # same tokenizer, other weights
    train = synthetic_set(tmp_path / "data", 32)
    held_out = synthetic_set(tmp_path / "data", 16, split="eval")
    collator = Collator(Processor.from_pretrained(student))
    samples = load_jsonl(held_out)
    batches = [collator(samples[i : i + 8]) for i in range(0, len(samples), 8)]
    teacher_model = load_smolvlm(teacher)
    before = mean_kl(load_smolvlm(student), teacher_model, batches)
    trainer = Trainer(TrainConfig(model=str(student), data=str(train), out=str(tmp_path / "run"), teacher=str(teacher),
                                  distill_weight=0.9, distill_temperature=1.0, vision="frozen", lr=3e-3,
                                  max_steps=40, batch_size=8, progress=False, tensorboard=False))
    metrics = trainer.train()
    assert {"ce", "kl"} <= metrics.keys()
    after = mean_kl(load_smolvlm(tmp_path / "run" / "final"), teacher_model, batches)
    assert after < 0.6 * before, (before, after)


def test_different_tokenizer_is_refused(tmp_path):
    student = trainable_checkpoint(tmp_path / "student")
    other = tmp_path / "other"
    shutil.copytree(student, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = [t for t in vocab if t.isalpha()][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same strings, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    data = synthetic_set(tmp_path / "data", 4)
    with pytest.raises(ConfigError, match="different tokenizer"):
        Trainer(TrainConfig(model=str(student), data=str(data), teacher=str(other), out=str(tmp_path / "run")))
