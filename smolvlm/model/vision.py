"""SigLIP vision encoder with NaViT-style bucketed position ids for padded (partly real) tiles.

Module and parameter names follow transformers' SmolVLMVisionTransformer so state dicts map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm.config import VisionConfig
from smolvlm.errors import ConfigError


def bucketed_position_ids(patch_mask: torch.Tensor, patches_per_side: int) -> torch.Tensor:
    """Position-embedding rows (N, h*w) for a patch mask (N, h, w): the real extent is spread over the full grid.

    Same float32 arithmetic as transformers' SmolVLMVisionEmbeddings, so bucket edges fall identically.
    Padding patches get row 0.
    """
    N, h, w = patch_mask.shape
    device = patch_mask.device
    boundaries = torch.arange(1 / patches_per_side, 1.0, 1 / patches_per_side, device=device)
    step_h = 1.0 / patch_mask[:, :, 0].sum(dim=1)  # (N,) real rows per tile
    step_w = 1.0 / patch_mask[:, 0, :].sum(dim=1)  # (N,) real columns per tile
    coords_h = torch.arange(h, device=device, dtype=torch.float32)[None, :] * step_h[:, None]  # (N, h)
    coords_w = torch.arange(w, device=device, dtype=torch.float32)[None, :] * step_w[:, None]  # (N, w)
    bucket_h = torch.bucketize(coords_h.clamp(max=1.0 - 1e-6), boundaries, right=True)  # (N, h)
    bucket_w = torch.bucketize(coords_w.clamp(max=1.0 - 1e-6), boundaries, right=True)  # (N, w)
    ids = (bucket_h[:, :, None] * patches_per_side + bucket_w[:, None, :]).reshape(N, -1)  # (N, h*w)
    return torch.where(patch_mask.reshape(N, -1), ids, torch.zeros_like(ids))


class VisionEmbeddings(nn.Module):
    """Conv patch embedding (kernel = stride = patch, valid) plus a learned position embedding."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patches_per_side = config.patches_per_side
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size, padding="valid"
        )
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C, H, W), patch_mask (N, H/p, W/p) -> patch embeddings (N, P, Dv)."""
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (N, P, Dv)
        return x + self.position_embedding(bucketed_position_ids(patch_mask, self.patches_per_side))


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with biases; padding patches are masked as keys."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (N, P, Dv), mask (N, 1, 1, P) boolean or None -> (N, P, Dv)."""
        N, P, D = x.shape
        q = self.q_proj(x).view(N, P, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, P, hd)
        k = self.k_proj(x).view(N, P, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(N, P, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, H, P, hd)
        return self.out_proj(out.transpose(1, 2).reshape(N, P, D))


class VisionMLP(nn.Module):
    """fc1 -> gelu (tanh approximation) -> fc2."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.hidden_act not in ("gelu_pytorch_tanh", "gelu_new"):
            raise ConfigError(f"unsupported vision hidden_act {config.hidden_act!r}: SigLIP uses 'gelu_pytorch_tanh'")
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P, Dv) -> (N, P, Dv)."""
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(N, P, Dv) -> (N, P, Dv)."""
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    """The stack of encoder layers (a module of its own for the `encoder.layers.{i}` checkpoint keys)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(N, P, Dv) -> (N, P, Dv)."""
        for layer in self.layers:
            x = layer(x, mask)
        return x


class VisionTransformer(nn.Module):
    """SigLIP ViT: embeddings, encoder, post_layernorm."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (N, C, H, W), patch_mask (N, H/p, W/p) boolean (None = all real) -> (N, P, Dv)."""
        p = self.config.patch_size
        N, _, H, W = pixel_values.shape
        if patch_mask is None:
            patch_mask = torch.ones(N, H // p, W // p, dtype=torch.bool, device=pixel_values.device)
        x = self.embeddings(pixel_values, patch_mask)
        keys_real = patch_mask.reshape(N, -1)  # (N, P)
        # Without padding no mask at all: SDPA's unmasked kernels are much faster on CPU.
        mask = None if bool(keys_real.all()) else keys_real[:, None, None, :]  # (N, 1, 1, P)
        return self.post_layernorm(self.encoder(x, mask))
