"""Resolve a model name to a local folder: a directory as is, else the Hugging Face cache, else a download."""

from __future__ import annotations

import os
from pathlib import Path

from smolvlm.errors import ModelNotFoundError

# What a model folder needs; skips pickle weights, ONNX exports and other large extras some repos carry.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set (read at call time, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else with a separator or a leading . or ~ is a local path.
    return name.startswith((".", "~", "/")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local model folder for a directory, or a hub id found in the cache or (when online) downloaded."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; pass the model folder that holds config.json")
    tried = [f"local folder {path}: does not exist"]
    if isinstance(name_or_path, Path) or _looks_like_path(name):
        raise ModelNotFoundError(f"model {name!r} not found. Tried: {tried[0]}")

    from huggingface_hub import snapshot_download

    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # None: huggingface_hub's own default
    try:
        return Path(snapshot_download(name, cache_dir=cache_dir, local_files_only=True, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # huggingface_hub raises several types for "not in the cache"
        tried.append(f"Hugging Face cache ({cache_dir or 'default location'}): {type(e).__name__}")
    if hub_offline():
        tried.append("download: skipped, HF_HUB_OFFLINE is set")
    else:
        try:
            return Path(snapshot_download(name, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS))
        except Exception as e:
            first_line = (str(e).splitlines() or [""])[0]
            tried.append(f"download from the Hugging Face Hub: {type(e).__name__}: {first_line}")
    raise ModelNotFoundError(
        f"model {name!r} not found. Tried: " + "; ".join(tried) + ". Pass a local folder, or a hub id that is "
        "cached or reachable (check the spelling and your network)."
    )
