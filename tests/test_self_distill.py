"""`smolvlm data chat`: a model's own answers to plain questions, as training samples to mix into a picture mix."""

from __future__ import annotations

import json

import pytest

from checkpoints import write_tiny_checkpoint
from smolvlm.engine.generate import GenerationResult
from smolvlm.errors import DataError
from smolvlm.processing import Processor
from smolvlm.train.commands import data_main
from smolvlm.train.data import IGNORE_INDEX, Collator, load_samples
from smolvlm.train.self_distill import read_prompts, whole_sentences, write_chat_dataset


class ScriptedModel:
    """Answers each prompt from a table, with the finish reason given there; records the options it was asked."""

    def __init__(self, answers: dict[str, tuple[str, str]]) -> None:
        self.answers, self.options = answers, []

    def generate(self, conversations, return_result=False, **options):
        self.options.append(options)
        return [GenerationResult(*self.answers[c[0]["content"]], 0, 0, 0.0, 0.0) for c in conversations]


def test_prompts_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# a comment\nWhat is 2 + 2?\n\n  Why is grass green?  \n")
    assert read_prompts(path) == ["What is 2 + 2?", "Why is grass green?"]
    path.write_text("# only a comment\n\n")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(path)
    with pytest.raises(DataError, match="no such prompts file"):
        read_prompts(tmp_path / "missing.txt")


@pytest.mark.parametrize("text, kept", [
    ("The sky is blue. It scatters light and", "The sky is blue."),
    ("Yes! Really? Maybe so", "Yes! Really?"),
    ("1. apples\n2. pears\n3. plu", "1. apples\n2. pears"),
    ("Pi is 3.14 and e is 2.7", ""),  # a decimal point ends no sentence
    ("no sentence ends here", ""),
])
def test_cut_answers_keep_their_whole_sentences(text, kept):
    assert whole_sentences(text) == kept


def test_chat_dataset_keeps_finished_answers_repeated_in_the_training_format(tmp_path):
    model = ScriptedModel({"Capital of Italy?": ("Rome.", "stop"),
                           "Tell me about light.": ("Light is fast. It travels at", "length"),
                           "Count to a million.": ("one two three four", "length")})
    path, kept = write_chat_dataset(tmp_path / "chat", model, list(model.answers), repeat=2, max_new_tokens=12,
                                    progress=False)
    assert kept == 2 and model.options == [{"max_new_tokens": 12, "temperature": 0.0}]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in records] == ["chat-0000-0", "chat-0001-0", "chat-0000-1", "chat-0001-1"]
    assert [r["messages"][1]["content"][0]["text"] for r in records[:2]] == ["Rome.", "Light is fast."]
    assert records[1]["messages"][0] == {"role": "user", "content": [{"type": "text", "text": "Tell me about light."}]}
    assert records[1]["task"] == "chat" and records[1]["meta"]["finish_reason"] == "length"
    with pytest.raises(DataError, match="--repeat"):
        write_chat_dataset(tmp_path / "none", model, ["Capital of Italy?"], repeat=0, progress=False)


def test_chat_samples_mix_into_picture_data_with_their_answers_learned(tmp_path, capsys):
    tiny = write_tiny_checkpoint(tmp_path / "tiny")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say hi.\nName a colour.\n")
    assert data_main(["chat", "--prompts", str(prompts), "--model", str(tiny), "--out", str(tmp_path / "chat"),
                      "--repeat", "3", "--max-new-tokens", "8", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] == 2 and summary["samples"] == 3 * summary["kept"]
    # a random tiny model rarely finishes a sentence, so the mix is checked on a written chat sample too
    chat = tmp_path / "chat" / "train.jsonl"
    chat.write_text(chat.read_text() + json.dumps({"id": "c", "task": "chat", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi there."}]}]}) + "\n")
    assert data_main(["synth", "--n", "2", "--seed", "1", "--out", str(tmp_path / "syn"), "--image-size", "64",
                      "--tasks", "colour", "--json"]) == 0
    samples = load_samples(f"{tmp_path / 'syn' / 'train.jsonl'},{chat}")
    assert len(samples) == 2 + 3 * summary["kept"] + 1 and samples[-1].task == "chat"
    processor = Processor.from_pretrained(tiny)
    batch = Collator(processor)([samples[0], samples[-1]])  # a picture question and plain chat in one batch
    learned = processor.decode(batch.labels[1][batch.labels[1] != IGNORE_INDEX], False)
    assert learned == " Hi there.<end_of_utterance>"  # the tiny template puts a space after "Assistant:"
    assert batch.pixel_values is not None and int((batch.input_ids[1] == processor.image_token_id).sum()) == 0


def test_data_chat_reports_bad_input_clearly(tmp_path, capsys):
    assert data_main(["chat", "--prompts", str(tmp_path / "none.txt"), "--model", "x", "--out", str(tmp_path)]) == 2
    assert "no such prompts file" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi?\n")
    assert data_main(["chat", "--prompts", str(prompts), "--model", "x", "--out", str(tmp_path), "--repeat", "0"]) == 2
    assert "--repeat must be 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "train.jsonl").exists()
