"""Load and save Hugging Face checkpoint folders (config.json + safetensors) for SmolVLM and text-only Llama.

Loading builds the model on the meta device, checks every tensor's name and shape against it, and assigns the
file's tensors: nothing is randomly initialised, and any missing, unexpected or misshapen tensor is an error that
names the file and the tensor. Saving writes what transformers' SmolVLMForConditionalGeneration /
LlamaForCausalLM load unchanged. Safetensors only: pickle files are never opened.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from smolvlm.config import (
    TEXT_MODEL_TYPES,
    VLM_MODEL_TYPES,
    SmolVLMConfig,
    read_json,
    text_config_from_hf_dict,
    text_config_to_hf_dict,
)
from smolvlm.errors import CheckpointError, ConfigError
from smolvlm.model.smolvlm import SmolVLM
from smolvlm.model.text import CausalLM
from smolvlm.weights.hub import resolve_model_path

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
# Derived buffers some older Llama checkpoints stored; recomputed here, so skipped.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
PACK_ALIGN = 256  # bytes: where each packed tensor starts (cuBLAS and vector loads like aligned rows)

_VLM_PARTS = ("vision_model.", "connector.", "text_model.")
_LLAMA_PARTS = ("embed_tokens.", "layers.", "norm.")


# ---- key layouts ----


def vlm_key(hub_key: str) -> str | None:
    """Our SmolVLM parameter name for a checkpoint key, or None if it is not one.

    Layouts found on the hub: `model.{vision_model,connector,text_model}.*` + `lm_head.weight`
    (SmolVLMForConditionalGeneration / Idefics3ForConditionalGeneration) and the same without the `model.` prefix
    (SmolVLMModel / Idefics3Model, saved without an LM head).
    """
    if hub_key == "lm_head.weight":
        return hub_key
    key = hub_key.removeprefix("model.")
    return key if key.startswith(_VLM_PARTS) else None


def vlm_hub_key(key: str) -> str:
    """The transformers SmolVLMForConditionalGeneration name of one of our parameters."""
    return key if key == "lm_head.weight" else f"model.{key}"


def llama_key(hub_key: str) -> str | None:
    """Our CausalLM parameter name for a LlamaForCausalLM (`model.*`, `lm_head.weight`) or LlamaModel key."""
    if hub_key == "lm_head.weight" or hub_key.startswith("model."):
        return hub_key
    return f"model.{hub_key}" if hub_key.startswith(_LLAMA_PARTS) else None


def llama_hub_key(key: str) -> str:
    """Our CausalLM names already are transformers' LlamaForCausalLM names."""
    return key


# ---- reading ----


