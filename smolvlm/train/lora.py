"""LoRA: low-rank adapters on chosen linear layers, saved in PEFT's format for transformers' SmolVLM.

    y = base(x) + (alpha / r) · B(A(dropout(x)))      A: (r, in) kaiming-uniform, B: (out, r) zeros (PEFT's init)

Targets are regular expressions searched in our module names (which are transformers' names without the `model.`
prefix), e.g. `text_model.*(q_proj|v_proj)`. The adapter file uses PEFT's keys for
SmolVLMForConditionalGeneration: `base_model.model.model.text_model.layers.0.self_attn.q_proj.lora_A.weight`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from smolvlm.errors import CheckpointError, ConfigError
from smolvlm.weights.checkpoint import save_tensors, vlm_hub_key, vlm_key

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Every projection of the three parts: SigLIP attention/MLP, the connector, Llama attention/MLP.
DEFAULT_TARGETS = (r"(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2)$",
                   r"modality_projection\.proj$")


@dataclass
class LoRAConfig:
    """Rank, scale, dropout and target patterns of an adapter."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    base_model: str = ""  # the checkpoint the adapter applies to, when an adapter file named it

    @property
    def scaling(self) -> float:
        """The factor alpha / r applied to the low-rank update."""
        return self.alpha / self.r


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r <= 0:
            raise ConfigError(f"LoRA rank must be positive, got {r}")
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, in) -> (…, out)."""
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scaling · B @ A."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)
            out.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def matching_linears(model: nn.Module, patterns: Iterable[str], prefixes: Iterable[str] = ("",)) -> list[str]:
    """Names of nn.Linear modules under one of `prefixes` whose name matches any pattern (re.search)."""
    compiled = [re.compile(p) for p in patterns]
    prefixes = tuple(prefixes)
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(prefixes) and any(c.search(name) for c in compiled)]


def apply_lora(model: nn.Module, config: LoRAConfig, prefixes: Iterable[str] = ("",)) -> list[str]:
    """Wrap matching linears (under `prefixes`, e.g. "text_model.") in LoRALinear; returns the wrapped names."""
    names = matching_linears(model, config.targets, prefixes)
    if not names:
        raise ConfigError(f"no linear layer under {list(prefixes)} matches the LoRA targets {config.targets}")
    wrap_linears(model, names, config)
    return names


def wrap_linears(model: nn.Module, names: Iterable[str], config: LoRAConfig) -> None:
    """Wrap the named linears in fresh LoRALinear layers of `config`'s rank and scale."""
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), config.r, config.alpha, config.dropout))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear, in place; returns the model."""
    for name, module in lora_modules(model).items():
        _set_module(model, name, module.merged())
    return model


def peft_key(module_name: str, which: str) -> str:
    """PEFT's adapter key of our module's lora_A / lora_B weight."""
    hub_module = vlm_hub_key(f"{module_name}.weight").removesuffix(".weight")
    return f"{PEFT_PREFIX}{hub_module}.{which}.weight"


def save_adapter(model: nn.Module, config: LoRAConfig, directory: str | Path, base_model: str = "",
                 full_modules: Sequence[str] = ()) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT format); returns the folder.

    `full_modules` (e.g. ["connector"]) are trained in full beside the adapters: their weights go into the file
    as PEFT `modules_to_save`, so the adapter alone reproduces the fine-tuned model.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules = lora_modules(model)
    if not modules:
        raise ConfigError("the model has no LoRA layers to save")
    tensors = {}
    for name, m in modules.items():
        tensors[peft_key(name, "lora_A")] = m.lora_A.weight.detach().cpu().contiguous()
        tensors[peft_key(name, "lora_B")] = m.lora_B.weight.detach().cpu().contiguous()
    for name, tensor in model.state_dict().items():
        if name.startswith(tuple(f"{m}." for m in full_modules)):
            tensors[PEFT_PREFIX + vlm_hub_key(name)] = tensor.detach().cpu().contiguous()
    save_tensors(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "r": config.r,
        "lora_alpha": config.alpha, "lora_dropout": config.dropout, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(vlm_hub_key(f"{n}.weight").removesuffix(".weight") for n in modules),
        "modules_to_save": [vlm_hub_key(f"{m}.weight").removesuffix(".weight") for m in full_modules] or None,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {},
    }  # fmt: skip
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
    return directory


AdapterTensors = dict[str, dict[str, torch.Tensor]]  # our module name -> {"lora_A": ..., "lora_B": ...}


def read_adapter(directory: str | Path) -> tuple[LoRAConfig, AdapterTensors, dict[str, torch.Tensor]]:
    """A PEFT LoRA adapter folder: its settings, its low-rank pairs and its `modules_to_save` weights, both by our
    names."""
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"{directory}: not a LoRA adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    data = json.loads(config_path.read_text(encoding="utf-8"))
    if data.get("peft_type") != "LORA" or data.get("use_dora") or data.get("use_rslora"):
        raise CheckpointError(f"{config_path}: only plain LoRA adapters are supported (peft_type LORA, no DoRA/rsLoRA)")
    tensors = load_file(str(weights_path))
    modules: AdapterTensors = {}
    full: dict[str, torch.Tensor] = {}  # modules_to_save weights, by our parameter name
    for key, tensor in tensors.items():
        stem, which = key.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        if which in ("lora_A", "lora_B") and vlm_key(f"{stem}.weight") is not None:
            modules.setdefault(vlm_key(f"{stem}.weight").removesuffix(".weight"), {})[which] = tensor
        elif vlm_key(key.removeprefix(PEFT_PREFIX)) is not None:
            full[vlm_key(key.removeprefix(PEFT_PREFIX))] = tensor
        else:
            raise CheckpointError(f"{weights_path}: unexpected adapter key {key!r}")
    for name, pair in modules.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{weights_path}: {name!r} needs both lora_A and lora_B")
    config = LoRAConfig(r=int(data["r"]), alpha=float(data["lora_alpha"]), dropout=float(data.get("lora_dropout", 0)),
                        base_model=data.get("base_model_name_or_path") or "")
    return config, modules, full


def _wrap_adapter(model: nn.Module, modules: AdapterTensors, config: LoRAConfig, source: Path,
                  unmerge: bool = False) -> None:
    """Wrap each adapted linear in a LoRALinear holding the adapter's pair; with `unmerge`, first take the pair's
    update out of the linear's weight (a model the adapter was merged into)."""
    for name, pair in modules.items():
        try:
            base = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"{source}: the adapter targets {name!r}, which this model lacks") from e
        if not isinstance(base, nn.Linear):
            raise CheckpointError(f"{source}: {name!r} is not a linear layer")
        wrapped = LoRALinear(base, pair["lora_A"].shape[0], config.alpha, config.dropout)
        with torch.no_grad():
            wrapped.lora_A.weight.copy_(pair["lora_A"])
            wrapped.lora_B.weight.copy_(pair["lora_B"])
            if unmerge:
                delta = (wrapped.lora_B.weight.float() @ wrapped.lora_A.weight.float()) * wrapped.scaling  # (out, in)
                base.weight.copy_((base.weight.float() - delta).to(base.weight.dtype))
        _set_module(model, name, wrapped)


