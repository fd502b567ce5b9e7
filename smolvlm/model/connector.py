"""Connector: pixel shuffle (s x s neighbouring patches -> one token) and a linear projection to the text width."""

from __future__ import annotations

import torch
from torch import nn

from smolvlm.config import SmolVLMConfig


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(N, P, D) -> (N, P / s², D·s²), folding in exactly transformers' SmolVLMConnector order.

    The order matters: pretrained projection weights expect this channel layout, and an "equivalent" fold would
    silently scramble them.
    """
    N, P, D = x.shape
    side = int(P**0.5)
    x = x.view(N, side, side // scale, D * scale)  # fold s neighbouring columns into the channels
    x = x.permute(0, 2, 1, 3)  # (N, side/s, side, D·s)
    x = x.reshape(N, side // scale, side // scale, D * scale * scale)  # fold s neighbouring rows
    x = x.permute(0, 2, 1, 3)  # (N, side/s, side/s, D·s²)
    return x.reshape(N, P // (scale * scale), D * scale * scale)


class Connector(nn.Module):
    """Pixel shuffle then `modality_projection.proj` (Linear without bias) to the text hidden size."""

    def __init__(self, config: SmolVLMConfig) -> None:
        super().__init__()
        self.scale_factor = config.scale_factor
        in_features = config.vision.hidden_size * config.scale_factor**2
        # A dict only so the parameter is named `modality_projection.proj.weight`, as in the checkpoints.
        self.modality_projection = nn.ModuleDict(
            {"proj": nn.Linear(in_features, config.text.hidden_size, bias=False)}
        )

    def forward(self, image_hidden: torch.Tensor) -> torch.Tensor:
        """Vision states (N, P, Dv) -> image tokens (N, P / s², D)."""
        return self.modality_projection["proj"](pixel_shuffle(image_hidden, self.scale_factor))
