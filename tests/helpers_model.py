"""Shared helpers for the model tests: tiny configs per preset family, random reference models, input builders."""

from __future__ import annotations

import torch

from smolvlm.config import SmolVLMConfig, TextConfig, VisionConfig
from smolvlm.model import SmolVLM
from smolvlm.weights.checkpoint import vlm_key

# Tiny models in each preset's shape family: same patch size, scale factor, head layout ratio.
FAMILIES = {
    # 256M / 500M: patch 16, scale 4, GQA 3:1 (9/3, 15/5 heads), head_dim 64 -> here 16.
    "256M": dict(
        vision=VisionConfig(64, 128, 2, 4, image_size=128, patch_size=16),
        text=TextConfig(
            vocab_size=320, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, head_dim=16, rope_theta=100000.0, max_position_embeddings=8192,
        ),
        scale_factor=4,
        image_token_id=300,
    ),
    # 2.2B: patch 14 with a tile size that is not a multiple of it (384/14), scale 3, full multi-head attention.
    "2.2B": dict(
        vision=VisionConfig(48, 96, 2, 4, image_size=130, patch_size=14),
        text=TextConfig(
            vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, head_dim=16, rope_theta=273768.0, max_position_embeddings=16384,
        ),
        scale_factor=3,
        image_token_id=290,
    ),
}


def tiny_config(family: str, tie_word_embeddings: bool = False) -> SmolVLMConfig:
    """A fresh tiny SmolVLMConfig of the given family ("256M" or "2.2B")."""
    import copy

    return SmolVLMConfig(**copy.deepcopy(FAMILIES[family]), tie_word_embeddings=tie_word_embeddings)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (norm scales near 1) so no parity check passes by symmetry."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.1 * noise)
    return model


def hf_smolvlm(config: SmolVLMConfig, seed: int = 0, attn: str = "sdpa"):
    """transformers' SmolVLMForConditionalGeneration with random weights, fp32, eval."""
    import transformers

    hf_config = transformers.SmolVLMConfig(**config.to_hf_dict())
    hf_config._attn_implementation = attn
    hf_config.vision_config._attn_implementation = attn
    hf_config.text_config._attn_implementation = attn
    model = transformers.SmolVLMForConditionalGeneration(hf_config).eval()
    randomize_(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def ours_from_hf(hf_model, config: SmolVLMConfig) -> SmolVLM:
    """Our SmolVLM holding the reference model's weights (keys mapped as the checkpoint loader maps them)."""
    model = SmolVLM(config).eval()
    state = {vlm_key(k): v for k, v in hf_model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


def image_prompt(config: SmolVLMConfig, tiles: int, text_before: int, text_after: int, seed: int) -> torch.Tensor:
    """Token ids (T,): random text, then `tiles` runs of tokens_per_tile image tokens, each after a marker."""
    gen = torch.Generator().manual_seed(seed)
    marker = config.image_token_id - 1  # stands in for <fake_token_around_image>

    def text(n: int) -> torch.Tensor:
        return torch.randint(0, config.image_token_id - 1, (n,), generator=gen)

    parts = [text(text_before)]
    for _ in range(tiles):
        parts += [torch.tensor([marker]), torch.full((config.tokens_per_tile,), config.image_token_id)]
    parts.append(text(text_after))
    return torch.cat(parts)


def left_pad(sequences: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors into (B, T) ids and a (B, T) attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return ids, mask


def random_tiles(config: SmolVLMConfig, tiles_per_row: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values (B, max_tiles, 3, S, S) in [-1, 1] with all-zero padding tiles, and the pixel mask."""
    gen = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    B, most = len(tiles_per_row), max(tiles_per_row)
    pixels = torch.zeros(B, most, 3, size, size)
    mask = torch.zeros(B, most, size, size, dtype=torch.bool)
    for row, n in enumerate(tiles_per_row):
        pixels[row, :n] = torch.rand(n, 3, size, size, generator=gen) * 2 - 1
        mask[row, :n] = True
    return pixels, mask


def generate_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate() derives them from a (left-padded) attention mask."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
