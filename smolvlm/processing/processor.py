"""Processor: conversations (or prompts + images) in, a `Batch` of model tensors out.

    messages ─ chat.py (template) ─▶ text with one <image> per image part
    images ─── image.py (decode, RGB, resize, tiles) ─▶ tiles + rows/cols per image
    text ───── prompt.py (expand <image>) ─ tokenizer.py (ids, left padding) ─▶ input_ids, attention_mask
    tiles ──── image.py (normalize, pad) ─▶ pixel_values, pixel_attention_mask

Reads both checkpoint layouts: v4-era hub folders (`preprocessor_config.json`, `processor_config.json` with only
`image_seq_len`, `chat_template.json`) and transformers v5 `save_pretrained` folders (`processor_config.json` with the
settings nested under `image_processor`, `chat_template.jinja`).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

from smolvlm.config import SmolVLMConfig, read_json
from smolvlm.errors import ConfigError, PromptError, SmolVLMError
from smolvlm.processing.chat import ChatTemplate, load_chat_template, message_images, normalize_messages
from smolvlm.processing.image import (
    DEFAULT_MAX_PIXELS,
    ImageInput,
    ImageProcessorConfig,
    ImageTiles,
    batch_tiles,
    load_image,
    split_image,
)
from smolvlm.processing.prompt import ImageTokens, expand_image_markers, image_prompt
from smolvlm.processing.tokenizer import Tokenizer

T = TypeVar("T")
R = TypeVar("R")
REFERENCE_IMAGE_SEQ_LEN = 169  # transformers' SmolVLMProcessor default when a folder does not say


@dataclass
class Batch:
    """Model inputs. pixel_* are None for text-only batches; padding tiles are all zero with a False mask."""

    input_ids: torch.Tensor  # (B, T) int64, left-padded
    attention_mask: torch.Tensor  # (B, T) int64
    pixel_values: torch.Tensor | None = None  # (B, max_tiles, 3, H, W) float32
    pixel_attention_mask: torch.Tensor | None = None  # (B, max_tiles, H, W) bool

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Batch":
        """Move every tensor to `device`; `dtype` applies to pixel_values only."""
        pixel_values = self.pixel_values
        if pixel_values is not None:
            pixel_values = pixel_values.to(device=device, dtype=dtype)
        mask = self.pixel_attention_mask
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            pixel_values=pixel_values,
            pixel_attention_mask=None if mask is None else mask.to(device),
        )


class Processor:
    """Tokenizer + image settings + chat template of one checkpoint."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_config: ImageProcessorConfig | None = None,
        image_seq_len: int = REFERENCE_IMAGE_SEQ_LEN,
        chat_template: str | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        num_workers: int | None = None,
    ) -> None:
        """`image_config` None makes a text-only processor; `max_pixels` refuses larger images (None: no limit);
        `num_workers` threads decode and resize the images of a call (Pillow releases the GIL while it works)."""
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.image_seq_len = int(image_seq_len)
        self.chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        self.max_pixels = max_pixels
        self.num_workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
        self.image_tokens = ImageTokens(
            image=tokenizer.special_token("image_token", "<image>"),
            fake_around_image=tokenizer.special_token("fake_image_token", "<fake_token_around_image>"),
            global_image=tokenizer.special_token("global_image_token", "<global-img>"),
        )
        self.end_of_utterance_token = tokenizer.special_token("end_of_utterance_token", "<end_of_utterance>")
        self._template: ChatTemplate | None = None  # compiled on first use: a broken template only breaks chat

    # ---- loading and saving ----

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs: Any) -> "Processor":
        """Load a processor from a checkpoint folder (either layout); kwargs go to the constructor."""
        directory = Path(directory)
        tokenizer = Tokenizer.from_pretrained(directory)
        processor_path = directory / "processor_config.json"
        processor_config = read_json(processor_path) if processor_path.is_file() else {}
        image_dict = processor_config.get("image_processor")
        if not isinstance(image_dict, dict) and (directory / "preprocessor_config.json").is_file():
            image_dict = read_json(directory / "preprocessor_config.json")
        image_config = ImageProcessorConfig.from_dict(image_dict) if isinstance(image_dict, dict) else None
        image_seq_len = processor_config.get("image_seq_len") or _tokens_per_tile(directory)
        return cls(
            tokenizer,
            image_config,
            image_seq_len=image_seq_len or REFERENCE_IMAGE_SEQ_LEN,
            chat_template=load_chat_template(directory),
            **kwargs,
        )

    def save(self, directory: str | Path) -> None:
        """Write tokenizer files, chat_template.jinja, processor_config.json (v5, nested) and preprocessor_config.json."""
        directory = Path(directory)
        self.tokenizer.save(directory)
        if self.chat_template is not None:
            (directory / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
            if (directory / "chat_template.json").is_file():  # a stale legacy file would take priority on load
                _write_json(directory / "chat_template.json", {"chat_template": self.chat_template})
        if self.image_config is None:
            return  # text-only: the tokenizer files are the whole processor
        image = {**self.image_config.to_dict(), "image_processor_type": "SmolVLMImageProcessor",
                 "processor_class": "SmolVLMProcessor"}  # fmt: skip
        video = {k: v for k, v in image.items() if k not in ("image_processor_type", "do_image_splitting")}
        video.update(video_processor_type="SmolVLMVideoProcessor", do_sample_frames=False)
        _write_json(directory / "preprocessor_config.json", image)
        _write_json(
            directory / "processor_config.json",
            {"image_processor": image, "image_seq_len": self.image_seq_len, "processor_class": "SmolVLMProcessor",
             "video_processor": video},
        )  # fmt: skip

    # ---- special ids ----

    @property
    def image_token_id(self) -> int:
        """Id of the `<image>` placeholder the model replaces with image features."""
        return self.tokenizer.token_to_id(self.image_tokens.image)

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a generated answer: `<end_of_utterance>` and the EOS token, those the vocabulary has."""
        names = [self.end_of_utterance_token, self.tokenizer.eos_token]
        ids = [self.tokenizer.backend.token_to_id(t) for t in names if t is not None]
        return list(dict.fromkeys(i for i in ids if i is not None))

    # ---- chat ----

    def render_chat(self, conversations: Sequence[Any], add_generation_prompt: bool = False) -> str | list[str]:
        """Prompt text(s) of one conversation (a list of messages) or a batch of them (a list of such lists)."""
        batch, batched = _as_batch(conversations)
        texts = [self._chat_template().render(messages, add_generation_prompt) for messages in batch]
        return texts if batched else texts[0]

    def encode_chat(self, conversations: Sequence[Any], add_generation_prompt: bool = False) -> Batch:
        """The one entry point: a conversation or a batch of conversations (images inside the messages) → Batch."""
        batch, _ = _as_batch(conversations)
        normalized = [normalize_messages(messages) for messages in batch]
        texts = [self._chat_template().render(messages, add_generation_prompt) for messages in normalized]
        images = [message_images(messages) for messages in normalized]
        # A template that writes the BOS itself must not get a second one (transformers checks the first prompt).
        bos = self.tokenizer.bos_token
        return self(texts, images, add_special_tokens=not (bos and texts[0].startswith(bos)))

    def _chat_template(self) -> ChatTemplate:
        if self.chat_template is None:
            raise PromptError("this checkpoint has no chat template; pass text and images to the processor instead")
        if self._template is None:
            self._template = ChatTemplate(self.chat_template, self.tokenizer.template_variables())
        return self._template

    # ---- prompts + images ----

    def __call__(
        self,
        text: str | Sequence[str],
        images: ImageInput | Sequence[ImageInput] | Sequence[Sequence[ImageInput]] | None = None,
        add_special_tokens: bool = True,
    ) -> Batch:
        """Like transformers' processor: prompts holding one `<image>` marker per image, images per prompt."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise PromptError("no text given")
        grouped = self._group_images(texts, images)
        jobs = [(image, f"sample {b} image {i}") for b, sample in enumerate(grouped) for i, image in enumerate(sample)]
        if jobs and self.image_config is None:
            raise PromptError("this processor has no image settings (no preprocessor/processor config); text only")
        processed = _parallel_map(self._prepare_image, jobs, self.num_workers)
        per_sample: list[list[ImageTiles]] = []
        for sample in grouped:
            per_sample.append(processed[: len(sample)])
            processed = processed[len(sample) :]
        prompts = [[image_prompt(t.rows, t.cols, self.image_seq_len, self.image_tokens) for t in s] for s in per_sample]
        expanded = expand_image_markers(texts, prompts, self.image_tokens)
        input_ids, attention_mask = self.tokenizer.encode_batch(expanded, add_special_tokens=add_special_tokens)
        if not jobs:
            return Batch(input_ids, attention_mask)
        self._check_image_tokens(input_ids, per_sample)
        pixel_values, pixel_attention_mask = batch_tiles(per_sample, self.image_config)
        return Batch(input_ids, attention_mask, pixel_values, pixel_attention_mask)

    def _group_images(self, texts: list[str], images: Any) -> list[list[ImageInput]]:
        """Images per prompt; a flat list is dealt out by each prompt's marker count."""
        markers = [t.count(self.image_tokens.image) for t in texts]
        if images is None:
            grouped: list[list[ImageInput]] = [[] for _ in texts]
        elif not isinstance(images, (list, tuple)):
            grouped = [[images]] if len(texts) == 1 else [[images]] + [[] for _ in texts[1:]]
        elif images and all(isinstance(x, (list, tuple)) for x in images):
            if len(images) != len(texts):
                raise PromptError(f"{len(texts)} prompts but image lists for {len(images)} samples")
            grouped = [list(x) for x in images]
        else:
            flat = list(images)
            if len(flat) != sum(markers):
                raise PromptError(
                    f"the prompts hold {sum(markers)} {self.image_tokens.image} marker(s) but {len(flat)} image(s) "
                    "were given; put exactly one marker per image"
                )
            grouped = []
            for count in markers:
                grouped.append(flat[:count])
                flat = flat[count:]
        for index, (count, sample) in enumerate(zip(markers, grouped)):
            if count != len(sample):
                raise PromptError(
                    f"sample {index}: the text has {count} {self.image_tokens.image} marker(s) but {len(sample)} "
                    f"image(s) were given; put exactly one marker (or one image part in the messages) per image"
                )
        return grouped

    def _prepare_image(self, job: tuple[ImageInput, str]) -> ImageTiles:
        image, where = job
        try:
            return split_image(load_image(image, self.max_pixels), self.image_config, where)
        except SmolVLMError as e:
            raise type(e)(f"{where}: {e}") from e

    def _check_image_tokens(self, input_ids: torch.Tensor, per_sample: list[list[ImageTiles]]) -> None:
        """Every tile must own exactly image_seq_len `<image>` ids (the tokenizer must keep the marker whole)."""
        found = (input_ids == self.image_token_id).sum(dim=1).tolist()
        for index, (count, images) in enumerate(zip(found, per_sample)):
            expected = sum(len(t.tiles) for t in images) * self.image_seq_len
            if count != expected:
                raise PromptError(
                    f"sample {index}: {count} {self.image_tokens.image} tokens after tokenization, expected "
                    f"{expected}; the text may already contain expanded image tokens, or the tokenizer does not "
                    f"treat {self.image_tokens.image} as one special token"
                )

    # ---- output ----

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of generated ids (special tokens skipped)."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def with_image_config(self, **changes: Any) -> "Processor":
        """A copy with some image settings changed (e.g. `do_image_splitting=False`, `longest_edge=5 * 384`)."""
        if self.image_config is None:
            raise ConfigError("this processor has no image settings to change")
        return Processor(
            self.tokenizer,
            replace(self.image_config, **changes),
            self.image_seq_len,
            self.chat_template,
            self.max_pixels,
            self.num_workers,
        )


def _as_batch(conversations: Sequence[Any]) -> tuple[list[list[Any]], bool]:
    if not conversations:
        raise PromptError("empty conversation")
    if isinstance(conversations[0], (list, tuple)):
        return [list(c) for c in conversations], True
    return [list(conversations)], False


def _parallel_map(fn: Callable[[T], R], items: list[T], workers: int) -> list[R]:
    if len(items) < 2 or workers < 2:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _tokens_per_tile(directory: Path) -> int | None:
    """image_seq_len implied by the model's config.json, when the folder has one."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        return SmolVLMConfig.from_json_file(path).tokens_per_tile
    except ConfigError:
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
