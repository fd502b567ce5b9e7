"""SmolVLM: SigLIP vision encoder -> pixel-shuffle connector -> Llama decoder with an LM head.

Image features replace the embeddings of the `<image>` tokens, in order. Inputs are the tensors transformers'
SmolVLMForConditionalGeneration takes; all-zero padding tiles are skipped exactly as it does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from smolvlm.config import SmolVLMConfig
from smolvlm.engine.kv_cache import KVCache
from smolvlm.errors import ImageError, PromptError
from smolvlm.model.connector import Connector
from smolvlm.model.text import TextDecoder
from smolvlm.model.vision import VisionTransformer


@dataclass
class SmolVLMOutput:
    """What a forward returns."""

    logits: torch.Tensor  # (B, T, V), (B, logits_to_keep, V), or (N, V) at the N positions of `logits_mask`
    image_features: torch.Tensor | None = None  # (n_tiles, tokens_per_tile, D) spliced into this forward


def patch_mask_from_pixels(pixel_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Pixel mask (N, H, W) -> patch mask (N, H/p, W/p): a patch is real when any of its pixels is."""
    N, H, W = pixel_mask.shape
    h, w = H // patch_size, W // patch_size
    blocks = pixel_mask[:, : h * patch_size, : w * patch_size].reshape(N, h, patch_size, w, patch_size)
    return blocks.any(dim=4).any(dim=2)  # (N, h, w)


class SmolVLM(nn.Module):
    """vision_model + connector + text_model (TextDecoder) + lm_head."""

    def __init__(self, config: SmolVLMConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config.vision)
        self.connector = Connector(config)
        self.text_model = TextDecoder(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head with the token embedding when the (top-level) config says so, as transformers does."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.text_model.embed_tokens.weight

    @staticmethod
    def flat_tiles(pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tiles (B, max_tiles, 3, H, W) or (N, 3, H, W) as (N, 3, H, W), and their pixel mask as (N, H, W);
        ImageError when the shapes do not fit."""
        if pixel_values.dim() not in (4, 5):
            raise ImageError(
                f"pixel_values must be (batch, tiles, 3, H, W) or (tiles, 3, H, W), got {tuple(pixel_values.shape)}"
            )
        tiles = pixel_values.reshape(-1, *pixel_values.shape[-3:])  # (N, 3, H, W)
        if pixel_attention_mask is None:
            return tiles, None
        if pixel_attention_mask.shape[:-2] != pixel_values.shape[:-3]:
            raise ImageError(
                f"pixel_attention_mask {tuple(pixel_attention_mask.shape)} does not match pixel_values "
                f"{tuple(pixel_values.shape)}"
            )
        return tiles, pixel_attention_mask.reshape(-1, *pixel_attention_mask.shape[-2:])  # (N, H, W)

    def encode_images(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tiles (B, max_tiles, 3, H, W) or (N, 3, H, W) -> image tokens (n_real_tiles, tokens_per_tile, D).

        All-zero tiles are batch padding and are dropped; `pixel_attention_mask` ((B, max_tiles, H, W) or
        (N, H, W), True = real pixel) marks the real extent of padded tiles.
        """
        tiles, pixel_mask = self.flat_tiles(pixel_values, pixel_attention_mask)
        real = tiles.flatten(1).ne(0).any(dim=1)  # (N,) all-zero tiles are padding
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        if not bool(real.any()):  # only padding (e.g. one chunk of a batch's tiles)
            return tiles.new_zeros(0, self.config.tokens_per_tile, self.config.text.hidden_size, dtype=dtype)
        tiles = tiles[real].to(dtype)
        patch_mask = None
        if pixel_mask is not None:
            patch_mask = patch_mask_from_pixels(pixel_mask[real].bool(), self.config.vision.patch_size)
        return self.connector(self.vision_model(tiles, patch_mask))  # (n_real, tokens_per_tile, D)

    def check_image_tokens(self, n_tokens: int, n_features: int) -> None:
        """PromptError unless the prompt's `<image>` tokens and the images' feature vectors are as many."""
        if n_tokens != n_features:
            raise PromptError(
                f"input_ids hold {n_tokens} image tokens (id {self.config.image_token_id}) but the images give "
                f"{n_features} feature vectors ({self.config.tokens_per_tile} per tile); expand each image "
                "marker into one token run per tile, as the processor does"
            )

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, D) with image features written over the `<image>` positions, in order."""
        embeds = self.text_model.embed_tokens(input_ids)  # (B, T, D)
        if image_features is None:
            return embeds
        is_image = input_ids == self.config.image_token_id  # (B, T)
        features = image_features.reshape(-1, embeds.shape[-1])  # (n_tiles * tokens_per_tile, D)
        self.check_image_tokens(int(is_image.sum()), features.shape[0])
        embeds = embeds.clone()
        embeds[is_image] = features.to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        logits_mask: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> SmolVLMOutput:
        """input_ids (B, T) [+ pixel_values or precomputed image_features] -> SmolVLMOutput with logits (B, T, V).

        `attention_mask` is (B, cached + T), 1 = attend. With `logits_to_keep=n > 0` only the last n positions get
        logits (prefill for generation needs one); with `logits_mask` ((B, T) bool) only the masked positions do,
        flattened to (N, V) (training needs logits only where there is a label). `cache_position` selects
        static-shape decoding (see TextDecoder.forward).
        """
        if pixel_values is not None and image_features is not None:
            raise PromptError("pass either pixel_values or image_features, not both")
        if pixel_values is not None:
            image_features = self.encode_images(pixel_values, pixel_attention_mask)
        embeds = self.embed(input_ids, image_features)
        hidden = self.text_model(embeds, attention_mask, position_ids, cache, cache_position)  # (B, T, D)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        if logits_mask is not None:
            hidden = hidden[logits_mask]  # (N, D)
        return SmolVLMOutput(logits=self.lm_head(hidden), image_features=image_features)

    @classmethod
    def from_pretrained(
        cls, path_or_name: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "SmolVLM":
        """Load a Hugging Face SmolVLM / Idefics3 folder (local path or hub id) with safetensors weights."""
        from smolvlm.weights.checkpoint import load_smolvlm

        return load_smolvlm(path_or_name, device=device, dtype=dtype)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors that transformers' SmolVLMForConditionalGeneration loads."""
        from smolvlm.weights.checkpoint import save_smolvlm

        save_smolvlm(self, directory)
