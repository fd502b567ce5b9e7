"""Tokenizer: a `tokenizers.Tokenizer` plus the special tokens and settings of `tokenizer_config.json`.

Behaves like transformers' `TokenizersBackend` (what `AutoTokenizer` gives for SmolVLM checkpoints): tokenizer.json
is used as is, including its post-processor (with a tokenizer.json present, transformers ignores `add_bos_token` /
`add_eos_token`), special tokens named in the config are added to the vocabulary when missing, decoding skips
special tokens, and padding is on the LEFT with the tokenizer's pad token for generation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

from smolvlm.config import read_json
from smolvlm.errors import CheckpointError, ConfigError

# The named special tokens of transformers (its SPECIAL_TOKENS_ATTRIBUTES), in its order.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Runtime/serialization keys of tokenizer_config.json that are rewritten on save rather than copied.
_REWRITTEN_KEYS = {"added_tokens_decoder", "chat_template", "tokenizer_class", "auto_map", "tokenizer_file",
                   "name_or_path", "special_tokens_map_file", "extra_special_tokens", "additional_special_tokens"}  # fmt: skip


def _token_text(value: Any) -> str | None:
    """A special-token value from a config: a string, or a serialized AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    if isinstance(value, AddedToken):
        return value.content
    raise ConfigError(f"special token must be a string or an AddedToken dict, got {value!r}")


class Tokenizer:
    """Text <-> ids for one checkpoint: encode, decode, left-padded batches, special tokens and chat template."""

    def __init__(
        self,
        tokenizer: BackendTokenizer,
        special_tokens: dict[str, Any] | None = None,
        chat_template: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        """Wrap a built `tokenizers.Tokenizer`.

        `special_tokens`: {"bos_token": "<|im_start|>", "eos_token": ..., "pad_token": ..., "unk_token": ...,
        "image_token": ..., "additional_special_tokens": [...]}; values may be token strings or ids ("bos_token_id": 1
        works too). `config`: the rest of tokenizer_config.json (kept and written back by `save`); an explicit
        `add_bos_token` / `add_eos_token` there replaces the post-processor, as transformers does for a tokenizer
        built without a tokenizer.json (a GGUF vocabulary, say).
        """
        self.backend = copy.deepcopy(tokenizer)
        # transformers resets any truncation/padding baked into tokenizer.json on every call
        self.backend.no_truncation()
        self.backend.no_padding()
        self.config = {k: v for k, v in (config or {}).items() if k not in _REWRITTEN_KEYS}
        self.chat_template = chat_template
        self.special_tokens: dict[str, str] = {}  # named ones: bos/eos/... and model-specific *_token
        self.extra_special_tokens: list[str] = []
        for key, value in (special_tokens or {}).items():
            if key in ("additional_special_tokens", "extra_special_tokens"):
                if isinstance(value, dict):  # v5 named extras: {"image_token": "<image>", ...}
                    self.special_tokens.update({k: self._as_text(k, v) for k, v in value.items()})
                else:
                    self.extra_special_tokens += [self._as_text(key, v) for v in value or []]
            elif value is not None:
                name = key[: -len("_id")] if key.endswith("_token_id") else key
                self.special_tokens[name] = self._as_text(key, value)
        self.split_special_tokens = bool(self.config.get("split_special_tokens", False))
        self.backend.encode_special_tokens = self.split_special_tokens
        self.clean_up_tokenization_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))
        # Like transformers: special tokens the vocabulary lacks are added (as special, unnormalized).
        wanted = list(self.special_tokens.values()) + self.extra_special_tokens
        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(wanted)])
        if "add_bos_token" in self.config or "add_eos_token" in self.config:
            self._bos_eos_post_processor(bool(self.config.get("add_bos_token")), bool(self.config.get("add_eos_token")))

    def _bos_eos_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """transformers' `update_post_processor`: BOS before and/or EOS after each sequence."""
        bos, eos = self.bos_token if add_bos else None, self.eos_token if add_eos else None
        single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
        pair = " ".join([single] + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
        specials = [(t, self.token_to_id(t)) for t in (bos, eos) if t]
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    def _as_text(self, key: str, value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            token = self.backend.id_to_token(value)
            if token is None:
                raise ConfigError(f"special token {key}={value}: id is outside the vocabulary")
            return token
        text = _token_text(value)
        if not text:
            raise ConfigError(f"special token {key}={value!r} is empty")
        return text

    # ---- loading and saving ----

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, special_tokens_map.json, chat template) from a folder."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{directory}: no tokenizer.json (a Hugging Face fast-tokenizer file is required)")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a valid tokenizers file ({e})") from e
        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        # With a tokenizer.json its post-processor decides; transformers drops these two flags then.
        config.pop("add_bos_token", None)
        config.pop("add_eos_token", None)
        special = {k: config[k] for k in NAMED_SPECIAL_TOKENS if config.get(k) is not None}
        # Model-specific named tokens (image_token, ...) are any other string-valued *_token key.
        special.update({k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)})
        extras = config.get("extra_special_tokens") or config.get("additional_special_tokens")
        if extras:
            special["extra_special_tokens"] = extras
        special_map_path = directory / "special_tokens_map.json"
        if "added_tokens_decoder" not in config and special_map_path.is_file():
            # legacy folders: the map overrides the config
            for key, value in read_json(special_map_path).items():
                special["extra_special_tokens" if key == "additional_special_tokens" else key] = value
        jinja = directory / "chat_template.jinja"
        template = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
        if isinstance(template, list):  # several named templates: use "default"
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        return cls(backend, special, template, config)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (loadable by AutoTokenizer)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        decoder = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }  # fmt: skip
        special = dict(self.special_tokens)
        if self.extra_special_tokens:
            special["additional_special_tokens"] = self.extra_special_tokens
        config = {
            **self.config,
            **special,
            "added_tokens_decoder": decoder,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        named = {k: v for k, v in special.items() if k in NAMED_SPECIAL_TOKENS or k == "additional_special_tokens"}
        (directory / "special_tokens_map.json").write_text(json.dumps(named, indent=2, ensure_ascii=False) + "\n")

    # ---- special tokens ----

    def token_to_id(self, token: str) -> int:
        """Id of a token string; ConfigError when the vocabulary lacks it."""
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def special_token(self, name: str, default: str | None = None) -> str | None:
        """A named special token string ('bos_token', 'image_token', ...) or `default`."""
        return self.special_tokens.get(name, default)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def vocab_size(self) -> int:
        """Entries including added tokens (the rows an embedding must have at least)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def template_variables(self) -> dict[str, str]:
        """The special tokens a chat template sees by name (transformers passes its `special_tokens_map`)."""
        return dict(self.special_tokens)

    # ---- encode / decode ----

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text (special tokens from tokenizer.json's post-processor when asked)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: list[str], add_special_tokens: bool = True, padding_side: str = "left"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T) and attention_mask (B, T), int64, padded with the pad token (left by default)."""
        rows = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        length = max((len(r) for r in rows), default=0)
        pad_id = self.pad_token_id
        if pad_id is None:
            if any(len(r) != length for r in rows):
                raise ConfigError("cannot pad a batch: the tokenizer has no pad_token (set one in tokenizer_config)")
            pad_id = 0
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        return input_ids, attention_mask

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids, special tokens skipped by default."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        # transformers skips this cleanup for BPE models (it corrupts their output)
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
                text = text.replace(before, after)
        return text

    def decode_batch(self, rows: list[list[int]] | torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        """Texts of several sequences."""
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        return [self.decode(row, skip_special_tokens) for row in rows]
