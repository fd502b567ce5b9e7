"""Eval runner: a JSONL set of conversations whose last turn is the reference answer → batched generation through
the public API → per-task scores (metrics.score), a table and every prediction."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from smolvlm.errors import DataError
from smolvlm.eval.metrics import aggregate, score
from smolvlm.train.data import BadData, Sample, answer_of, load_jsonl


@dataclass
class Prediction:
    """One scored answer."""

    id: str
    task: str
    prediction: str
    reference: str
    score: float


@dataclass
class EvalReport:
    """Per-task table ({task: {n, score}} plus 'all') and every prediction."""

    table: dict[str, dict[str, float]]
    predictions: list[Prediction] = field(default_factory=list)
    skipped: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {"table": self.table, "skipped": self.skipped, "predictions": [asdict(p) for p in self.predictions]}

    def format_table(self) -> str:
        """A plain-text table: task, samples, score."""
        width = max([len("task")] + [len(t) for t in self.table])
        lines = [f"{'task':<{width}}  {'n':>5}  {'score':>6}"]
        for task, row in self.table.items():
            lines.append(f"{task:<{width}}  {int(row['n']):>5}  {100 * row['score']:>5.1f}%")
        return "\n".join(lines)


def prompt_of(sample: Sample) -> list[dict[str, Any]]:
    """The conversation without its final (reference) assistant turn."""
    messages = sample.conversation()
    if messages[-1].get("role") != "assistant":
        raise DataError(f"{sample.where}: the last message must be the reference assistant answer")
    return messages[:-1]


def evaluate(vlm: Any, samples: Sequence[Sample], batch_size: int = 8, max_new_tokens: int = 64,
             progress: bool = False) -> EvalReport:
    """Greedy answers for `samples` in batches with `vlm.generate`, scored per task."""
    predictions: list[Prediction] = []
    batches = range(0, len(samples), max(1, batch_size))
    for start in tqdm(batches, desc="eval", unit="batch", disable=not progress):
        chunk = samples[start : start + batch_size]
        answers = vlm.generate([prompt_of(s) for s in chunk], max_new_tokens=max_new_tokens)
        for sample, answer in zip(chunk, answers):
            reference = answer_of(sample)
            predictions.append(Prediction(sample.id, sample.task, answer.strip(), reference,
                                          score(sample.task, answer.strip(), reference)))
    return EvalReport(aggregate((p.task, p.score) for p in predictions), predictions)


def evaluate_file(vlm: Any, path: str | Path, limit: int | None = None, batch_size: int = 8,
                  max_new_tokens: int = 64, strict: bool = False, progress: bool = False) -> EvalReport:
    """Load an eval JSONL (bad lines skipped unless strict), keep the first `limit` samples and evaluate them."""
    bad = BadData(strict)
    samples = load_jsonl(path, bad)
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise DataError(f"{path}: no usable samples to evaluate")
    report = evaluate(vlm, samples, batch_size, max_new_tokens, progress)
    report.skipped = bad.total
    return report


def write_report(report: EvalReport, path: str | Path) -> Path:
    """Write the report (table + predictions) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
