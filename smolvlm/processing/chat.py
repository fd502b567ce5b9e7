"""Chat templates: render a checkpoint's own Jinja template over OpenAI / transformers-style messages.

The environment matches what transformers gives templates: a sandboxed, immutable jinja2 environment with
trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a JSON `tojson` filter that does not
escape HTML, a restricted `dict` and `namespace`, and the tokenizer's special tokens as variables. What the template
sees is rebuilt from plain JSON types (decoded images become a placeholder string), as transformers does.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from smolvlm.config import read_json
from smolvlm.errors import PromptError

Message = dict[str, Any]
IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")  # where an image part keeps its image, in transformers' order


def load_chat_template(directory: str | Path) -> str | None:
    """A folder's chat template, in transformers' processor order, then the tokenizer's; None when it has none."""
    directory = Path(directory)
    processor_config = directory / "processor_config.json"
    if processor_config.is_file() and isinstance(read_json(processor_config).get("chat_template"), str):
        return read_json(processor_config)["chat_template"]
    legacy = directory / "chat_template.json"
    if legacy.is_file():
        template = read_json(legacy).get("chat_template")
        if not isinstance(template, str):
            raise PromptError(f"{legacy}: expected a string under 'chat_template'")
        return template
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tokenizer_config = directory / "tokenizer_config.json"
    template = read_json(tokenizer_config).get("chat_template") if tokenizer_config.is_file() else None
    if isinstance(template, list):  # several named templates
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    return template


# ---- messages ----


def normalize_messages(messages: list[Any]) -> list[Message]:
    """Dicts without None values; OpenAI `image_url` parts become `{"type": "image", "url": ...}`."""
    normalized = []
    for message in messages:
        message = _to_plain_dict(message)
        if not isinstance(message, dict) or "role" not in message:
            raise PromptError(f"each message must be a dict with a 'role', got {message!r:.80}")
        message = {k: v for k, v in message.items() if v is not None}
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = [_normalize_part(part) for part in content]
        normalized.append(message)
    return normalized


def _to_plain_dict(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic messages (OpenAI SDK)
        return value.model_dump()
    return value


def _normalize_part(part: Any) -> Any:
    part = _to_plain_dict(part)
    if isinstance(part, dict) and part.get("type") == "image_url" and "image_url" in part:
        url = part["image_url"]
        return {"type": "image", "url": url.get("url", "") if isinstance(url, dict) else url}
    return part


def message_images(messages: list[Message]) -> list[Any]:
    """The images of a (normalized) conversation in order of appearance; base64 payloads become bytes."""
    images = []
    for m_index, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for p_index, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "image"):
                continue
            key = next((k for k in IMAGE_SOURCE_KEYS if k in part), None)
            if key is None:
                raise PromptError(
                    f"message {m_index} part {p_index}: image part without an image; give one of "
                    f"{', '.join(IMAGE_SOURCE_KEYS)}"
                )
            images.append(_decode_base64(part[key], m_index, p_index) if key == "base64" else part[key])
    return images


def _decode_base64(payload: Any, m_index: int, p_index: int) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (ValueError, TypeError) as e:
        raise PromptError(f"message {m_index} part {p_index}: invalid base64 image ({e})") from e


def plain_template_data(value: Any) -> Any:
    """Rebuild a value from JSON types only; anything else (images, arrays) becomes a '<TypeName>' placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(v) for v in value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / torch scalars
        return plain_template_data(value.item())
    if (dataclasses.is_dataclass(value) and not isinstance(value, type)) or callable(getattr(value, "model_dump", None)):
        return plain_template_data(_to_plain_dict(value))
    return f"<{type(value).__name__}>"


# ---- the jinja environment ----


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes (no way into CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise PromptError(f"chat template does not compile: {e}") from e


class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference."""

    def __init__(self, template: str, variables: dict[str, Any] | None = None) -> None:
        self.source = template
        self.variables = dict(variables or {})
        self._template = _compile(template)

    def render(self, messages: list[Any], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """The prompt text of one conversation, exactly as the template writes it."""
        chat = plain_template_data(normalize_messages(messages))
        if not self.renders_string_content:
            chat = [_text_parts(m) for m in chat]
        context = plain_template_data({**self.variables, **kwargs})
        try:
            return self._template.render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.exceptions.TemplateError as e:
            raise PromptError(f"chat template failed: {e}") from e

    @functools.cached_property
    def renders_string_content(self) -> bool:
        """Whether string `content` reaches the output. SmolVLM v1 templates only read lists of parts, so a plain
        string (a system prompt, say) would vanish; for such templates strings are wrapped as one text part."""
        probe = "smolvlmprobe"
        try:
            out = self._template.render(
                messages=[{"role": "user", "content": probe}], add_generation_prompt=False, **self.variables
            )
        except jinja2.exceptions.TemplateError:
            return True
        return probe in out.lower()


def _text_parts(message: Message) -> Message:
    if isinstance(message.get("content"), str):
        return {**message, "content": [{"type": "text", "text": message["content"]}]}
    return message
