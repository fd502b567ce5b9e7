"""Eval runner: batched generation, per-task scoring (exact match, box IoU), table, JSON with every prediction."""

from __future__ import annotations

import json

import pytest

from checkpoints import write_tiny_checkpoint
from smolvlm.eval.tasks import evaluate, evaluate_file
from smolvlm.train import synthetic
from smolvlm.train.commands import eval_main
from smolvlm.train.data import answer_of, load_jsonl


class ScriptedVLM:
    """Answers from a table keyed by the question; records the batch sizes it was called with."""

    def __init__(self, answers):
        self.answers, self.batches = answers, []

    def generate(self, conversations, max_new_tokens=64):
        self.batches.append(len(conversations))
        return [self.answers[c[-1]["content"][-1]["text"]] for c in conversations]


def _record(question, answer, task):
    return {"task": task, "messages": [{"role": "user", "content": [{"type": "text", "text": question}]},
                                       {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def test_scores_per_task(tmp_path):
    records = [
        _record("q1", "3", "count"), _record("q2", "red", "colour"), _record("q3", "blue", "colour"),
        _record("q4", "the star<|box_start|>(100,100),(500,500)<|box_end|>", "grounding"),
        _record("q5", "the star<|box_start|>(100,100),(500,500)<|box_end|>", "grounding"),
    ]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    vlm = ScriptedVLM({"q1": " three ", "q2": "Red.", "q3": "green",
                       "q4": "<|box_start|>(110,100),(500,520)<|box_end|>",  # IoU ~ 0.93
                       "q5": "<|box_start|>(400,400),(900,900)<|box_end|>"})  # IoU ~ 0.03
    report = evaluate_file(vlm, path, batch_size=2)
    assert vlm.batches == [2, 2, 1] and report.skipped == 1
    assert report.table["count"] == {"n": 1, "score": 1.0}
    assert report.table["colour"] == {"n": 2, "score": 0.5}
    assert report.table["grounding"] == {"n": 2, "score": 0.5}
    assert report.table["all"]["n"] == 5 and report.table["all"]["score"] == pytest.approx(0.6)
    assert [p.score for p in report.predictions] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert report.predictions[1].prediction == "Red." and report.predictions[1].reference == "red"
    assert "grounding" in report.format_table() and "50.0%" in report.format_table()
    limited = evaluate(vlm, load_jsonl(path)[:2], batch_size=8)
    assert limited.table["all"]["n"] == 2


def test_eval_command(tmp_path, capsys):
    model = write_tiny_checkpoint(tmp_path / "ckpt")
    data = synthetic.write_dataset(tmp_path / "data", 5, seed=0, split="eval", tasks="count,ocr", image_size=64,
                                   progress=False)
    out = tmp_path / "preds.json"
    assert eval_main(["-m", str(model), "--data", str(data), "--limit", "3", "--batch-size", "2", "--json",
                      "--out", str(out), "--max-new-tokens", "4", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(out.read_text())
    assert printed["table"] == saved["table"] and saved["table"]["all"]["n"] == 3
    samples = load_jsonl(data)
    assert [p["reference"] for p in saved["predictions"]] == [answer_of(s) for s in samples[:3]]
    assert all(isinstance(p["prediction"], str) and p["score"] in (0.0, 1.0) for p in saved["predictions"])
    assert eval_main(["-m", str(model), "--data", str(data), "--limit", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["task", "n", "score"]
    assert eval_main(["-m", str(model), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl not found" in capsys.readouterr().err
