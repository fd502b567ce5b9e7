"""Parity with transformers on random weights (fp32, max abs logits diff <= 1e-4), tiny models of each preset family."""

from __future__ import annotations

import pytest
import torch

from smolvlm.config import text_config_to_hf_dict
from smolvlm.engine.kv_cache import KVCache
from smolvlm.errors import PromptError
from smolvlm.model import CausalLM, pixel_shuffle
from smolvlm.model.vision import bucketed_position_ids
from tests.helpers_model import (
    FAMILIES,
    generate_position_ids,
    hf_smolvlm,
    image_prompt,
    left_pad,
    ours_from_hf,
    randomize_,
    random_tiles,
    tiny_config,
)

transformers = pytest.importorskip("transformers")
TOL = 1e-4


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    """(config, reference model, our model) with the same random weights."""
    config = tiny_config(request.param)
    hf = hf_smolvlm(config, seed=1)
    return config, hf, ours_from_hf(hf, config)


def both(pair, ids, mask=None, pixels=None, pixel_mask=None):
    """Logits of the reference and of ours for the same inputs; positions derived from the mask as generate() does."""
    _, hf, ours = pair
    position_ids = generate_position_ids(mask) if mask is not None else None
    with torch.no_grad():
        ref = hf(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, pixel_values=pixels,
            pixel_attention_mask=pixel_mask,
        ).logits
        got = ours(ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask).logits
    return ref, got