def load_adapter(model: nn.Module, directory: str | Path) -> LoRAConfig:
    """Apply a PEFT LoRA adapter folder to our model (wrapping its target linears) and load its weights."""
    config, modules, full = read_adapter(directory)
    source = Path(directory) / ADAPTER_WEIGHTS
    state = model.state_dict()
    for name, tensor in full.items():
        if name not in state or state[name].shape != tensor.shape:
            raise CheckpointError(f"{source}: {name!r} does not fit this model")
        with torch.no_grad():
            state[name].copy_(tensor)
    _wrap_adapter(model, modules, config, source)
    return config


def continue_adapter(model: nn.Module, directory: str | Path, prefixes: Iterable[str], dropout: float = 0.0
                     ) -> LoRAConfig:
    """Train an adapter on: `model` holds it merged (a `smolvlm train` output, or a later stage run on one); its
    update is taken back out of the weights and its pairs become the LoRA layers, so the saved adapter is again
    relative to the original base. Its `modules_to_save` are not loaded: the model's own weights are newer."""
    config, modules, _ = read_adapter(directory)
    outside = sorted(name for name in modules if not name.startswith(tuple(prefixes)))
    if outside:
        raise ConfigError(f"{directory}: the adapter also adapts {outside[0]!r}, a part this stage does not train "
                          "with LoRA")
    config.dropout = dropout
    _wrap_adapter(model, modules, config, Path(directory) / ADAPTER_WEIGHTS, unmerge=True)
    return config