def read_model_config(directory: Path) -> dict:
    """The config.json dict of a model folder, with its model_type checked."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json, so this is not a Hugging Face model folder")
    data = read_json(path)
    model_type = data.get("model_type")
    if model_type not in VLM_MODEL_TYPES + TEXT_MODEL_TYPES:
        raise CheckpointError(
            f"{path}: unknown model_type {model_type!r}; smolvlm loads {', '.join(VLM_MODEL_TYPES)} "
            f"(vision-language) and {', '.join(TEXT_MODEL_TYPES)} (text-only) checkpoints"
        )
    return data


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a folder: `model.safetensors`, or the shards its index lists."""
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shard_names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r}); re-download it") from e
        shards = [directory / name for name in shard_names]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"{index} lists shard {shard.name}, which is missing from {directory}")
        return shards
    pickles = [name for name in PICKLE_NAMES if (directory / name).exists()]
    hint = (
        f" It has {', '.join(pickles)}: pickle checkpoints are never loaded (they can run code); convert them to "
        "safetensors with transformers first."
        if pickles
        else ""
    )
    raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME} found.{hint}")


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU, bfloat16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load_weights(
    model: nn.Module,
    files: list[Path],
    to_model_key: Callable[[str], str | None],
    to_hub_key: Callable[[str], str],
    device: torch.device,
    dtype: torch.dtype,
    tie_key: tuple[str, str] | None,
) -> None:
    """Fill a meta-device `model` from safetensors files, checking names and shapes; errors name file and tensor.

    `tie_key` = (head, embedding) names when the config ties them: the head may then be absent from the files.
    On a GPU the weights end up in one allocation (`pack_onto`).
    """
    pack = device.type == "cuda"
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    loaded: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for hub_key in handle.keys():
                    if hub_key.endswith(IGNORED_SUFFIXES):
                        continue
                    key = to_model_key(hub_key)
                    if key is None or key not in expected:
                        raise CheckpointError(
                            f"{path}: unexpected tensor {hub_key!r}, which this model (from config.json) does not "
                            "have; the checkpoint and its config.json do not belong together"
                        )
                    if key in loaded:
                        raise CheckpointError(
                            f"{path}: tensor {hub_key!r} duplicates one already read from {source[key]}"
                        )
                    shape = tuple(handle.get_slice(hub_key).get_shape())
                    if shape != expected[key]:
                        raise CheckpointError(
                            f"{path}: tensor {hub_key!r} has shape {list(shape)} but config.json implies "
                            f"{list(expected[key])}; the config and weights do not match"
                        )
                    tensor = handle.get_tensor(hub_key)
                    if tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    loaded[key], source[key] = (tensor if pack else tensor.to(device)), path
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{path}: cannot read safetensors file ({e}); it is truncated or corrupt, re-download it"
            ) from e

    untied = False
    if tie_key is not None:
        head, embedding = tie_key
        if head in loaded and embedding not in loaded:
            loaded[embedding] = loaded.pop(head)
        elif head in loaded and not torch.equal(loaded[head], loaded[embedding]):
            untied = True  # both stored and different: keep both, as transformers does
        else:
            loaded.pop(head, None)
    optional = {tie_key[0]} if tie_key is not None and not untied else set()
    missing = sorted(set(expected) - set(loaded) - optional)
    if missing:
        names = ", ".join(repr(to_hub_key(k)) for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        where = ", ".join(str(f) for f in files)
        raise CheckpointError(f"{where}: missing tensor(s) {names}{more} that config.json requires")

    if pack:
        loaded = pack_onto(loaded, list(expected), device)
    model.load_state_dict(loaded, strict=False, assign=True)
    if tie_key is not None and not untied:
        model.tie_weights()
    for module in model.modules():  # non-persistent buffers (RoPE frequencies) are not in the files
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(device)


def pack_onto(tensors: dict[str, torch.Tensor], order: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors copied into one allocation on `device`, in `order` (names not in `tensors` skipped), as views.

    CUDA's caching allocator gives every tensor over 1 MB a block of its own, which can keep up to 1 MB of slack
    (the 256M model's ~470 tensors took 6 MiB more than transformers' load of the same file); one block has none.
    Linears stored back to back (q/k/v, gate/up, in module order) also fuse without a copy (`fuse_linears`)."""
    names = [name for name in order if name in tensors]
    offsets, total = {}, 0
    for name in names:
        offsets[name] = total
        total += -(-tensors[name].nbytes // PACK_ALIGN) * PACK_ALIGN
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    packed = {}
    for name in names:
        tensor = tensors[name]
        view = flat[offsets[name] : offsets[name] + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        packed[name] = view
    return packed


def _prepare(path_or_name: str | Path, device: torch.device | str | None, dtype: torch.dtype | None):
    directory = resolve_model_path(path_or_name)
    device = torch.device(device if device is not None else "cpu")
    return directory, read_model_config(directory), device, dtype or default_dtype(device)


def load_smolvlm(
    path_or_name: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> SmolVLM:
    """A SmolVLM from a SmolVLM / Idefics3 folder or hub id (float32 on CPU, bfloat16 elsewhere by default)."""
    directory, data, device, dtype = _prepare(path_or_name, device, dtype)
    if data["model_type"] not in VLM_MODEL_TYPES:
        raise CheckpointError(
            f"{directory / 'config.json'}: model_type {data['model_type']!r} is a text-only model; "
            "load it with CausalLM.from_pretrained"
        )
    config = _config_or_error(SmolVLMConfig.from_hf_dict, data, directory)
    with torch.device("meta"):
        model = SmolVLM(config)
    tie = ("lm_head.weight", "text_model.embed_tokens.weight") if config.tie_word_embeddings else None
    load_weights(model, weight_files(directory), vlm_key, vlm_hub_key, device, dtype, tie)
    return model.eval()


def load_causal_lm(
    path_or_name: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> CausalLM:
    """A CausalLM from a text-only Llama / SmolLM2 folder or hub id."""
    directory, data, device, dtype = _prepare(path_or_name, device, dtype)
    if data["model_type"] not in TEXT_MODEL_TYPES:
        raise CheckpointError(
            f"{directory / 'config.json'}: model_type {data['model_type']!r} is a vision-language model; "
            "load it with SmolVLM.from_pretrained"
        )
    # A stand-alone LlamaConfig defaults rms_norm_eps to 1e-6 (TextConfig's 1e-5 is what SmolVLM sets for its decoder).
    config = _config_or_error(text_config_from_hf_dict, {"rms_norm_eps": 1e-6, **data}, directory)
    with torch.device("meta"):
        model = CausalLM(config)
    tie = ("lm_head.weight", "model.embed_tokens.weight") if config.tie_word_embeddings else None
    load_weights(model, weight_files(directory), llama_key, llama_hub_key, device, dtype, tie)
    return model.eval()


def load_model(
    path_or_name: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> SmolVLM | CausalLM:
    """A SmolVLM or a CausalLM, whichever the folder's config.json describes."""
    directory = resolve_model_path(path_or_name)
    if read_model_config(directory)["model_type"] in VLM_MODEL_TYPES:
        return load_smolvlm(directory, device=device, dtype=dtype)
    return load_causal_lm(directory, device=device, dtype=dtype)


def _config_or_error(build: Callable, data: dict, directory: Path):
    try:
        return build(data)
    except ConfigError as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from e


# ---- writing ----


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write tensors to a safetensors file; a failed write (full disk, missing or read-only folder) is an OSError."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:  # safetensors reports I/O failures as its own error type
        raise OSError(f"could not write {path}: {e}") from e
    return Path(path)


def write_weights(model: nn.Module, directory: Path, to_hub_key: Callable[[str], str], tied_key: str | None) -> Path:
    """Write the model's tensors to `model.safetensors` under hub names, the tied head left out."""
    tensors = {
        to_hub_key(name): tensor.detach().to("cpu").contiguous()
        for name, tensor in model.state_dict().items()
        if name != tied_key
    }
    _remove_stale_shards(directory)
    return save_tensors(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})


def _remove_stale_shards(directory: Path) -> None:
    # A leftover index would make loaders read the old shards instead of the new single file.
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            shard_names = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            shard_names = set()
        for name in shard_names:
            (directory / name).unlink(missing_ok=True)
        index.unlink()


def save_smolvlm(model: SmolVLM, directory: str | Path) -> Path:
    """Write config.json + model.safetensors for transformers' SmolVLMForConditionalGeneration; returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory)
    tied = model.lm_head.weight is model.text_model.embed_tokens.weight
    write_weights(model, directory, vlm_hub_key, "lm_head.weight" if tied else None)
    return directory


def save_causal_lm(model: CausalLM, directory: str | Path) -> Path:
    """Write config.json + model.safetensors for transformers' LlamaForCausalLM; returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {**text_config_to_hf_dict(model.config), "architectures": ["LlamaForCausalLM"]}
    (directory / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    write_weights(model, directory, llama_hub_key, "lm_head.weight" if tied else None)
    return directory


__all__ = [
    "default_dtype",
    "load_causal_lm",
    "load_model",
    "load_smolvlm",
    "read_model_config",
    "save_causal_lm",
    "save_smolvlm",
    "vlm_key",
    "weight_files",
]
