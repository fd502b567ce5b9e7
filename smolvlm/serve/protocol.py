"""OpenAI chat-completions shapes: the request model (validated), response and stream-chunk builders, error JSON."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from smolvlm.engine.generate import GenerationResult


class ImageURL(BaseModel):
    """`{"url": "data:image/png;base64,..." | "https://...", "detail": ...}` (detail is ignored)."""

    url: str
    detail: str | None = None


class TextPart(BaseModel):
    """A text content part."""

    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    """An image content part."""

    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    """One chat message; content is a string or a list of text / image_url parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    """`stream_options`: only `include_usage` is honoured."""

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The parts of OpenAI's chat-completions request this server implements; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=1)

    def conversation(self) -> list[dict[str, Any]]:
        """The messages as plain dicts (developer messages act as system messages)."""
        messages = []
        for message in self.messages:
            data = message.model_dump(exclude_none=True)
            if data["role"] == "developer":
                data["role"] = "system"
            data.setdefault("content", "")
            messages.append(data)
        return messages

    def options(self, default_max_tokens: int) -> dict[str, Any]:
        """Generation options for GenerationConfig."""
        max_new_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        options: dict[str, Any] = {"max_new_tokens": max_new_tokens}
        if self.temperature is not None:
            options["temperature"] = self.temperature
        if self.top_p is not None:
            options["top_p"] = self.top_p
        if self.seed is not None:
            options["seed"] = self.seed
        if self.stop is not None:
            options["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return options


def validation_message(error: ValidationError) -> tuple[str, str | None]:
    """A one-line message and the offending parameter (dotted path) of the first validation error."""
    first = error.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return f"invalid request: {param or 'body'}: {first.get('msg', 'invalid value')}", param


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id() -> str:
    """A fresh completion id."""
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(result: GenerationResult) -> dict[str, int]:
    """OpenAI usage counts."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}  # fmt: skip


def completion(completion_id: str, model: str, result: GenerationResult) -> dict[str, Any]:
    """A `chat.completion` object."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "logprobs": None, "finish_reason": result.finish_reason}],  # fmt: skip
        "usage": usage(result),
    }


def chunk(completion_id: str, model: str, delta: dict[str, Any], finish_reason: str | None = None,
          usage_counts: dict[str, int] | None = None) -> dict[str, Any]:  # fmt: skip
    """A `chat.completion.chunk` object; a usage-only chunk has no choices."""
    choices = [] if usage_counts is not None else [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    ]
    out = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": choices}  # fmt: skip
    if usage_counts is not None:
        out["usage"] = usage_counts
    return out