def max_diff(ref: torch.Tensor, got: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Max abs difference over attended positions (padding positions carry no meaning)."""
    assert ref.shape == got.shape
    assert torch.isfinite(got).all()
    if mask is not None:
        ref, got = ref[mask.bool()], got[mask.bool()]
    return (ref - got).abs().max().item()


def test_text_only(pair):
    config, _, _ = pair
    ids = image_prompt(config, tiles=0, text_before=13, text_after=0, seed=2)[None]
    assert max_diff(*both(pair, ids)) <= TOL


def test_causal_lm_matches_llama_for_causal_lm():
    config = tiny_config("256M").text
    config.tie_word_embeddings = True
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**text_config_to_hf_dict(config))).eval()
    randomize_(hf, seed=3)
    hf.tie_weights()
    ours = CausalLM(config).eval()
    assert set(ours.state_dict()) == set(hf.state_dict())
    ours.load_state_dict(hf.state_dict())
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids, mask = left_pad([torch.randint(0, 300, (11,)), torch.randint(0, 300, (6,))])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=generate_position_ids(mask)).logits
        got = ours(ids, attention_mask=mask)
    assert max_diff(ref, got, mask) <= TOL


def test_one_image_one_tile(pair):
    config, _, _ = pair
    ids = image_prompt(config, tiles=1, text_before=4, text_after=5, seed=4)[None]
    pixels, pixel_mask = random_tiles(config, [1], seed=5)
    assert max_diff(*both(pair, ids, pixels=pixels, pixel_mask=pixel_mask)) <= TOL


def test_one_image_split_into_tiles(pair):
    config, _, _ = pair
    ids = image_prompt(config, tiles=5, text_before=3, text_after=4, seed=6)[None]  # 2x2 grid + global view
    pixels, pixel_mask = random_tiles(config, [5], seed=7)
    assert max_diff(*both(pair, ids, pixels=pixels, pixel_mask=pixel_mask)) <= TOL


def test_tiles_with_partial_real_extent(pair):
    """Padded tiles: only part of each tile is real (partial patches count as real), position ids are bucketed."""
    config, _, _ = pair
    size = config.vision.image_size
    ids = image_prompt(config, tiles=3, text_before=2, text_after=3, seed=8)[None]
    pixels, pixel_mask = random_tiles(config, [3], seed=9)
    extents = [(size, size * 5 // 8), (size * 9 // 16 + 3, size), (size // 2 + 1, size // 3)]
    for tile, (h, w) in enumerate(extents):
        pixel_mask[0, tile] = False
        pixel_mask[0, tile, :h, :w] = True
        pixels[0, tile] *= pixel_mask[0, tile]
    assert max_diff(*both(pair, ids, pixels=pixels, pixel_mask=pixel_mask)) <= TOL


def test_several_images_and_padding_tiles(pair):
    config, _, _ = pair
    rows = [
        torch.cat([image_prompt(config, 3, 2, 1, seed=10), image_prompt(config, 1, 2, 2, seed=11)]),  # 2 images
        torch.cat([image_prompt(config, 1, 5, 2, seed=12), image_prompt(config, 1, 1, 6, seed=13)]),  # 2 images
    ]
    ids, mask = left_pad(rows)
    pixels, pixel_mask = random_tiles(config, [4, 2], seed=14)  # row 1 has 2 all-zero padding tiles
    ref, got = both(pair, ids, mask, pixels, pixel_mask)
    assert max_diff(ref, got, mask) <= TOL


def test_left_padded_batch(pair):
    """Left padding shifts positions: each padded row equals the same prompt run alone, and the reference."""
    config, _, ours = pair
    long = image_prompt(config, tiles=1, text_before=9, text_after=3, seed=15)
    short = image_prompt(config, tiles=1, text_before=1, text_after=2, seed=16)
    ids, mask = left_pad([long, short])
    pixels, pixel_mask = random_tiles(config, [1, 1], seed=17)
    ref, got = both(pair, ids, mask, pixels, pixel_mask)
    assert max_diff(ref, got, mask) <= TOL
    with torch.no_grad():
        alone = ours(short[None], pixel_values=pixels[1:], pixel_attention_mask=pixel_mask[1:]).logits
    assert (got[1, -len(short) :] - alone[0]).abs().max().item() <= TOL


def test_prefill_then_decode_with_cache(pair):
    """Prefill a left-padded batch with images, then decode token by token through a KVCache."""
    config, _, ours = pair
    rows = [image_prompt(config, 2, 6, 8, seed=18), image_prompt(config, 1, 3, 8, seed=19)]
    ids, mask = left_pad(rows)
    pixels, pixel_mask = random_tiles(config, [2, 1], seed=20)
    ref, full = both(pair, ids, mask, pixels, pixel_mask)
    steps = 5
    prefix = ids.shape[1] - steps
    cache = KVCache.for_config(config.text, batch_size=2, max_len=ids.shape[1])
    with torch.no_grad():
        pieces = [ours(ids[:, :prefix], mask[:, :prefix], pixels, pixel_mask, cache=cache).logits]
        for t in range(prefix, ids.shape[1]):
            pieces.append(ours(ids[:, t : t + 1], mask[:, : t + 1], cache=cache).logits)
    stepped = torch.cat(pieces, dim=1)
    assert cache.length == ids.shape[1]
    assert max_diff(full, stepped, mask) <= TOL
    assert max_diff(ref, stepped, mask) <= TOL


def test_precomputed_image_features(pair):
    config, _, ours = pair
    ids = image_prompt(config, tiles=2, text_before=3, text_after=3, seed=21)[None]
    pixels, pixel_mask = random_tiles(config, [2], seed=22)
    with torch.no_grad():
        features = ours.encode_images(pixels, pixel_mask)
        assert features.shape == (2, config.tokens_per_tile, config.text.hidden_size)
        direct = ours(ids, pixel_values=pixels, pixel_attention_mask=pixel_mask).logits
        cached = ours(ids, image_features=features).logits
        assert torch.equal(direct, cached)
        with pytest.raises(PromptError, match="image tokens"):
            ours(ids, image_features=features[:1])


def test_vision_position_ids_match_reference():
    """Bucket edges fall exactly where transformers' float32 arithmetic puts them, full and partial grids."""
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionEmbeddings

    for side, patch in ((32, 16), (27, 14), (8, 16), (9, 14)):
        vision = transformers.SmolVLMVisionConfig(hidden_size=8, image_size=side * patch, patch_size=patch)
        reference = SmolVLMVisionEmbeddings(vision)
        masks = torch.zeros(side * 2, side, side, dtype=torch.bool)
        for i in range(side):
            masks[2 * i, : i + 1, :] = True  # i+1 real rows
            masks[2 * i + 1, : side - i, : (i % side) + 1] = True
        masks[0] = True
        captured = {}
        reference.position_embedding.register_forward_hook(lambda m, args, out: captured.update(ids=args[0]))
        reference(torch.zeros(len(masks), 3, side * patch, side * patch), masks)
        assert torch.equal(bucketed_position_ids(masks, side), captured["ids"])


def test_pixel_shuffle_matches_reference():
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector

    for side, scale in ((8, 4), (9, 3), (32, 4), (27, 3)):
        x = torch.randn(2, side * side, 6)
        assert torch.equal(pixel_shuffle(x, scale), SmolVLMConnector.pixel_shuffle(None, x, scale))


def test_parity_check_detects_a_changed_weight(pair):
    """Guard against a vacuous comparison: one perturbed vision weight must show up in the logits."""
    config, hf, ours = pair
    ids = image_prompt(config, tiles=1, text_before=2, text_after=2, seed=23)[None]
    pixels, pixel_mask = random_tiles(config, [1], seed=24)
    weight = ours.vision_model.encoder.layers[-1].mlp.fc2.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] += 0.5
        try:
            diff = max_diff(*both(pair, ids, pixels=pixels, pixel_mask=pixel_mask))
        finally:
            weight.copy_(original)
    assert diff > 1e-3
