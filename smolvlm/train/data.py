"""Training data: JSONL conversations, Hugging Face datasets (The Cauldron layout), and a collator that encodes them
with the inference processor and labels assistant tokens only.

    records (file, line) ─ load_jsonl / load_hf_dataset ─▶ Sample(messages with resolved images)
    Sample ─ Collator.encode: processor.encode_chat (the ids inference sees) + assistant spans ─▶ Encoded
    [Encoded] ─ Collator.collate: left padding, tile padding ─▶ TrainBatch

Assistant spans are found by rendering the chat template prefix by prefix: the text of turn i is what
`render(messages[:i + 1])` adds after `render(messages[:i], add_generation_prompt=True)` (trailing whitespace
excluded, so the end-of-utterance token is learned but the newline after it is not). Char spans become token labels
through the tokenizer's offsets on the unexpanded text, then every `<image>` marker is walked over its expansion.

Bad records (malformed JSON, missing image files, conversations longer than the context) are skipped with a
warning naming file and line, and counted; with `strict=True` they raise `DataError` instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import torch

from smolvlm.errors import DataError, SmolVLMError
from smolvlm.processing import Processor
from smolvlm.processing.chat import IMAGE_SOURCE_KEYS, normalize_messages

log = logging.getLogger("smolvlm.train")
IGNORE_INDEX = -100


@dataclass
class Sample:
    """One conversation with image sources resolved; `where` is "file:line" (or "dataset[index]") for messages.

    Dataset rows keep `messages` None and a `fetch` that builds them on demand, so images are decoded per batch
    rather than all held in memory.
    """

    messages: list[dict[str, Any]] | None
    where: str
    id: str = ""
    task: str = "default"
    fetch: Callable[[], list[dict[str, Any]]] | None = None

    def conversation(self) -> list[dict[str, Any]]:
        """The messages, fetched (images decoded) now if the sample is lazy."""
        return self.messages if self.messages is not None else self.fetch()


@dataclass
class Encoded:
    """One encoded sample, unpadded."""

    input_ids: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,) IGNORE_INDEX outside assistant tokens
    pixel_values: torch.Tensor | None  # (tiles, 3, H, W)
    pixel_attention_mask: torch.Tensor | None  # (tiles, H, W)
    where: str = ""


@dataclass
class TrainBatch:
    """Model inputs plus labels; `skipped` lists the samples the collator dropped (where: reason)."""

    input_ids: torch.Tensor  # (B, T) left-padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    pixel_values: torch.Tensor | None = None  # (B, max_tiles, 3, H, W)
    pixel_attention_mask: torch.Tensor | None = None  # (B, max_tiles, H, W)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "TrainBatch":
        """Move every tensor to `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TrainBatch(move(self.input_ids), move(self.attention_mask), move(self.labels),
                          move(self.pixel_values), move(self.pixel_attention_mask), self.skipped)

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """Keyword arguments for SmolVLM.forward."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "pixel_values": self.pixel_values, "pixel_attention_mask": self.pixel_attention_mask}


class BadData:
    """Skip-or-raise policy for bad records, with a count per reason."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.counts: dict[str, int] = {}

    def report(self, where: str, reason: str, kind: str) -> None:
        """Raise DataError when strict, else log a warning and count the skip."""
        message = f"{where}: {reason}"
        if self.strict:
            raise DataError(f"{message} (drop --strict to skip bad samples instead)")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        log.warning("skipping %s", message)

    @property
    def total(self) -> int:
        """Samples skipped so far."""
        return sum(self.counts.values())


# ----------------------------------------------------------------------------------------------- sources

def _resolve_images(messages: list[dict[str, Any]], base: Path) -> list[dict[str, Any]]:
    """Image paths relative to the data file become absolute; a missing file raises DataError."""
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "image"):
                continue
            key = next((k for k in IMAGE_SOURCE_KEYS if k in part), None)
            source = part.get(key) if key else None
            if key in ("path", "image") and isinstance(source, str) and not source.startswith(("data:", "http")):
                path = Path(source) if Path(source).is_absolute() else base / source
                if not path.is_file():
                    raise DataError(f"image file {path} not found")
                part[key] = str(path)
    return messages


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {role, content} dicts")
    try:
        messages = normalize_messages(messages)
    except SmolVLMError as e:
        raise DataError(str(e)) from e
    if not any(m.get("role") == "assistant" for m in messages):
        raise DataError("the conversation has no assistant turn to learn from")
    return messages


def record_to_sample(record: Any, base: Path, where: str) -> Sample:
    """A parsed JSONL record ({"messages": [...], "id"?, "task"?}) → Sample; raises DataError when unusable."""
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError("expected a JSON object with a 'messages' list")
    messages = _resolve_images(_check_messages(record["messages"]), base)
    return Sample(messages, where, str(record.get("id", where)), str(record.get("task", "default")))


def load_jsonl(path: str | Path, bad: BadData | None = None) -> list[Sample]:
    """Read a JSONL conversation file (images relative to it); bad lines are skipped or raise per `bad`."""
    path = Path(path)
    bad = bad or BadData()
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    samples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad.report(where, f"malformed JSON ({e.msg} at column {e.colno})", "malformed")
                continue
            try:
                samples.append(record_to_sample(record, path.parent, where))
            except DataError as e:
                bad.report(where, str(e), "missing_image" if "not found" in str(e) else "invalid")
    return samples


def cauldron_messages(images: Sequence[Any], texts: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """The Cauldron's `images` + `texts` ([{user, assistant}, ...]) → messages; images open the first user turn."""
    messages: list[dict[str, Any]] = []
    for turn, pair in enumerate(texts):
        content: list[dict[str, Any]] = [{"type": "image", "image": im} for im in images] if turn == 0 else []
        content.append({"type": "text", "text": pair["user"]})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": pair["assistant"]}]})
    return messages


def load_hf_dataset(path: str | Path, split: str = "train", bad: BadData | None = None) -> list[Sample]:
    """A Hugging Face dataset saved with `save_to_disk`, or parquet file(s), in The Cauldron's layout."""
    try:
        import datasets
    except ImportError as e:
        raise DataError("reading Hugging Face datasets needs `pip install datasets` (the [train] extra)") from e
    path = Path(path)
    bad = bad or BadData()
    if path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.parquet"))
        data = datasets.load_dataset("parquet", data_files=files, split="train")
    elif path.is_dir():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise DataError(f"{path}: no split {split!r}; it has {', '.join(data)}")
            data = data[split]
    else:
        raise DataError(f"{path}: not a saved dataset folder or parquet file")
    for column in ("images", "texts"):
        if column not in data.column_names:
            raise DataError(f"{path}: column {column!r} missing; The Cauldron layout has 'images' and 'texts'")
    samples = []
    for index, texts in enumerate(data["texts"]):  # the text column only: images stay undecoded until fetched
        where = f"{path}[{index}]"
        try:
            _check_messages(cauldron_messages([], texts or []))
        except (DataError, KeyError, TypeError) as e:
            bad.report(where, f"unusable row ({e})", "invalid")
            continue
        task = str((texts or [{}])[0].get("source") or "default")
        samples.append(Sample(None, where, str(index), task, fetch=partial(_cauldron_row, data, index)))
    return samples


def _cauldron_row(data: Any, index: int) -> list[dict[str, Any]]:
    row = data[index]
    return normalize_messages(cauldron_messages(row["images"] or [], row["texts"]))


def load_samples(path: str | Path, bad: BadData | None = None, split: str = "train") -> list[Sample]:
    """JSONL file, saved HF dataset folder or parquet — whichever `path` is; several joined by commas, in order."""
    if isinstance(path, str) and "," in path and not Path(path).exists():
        return [sample for part in path.split(",") if part.strip()
                for sample in load_samples(part.strip(), bad, split)]
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return load_jsonl(path, bad)
    return load_hf_dataset(path, split, bad)


# ----------------------------------------------------------------------------------------------- labels

def assistant_char_spans(processor: Processor, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of every assistant turn in it."""
    full = processor.render_chat(messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = processor.render_chat(messages[:i], add_generation_prompt=True) if i else ""
        through = processor.render_chat(messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"turn {i}: the chat template does not render conversations prefix by prefix, so assistant "
                "tokens cannot be located; use a template whose output for a prefix is a prefix of the whole"
            )
        spans.append((len(before), len(through.rstrip())))
    return full, spans


class Collator:
    """Encodes samples exactly as inference does (processor.encode_chat) and labels assistant tokens only."""

    def __init__(self, processor: Processor, max_length: int | None = None, bad: BadData | None = None) -> None:
        self.processor = processor
        self.max_length = max_length
        self.bad = bad or BadData()
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.image_id = processor.image_token_id
        self.fake_id = tokenizer.token_to_id(processor.image_tokens.fake_around_image)
        self.global_ids = tokenizer.encode(processor.image_tokens.global_image, add_special_tokens=False)

    def encode(self, sample: Sample) -> Encoded:
        """One sample → ids, assistant-only labels and its tiles; DataError when it cannot be used."""
        try:
            messages = sample.conversation()
            batch = self.processor.encode_chat([messages])
        except SmolVLMError as e:
            raise DataError(str(e)) from e
        ids = batch.input_ids[0]  # (T,) one sample: no padding
        if self.max_length is not None and len(ids) > self.max_length:
            raise DataError(f"{len(ids)} tokens exceed the context of {self.max_length}; shorten it or raise "
                            "--max-length")
        labels = self.labels(messages, ids)
        pixels = None if batch.pixel_values is None else batch.pixel_values[0]
        mask = None if batch.pixel_attention_mask is None else batch.pixel_attention_mask[0]
        return Encoded(ids, labels, pixels, mask, sample.where)

    def labels(self, messages: list[dict[str, Any]], ids: torch.Tensor) -> torch.Tensor:
        """(T,) labels for the processor's ids: token ids on assistant spans, IGNORE_INDEX elsewhere."""
        full, spans = assistant_char_spans(self.processor, messages)
        bos = self.processor.tokenizer.bos_token
        plain = self.processor.tokenizer.backend.encode(full, add_special_tokens=not (bos and full.startswith(bos)))
        final = ids.tolist()
        labels = [IGNORE_INDEX] * len(final)
        q = 0
        for p, (token, (start, _)) in enumerate(zip(plain.ids, plain.offsets)):
            if token == self.image_id:  # one marker in the rendered text = its whole expansion in `final`
                q = self._skip_image(final, q)
                continue
            if q >= len(final) or final[q] != token:
                raise DataError(f"token {p} of the rendered chat does not match the processor's ids; the tokenizer "
                                "merges text across an image expansion")
            if any(s <= start < e for s, e in spans):
                labels[q] = token
            q += 1
        if q != len(final):
            raise DataError("the processor's ids are longer than the rendered chat; cannot place labels")
        return torch.tensor(labels, dtype=torch.long)

    def _skip_image(self, final: list[int], q: int) -> int:
        """Position after the image expansion starting at q: the closing fake token after the global view."""
        g, n = len(self.global_ids), self.processor.image_seq_len
        for k in range(q, len(final) - g):
            if final[k : k + g] == self.global_ids and final[k + g] == self.image_id:
                end = k + g + n + 1
                if end <= len(final) and final[end - 1] == self.fake_id:
                    return end
                break
        raise DataError("could not find the end of an image expansion in the processor's ids")

    def collate(self, encoded: Sequence[Encoded]) -> TrainBatch:
        """Left-pad ids/labels; pad tiles to (max_tiles, H, W) with zero pixels and a False mask."""
        if not encoded:
            raise DataError("empty batch: every sample in it was skipped")
        width = max(len(e.input_ids) for e in encoded)
        B = len(encoded)
        input_ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((B, width), dtype=torch.long)
        for b, e in enumerate(encoded):
            n = len(e.input_ids)
            input_ids[b, width - n :], labels[b, width - n :], attention[b, width - n :] = e.input_ids, e.labels, 1
        with_images = [e for e in encoded if e.pixel_values is not None]
        if not with_images:
            return TrainBatch(input_ids, attention, labels)
        tiles = max(e.pixel_values.shape[0] for e in with_images)
        H = max(e.pixel_values.shape[-2] for e in with_images)
        W = max(e.pixel_values.shape[-1] for e in with_images)
        pixels = torch.zeros((B, tiles, 3, H, W))
        mask = torch.zeros((B, tiles, H, W), dtype=torch.bool)
        for b, e in enumerate(encoded):
            if e.pixel_values is not None:
                t, _, h, w = e.pixel_values.shape
                pixels[b, :t, :, :h, :w] = e.pixel_values
                mask[b, :t, :h, :w] = e.pixel_attention_mask
        return TrainBatch(input_ids, attention, labels, pixels, mask)

    def encode_many(self, samples: Iterable[Sample]) -> tuple[list[Encoded], list[str]]:
        """Encode samples, skipping (or, strict, raising on) those that cannot be: (encoded, "where: why" skips)."""
        encoded, skipped = [], []
        for sample in samples:
            try:
                encoded.append(self.encode(sample))
            except DataError as e:
                self.bad.report(sample.where, str(e), "too_long" if "exceed the context" in str(e) else "unencodable")
                skipped.append(f"{sample.where}: {e}")
        return encoded, skipped

    def __call__(self, samples: Iterable[Sample]) -> TrainBatch:
        """Encode and collate; bad samples are dropped from the batch and listed in `skipped`."""
        encoded, skipped = self.encode_many(samples)
        batch = self.collate(encoded)
        batch.skipped = skipped
        return batch

    def scan(self, samples: Sequence[Sample]) -> list[Sample]:
        """Encode every sample once up front; return the usable ones (strict: raise on the first bad one)."""
        bad = {where.split(": ", 1)[0] for where in self.encode_many(samples)[1]}
        return [s for s in samples if s.where not in bad]


def answer_of(sample: Sample) -> str:
    """The text of the last assistant turn (the reference answer in eval sets)."""
    last = sample.conversation()[-1]
    content = last.get("content") if last.get("role") == "assistant" else None
    if content is None:
        raise DataError(f"{sample.where}: the last message is not an assistant answer")
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
