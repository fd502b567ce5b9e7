"""Training data: assistant-only labels token by token, collation, bad data (skip or --strict), Cauldron datasets."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from checkpoints import write_tiny_checkpoint
from smolvlm.errors import DataError
from smolvlm.processing import Processor
from smolvlm.train.commands import data_main
from smolvlm.train.data import IGNORE_INDEX, BadData, Collator, load_hf_dataset, load_jsonl, load_samples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def processor(tiny):
    return Processor.from_pretrained(tiny)


def _image(path, colour, size=(64, 48)):
    Image.new("RGB", size, colour).save(path)
    return path.name


def _two_turn(tmp_path):
    a = _image(tmp_path / "a.png", (200, 20, 20), (100, 64))
    b = _image(tmp_path / "b.png", (20, 20, 200))
    return {"id": "two", "messages": [
        {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image", "image": b}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue, clearly."}]},
    ]}


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_assistant_only_labels_token_by_token(tmp_path, processor):
    path = _write_jsonl(tmp_path / "d.jsonl", [_two_turn(tmp_path)])
    (sample,) = load_jsonl(path)
    encoded = Collator(processor).encode(sample)
    ids, labels = encoded.input_ids.tolist(), encoded.labels.tolist()
    assert ids == processor.encode_chat([sample.messages]).input_ids[0].tolist()  # the inference encoding
    # Independent reference: token-level prefixes through the processor (images included).
    messages = sample.messages
    expected = [IGNORE_INDEX] * len(ids)
    for i in (1, 3):
        start = processor.encode_chat([messages[:i]], add_generation_prompt=True).input_ids.shape[1]
        through = processor.encode_chat([messages[: i + 1]]).input_ids[0].tolist()
        assert ids[: len(through)] == through and processor.decode(through[-1:], False) == "\n"
        expected[start : len(through) - 1] = ids[start : len(through) - 1]
    for position, (token, label, want) in enumerate(zip(ids, labels, expected)):
        assert label == want, (position, processor.decode([token], False))
    learned = [t for t in labels if t != IGNORE_INDEX]
    text = processor.decode(learned, skip_special_tokens=False)
    assert text == " It is red.<end_of_utterance> Blue, clearly.<end_of_utterance>"
    assert encoded.pixel_values.shape[0] == 10  # each image: resized to a 128-px edge, 2 x 2 tiles + global view


def test_collate_left_pads_ids_labels_and_tiles(tmp_path, processor):
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = _write_jsonl(tmp_path / "d.jsonl", [_two_turn(tmp_path), short])
    batch = Collator(processor)(load_jsonl(path))
    long_len = int(batch.attention_mask[0].sum())
    n_short = int(batch.attention_mask[1].sum())
    assert batch.input_ids.shape == (2, long_len) and n_short < long_len
    assert (batch.input_ids[1, : long_len - n_short] == processor.tokenizer.pad_token_id).all()
    assert (batch.labels[1, : long_len - n_short] == IGNORE_INDEX).all()
    assert processor.decode(batch.labels[1][batch.labels[1] != IGNORE_INDEX], False) == " hello<end_of_utterance>"
    assert batch.pixel_values.shape[:2] == (2, 10) and not batch.pixel_attention_mask[1].any()


def _bad_file(tmp_path):
    good = _two_turn(tmp_path)
    missing = {"messages": [{"role": "user", "content": [{"type": "image", "image": "gone.png"},
                                                         {"type": "text", "text": "?"}]},
                            {"role": "assistant", "content": "x"}]}
    long = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    return _write_jsonl(tmp_path / "bad.jsonl", [good, "{not json", missing, long, no_answer])


def test_bad_data_is_skipped_with_file_and_line(tmp_path, processor, caplog):
    path = _bad_file(tmp_path)
    bad = BadData()
    with caplog.at_level(logging.WARNING, logger="smolvlm.train"):
        samples = load_jsonl(path, bad)
        kept = Collator(processor, max_length=300, bad=bad).scan(samples)
    assert len(samples) == 2 and len(kept) == 1 and kept[0].id == "two"
    assert bad.counts == {"malformed": 1, "missing_image": 1, "invalid": 1, "too_long": 1}
    text = caplog.text
    for line, what in ((2, "malformed JSON"), (3, "gone.png not found"), (4, "exceed the context of 300"),
                       (5, "no assistant turn")):
        assert f"bad.jsonl:{line}: " in text and what in text
    batch = Collator(processor, max_length=300)(samples)  # a batch drops its bad samples instead of crashing
    assert len(batch) == 1 and "bad.jsonl:4" in batch.skipped[0]


def test_strict_rejects_bad_data(tmp_path, processor):
    path = _bad_file(tmp_path)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON.*--strict"):
        load_jsonl(path, BadData(strict=True))
    long = load_jsonl(path)[1]
    with pytest.raises(DataError, match=r"bad\.jsonl:4: .*exceed the context"):
        Collator(processor, max_length=300, bad=BadData(strict=True)).scan([long])


def test_cauldron_dataset_from_disk_and_parquet(tmp_path, processor):
    datasets = pytest.importorskip("datasets")
    rows = {
        "images": [[Image.new("RGB", (64, 64), (250, 0, 0))], [Image.new("RGB", (40, 64), (0, 250, 0))]],
        "texts": [[{"user": "Colour?", "assistant": "red", "source": "toy"}],
                  [{"user": "Colour?", "assistant": "green", "source": "toy"},
                   {"user": "Sure?", "assistant": "yes", "source": "toy"}]],
    }
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                   "source": datasets.Value("string")}],
    })
    data = datasets.Dataset.from_dict(rows, features=features)
    data.save_to_disk(str(tmp_path / "saved"))
    data.to_parquet(str(tmp_path / "part.parquet"))
    for source in (tmp_path / "saved", tmp_path / "part.parquet"):
        samples = load_samples(source)
        assert len(samples) == 2 and samples[1].task == "toy"
        assert samples[1].messages is None  # images are decoded per batch, not at load
        assert [m["role"] for m in samples[1].conversation()] == ["user", "assistant", "user", "assistant"]
        batch = Collator(processor)(samples)
        learned = processor.decode(batch.labels[1][batch.labels[1] != IGNORE_INDEX], False)
        assert learned == " green<end_of_utterance> yes<end_of_utterance>"
    with pytest.raises(DataError, match="column 'texts' missing"):
        datasets.Dataset.from_dict({"images": rows["images"]}).save_to_disk(str(tmp_path / "wrong"))
        load_hf_dataset(tmp_path / "wrong")


def test_data_commands(tmp_path, tiny, capsys):
    assert data_main(["synth", "--n", "4", "--seed", "1", "--out", str(tmp_path / "syn"), "--image-size", "64",
                      "--tasks", "count", "--json"]) == 0
    capsys.readouterr()
    assert data_main(["check", "--model", str(tiny), "--data", str(tmp_path / "syn" / "train.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out) == {"usable": 4, "skipped": 0, "reasons": {}}
    bad = _bad_file(tmp_path)
    assert data_main(["check", "--model", str(tiny), "--data", str(bad), "--max-length", "300", "--strict"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
