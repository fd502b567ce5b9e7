"""Knowledge distillation: a temperature-scaled KL term between a teacher's and the student's next-token
distributions on the assistant positions, mixed with cross-entropy:

    loss = (1 - w) · CE(student, labels) + w · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

Teacher and student must share the tokenizer (the same ids mean the same tokens), which `check_same_tokenizer`
verifies before any training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from smolvlm.errors import ConfigError
from smolvlm.processing import Processor
from smolvlm.train.data import IGNORE_INDEX, TrainBatch


def check_same_tokenizer(student: Processor, teacher: Processor, teacher_path: str | Path) -> None:
    """Raise ConfigError unless both processors map every token string to the same id."""
    s_vocab = student.tokenizer.backend.get_vocab(with_added_tokens=True)
    t_vocab = teacher.tokenizer.backend.get_vocab(with_added_tokens=True)
    if s_vocab != t_vocab:
        only_s = len(set(s_vocab.items()) - set(t_vocab.items()))
        raise ConfigError(
            f"teacher {teacher_path} has a different tokenizer ({len(t_vocab)} tokens vs the student's "
            f"{len(s_vocab)}, {only_s} student entries differ); distillation compares distributions token by token, "
            "so pick a teacher from the same model family (same tokenizer.json)"
        )


def predicting_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (B, T) → mask (B, T) of the positions whose next token is a label, and those (N,) targets."""
    following = labels[:, 1:]  # (B, T-1)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = following != IGNORE_INDEX
    return mask, following[following != IGNORE_INDEX]


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, V) and labels (B, T) → the positions that predict a label: (N, V) logits, (N,) targets."""
    mask, targets = predicting_positions(labels)
    return logits[mask], targets  # (N, V), (N,)


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Σ over rows of T² · KL(teacher_T ‖ student_T) for (N, V) logits, in float32."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum") * (t * t)


def distill_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                     weight: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mixed, ce, kl) sums over the assistant positions of one batch; divide by the token count outside."""
    s, targets = shifted(student_logits, labels)
    t, _ = shifted(teacher_logits, labels)
    ce = F.cross_entropy(s.float(), targets, reduction="sum")
    kl = kl_sum(s, t, temperature)
    return (1 - weight) * ce + weight * kl, ce, kl


@torch.no_grad()
def mean_kl(student: torch.nn.Module, teacher: torch.nn.Module, batches: Iterable[TrainBatch],
            device: torch.device | str = "cpu") -> float:
    """Mean per-token KL(teacher ‖ student) at T = 1 over the assistant positions of `batches` (a held-out set)."""
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        s, _ = shifted(student(**batch.model_inputs()).logits, batch.labels)
        t, _ = shifted(teacher(**batch.model_inputs()).logits, batch.labels)
        total += float(kl_sum(s, t))
        count += s.shape[0]
    if count == 0:
        raise ConfigError("no assistant tokens in the held-out batches to measure the KL on")
    return total / count
