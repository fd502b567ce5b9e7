"""Turning next-token logits into tokens: greedy, temperature, top-k, top-p and repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smolvlm.errors import GenerationError


@dataclass
class SamplingParams:
    """How one sequence picks its next token; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax."""
        return self.temperature == 0.0

    def make_generator(self) -> torch.Generator | None:
        """A CPU generator seeded for this sequence, or None for greedy / unseeded sampling."""
        if self.greedy or self.seed is None:
            return None
        return torch.Generator().manual_seed(self.seed)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens already seen, as transformers does: divide positive logits, multiply negative ones."""
    # logits (V,), seen (N,) token ids of prompt + generated so far
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(0, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(0, seen, picked)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top-k tokens, then the smallest set whose probability reaches top_p; mask the rest to -inf."""
    # logits (V,)
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[-1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(0, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    history: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Pick one token per row of `logits` (B, V); `history` holds each row's seen ids for repetition penalty."""
    if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
        return logits.argmax(-1)
    out = torch.empty(logits.shape[0], dtype=torch.long)
    for row, (p, gen) in enumerate(zip(params, generators)):
        row_logits = logits[row].float()
        if history is not None:
            row_logits = apply_repetition_penalty(row_logits, history[row].to(row_logits.device), p.repetition_penalty)
        if p.greedy:
            out[row] = row_logits.argmax()
            continue
        row_logits = filter_logits(row_logits / p.temperature, p.top_k, p.top_p)
        probs = row_logits.softmax(-1).cpu()
        out[row] = torch.multinomial(probs, 1, generator=gen)[0]
    return out.to(logits.device)
