"""Configuration dataclasses for SmolVLM, read from and written to Hugging Face `config.json`.

Absent fields take the reference (transformers) class defaults, never a guess: a published SmolVLM config lists
only some vision fields and relies on those defaults for the rest.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from smolvlm.errors import ConfigError

VLM_MODEL_TYPES = ("smolvlm", "idefics3")
TEXT_MODEL_TYPES = ("llama",)


@dataclass
class VisionConfig:
    """SigLIP vision tower; defaults are transformers' SmolVLMVisionConfig / Idefics3VisionConfig defaults."""

    hidden_size: int = 1152
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        """Patches along one side of a full tile."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches in a full tile (rows of the position embedding)."""
        return self.patches_per_side**2


@dataclass
class TextConfig:
    """Llama / SmolLM2 decoder; defaults are transformers' LlamaConfig defaults (rms eps as SmolVLM sets it)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )


@dataclass
class SmolVLMConfig:
    """The whole model: vision tower, connector (pixel shuffle by `scale_factor`) and text decoder."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    scale_factor: int = 2
    image_token_id: int = 128257
    tie_word_embeddings: bool = False
    model_type: str = "smolvlm"
    # Fields of the original config.json we do not model; written back unchanged so a round trip loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        side = self.vision.patches_per_side
        if side % self.scale_factor:
            raise ConfigError(
                f"vision patches per side ({side} = {self.vision.image_size}/{self.vision.patch_size}) "
                f"must be divisible by scale_factor ({self.scale_factor})"
            )

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens the connector emits for one tile: (image_size / patch)^2 / scale^2."""
        return self.vision.num_patches // self.scale_factor**2

    # ---- Hugging Face config.json ----

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> "SmolVLMConfig":
        """Build from the dict of a Hugging Face SmolVLM / Idefics3 `config.json`."""
        model_type = data.get("model_type")
        if model_type not in VLM_MODEL_TYPES:
            raise ConfigError(
                f"unknown model_type {model_type!r}: smolvlm loads {', '.join(VLM_MODEL_TYPES)} "
                f"(and text-only {', '.join(TEXT_MODEL_TYPES)} through TextConfig)"
            )
        known = {"scale_factor", "image_token_id", "tie_word_embeddings", "model_type"}
        extra = {k: v for k, v in data.items() if k not in known}
        # Keep the sub-configs' unmodelled keys (e.g. Idefics3's vision `size`) under their own names.
        extra["vision_config"] = _unknown_keys(VisionConfig, data.get("vision_config") or {})
        extra["text_config"] = _unknown_keys(TextConfig, data.get("text_config") or {})
        return cls(
            vision=_dataclass_from_dict(VisionConfig, data.get("vision_config") or {}),
            text=text_config_from_hf_dict(data.get("text_config") or {}),
            scale_factor=int(data.get("scale_factor", 2)),
            image_token_id=int(data.get("image_token_id", 128257)),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            model_type=model_type,
            extra=extra,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The dict of a `config.json` that transformers' SmolVLMForConditionalGeneration loads."""
        data = {k: v for k, v in copy.deepcopy(self.extra).items() if k not in ("architectures", "model_type")}
        vision_extra = data.pop("vision_config", None) or {}
        text_extra = data.pop("text_config", None) or {}
        vision = {**vision_extra, **asdict(self.vision), "model_type": "smolvlm_vision"}
        text = {**text_extra, **text_config_to_hf_dict(self.text)}
        data.update(
            architectures=["SmolVLMForConditionalGeneration"],
            model_type="smolvlm",
            vision_config=vision,
            text_config=text,
            scale_factor=self.scale_factor,
            image_token_id=self.image_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        data.setdefault("vocab_size", self.text.vocab_size)
        return data

    @classmethod
    def from_json_file(cls, path: str | Path) -> "SmolVLMConfig":
        """Read a `config.json` file."""
        return cls.from_hf_dict(read_json(path))

    def save(self, directory: str | Path) -> Path:
        """Write `config.json` into `directory`; returns its path."""
        path = Path(directory) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        return path


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object from a file, with errors that name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def text_config_from_hf_dict(data: dict[str, Any]) -> TextConfig:
    """Build a TextConfig from a Llama `text_config` (or a text-only llama `config.json`)."""
    data = dict(data)
    # transformers v5 nests rope_theta in rope_parameters; v4 kept it at the top (plus rope_scaling).
    rope = data.get("rope_parameters") or {}
    if "rope_theta" not in data and isinstance(rope, dict) and "rope_theta" in rope:
        data["rope_theta"] = rope["rope_theta"]
    for scaling in (data.get("rope_scaling"), rope):
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ConfigError(f"unsupported rope scaling {scaling!r}: only default RoPE is implemented")
    return _dataclass_from_dict(TextConfig, data)


def text_config_to_hf_dict(text: TextConfig) -> dict[str, Any]:
    """A Llama config dict for `text`, in the transformers v5 shape (rope_theta inside rope_parameters too)."""
    data = asdict(text)
    data["model_type"] = "llama"
    data["rope_parameters"] = {"rope_type": "default", "rope_theta": text.rope_theta}
    return data


def _unknown_keys(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)} | {"model_type", "rope_parameters", "rope_scaling"}
    return {k: v for k, v in data.items() if k not in names}


def _dataclass_from_dict(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in names}
    for key in ("image_size", "patch_size"):
        if isinstance(kwargs.get(key), (list, tuple)):
            a, b = kwargs[key]
            if a != b:
                raise ConfigError(f"non-square {key} {kwargs[key]} is not supported")
            kwargs[key] = a
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad {cls.__name__} fields: {e}") from e


def _preset(
    vision: tuple[int, int, int, int, int, int],
    scale: int,
    text: tuple[int, int, int, int, int],
    vocab: int,
    image_token_id: int,
    rope_theta: float,
    max_positions: int,
) -> SmolVLMConfig:
    v_hidden, v_layers, v_heads, v_mlp, patch, image = vision
    t_hidden, t_layers, t_heads, t_kv, t_mlp = text
    return SmolVLMConfig(
        vision=VisionConfig(v_hidden, v_mlp, v_layers, v_heads, image_size=image, patch_size=patch),
        text=TextConfig(
            vocab_size=vocab,
            hidden_size=t_hidden,
            intermediate_size=t_mlp,
            num_hidden_layers=t_layers,
            num_attention_heads=t_heads,
            num_key_value_heads=t_kv,
            head_dim=64,
            max_position_embeddings=max_positions,
            rope_theta=rope_theta,
            pad_token_id=2,
        ),
        scale_factor=scale,
        image_token_id=image_token_id,
    )


PRESETS: dict[str, SmolVLMConfig] = {
    "SmolVLM-256M-Instruct": _preset((768, 12, 12, 3072, 16, 512), 4, (576, 30, 9, 3, 1536), 49280, 49190, 100000.0, 8192),
    "SmolVLM-500M-Instruct": _preset((768, 12, 12, 3072, 16, 512), 4, (960, 32, 15, 5, 2560), 49280, 49190, 100000.0, 8192),
    "SmolVLM-Instruct": _preset((1152, 27, 16, 4304, 14, 384), 3, (2048, 24, 32, 32, 8192), 49155, 49153, 273768.0, 16384),
}


def preset(name: str) -> SmolVLMConfig:
    """A fresh copy of a named preset (`SmolVLM-256M-Instruct`, `SmolVLM-500M-Instruct`, `SmolVLM-Instruct`)."""
    key = name.split("/")[-1]
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[key])
