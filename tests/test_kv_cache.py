"""The static KV cache: bookkeeping, and decoding through it equals a full forward (no transformers needed)."""

from __future__ import annotations

import pytest
import torch

from smolvlm.engine.kv_cache import KVCache
from smolvlm.errors import GenerationError
from smolvlm.model import CausalLM
from tests.helpers_model import left_pad, randomize_, tiny_config


@pytest.fixture(scope="module")
def lm() -> CausalLM:
    """A tiny GQA text model (256M family) with random weights."""
    torch.manual_seed(0)
    return randomize_(CausalLM(tiny_config("256M").text), seed=1).eval()


def test_update_advance_crop_reset():
    cache = KVCache(num_layers=2, batch_size=2, num_kv_heads=3, head_dim=4, max_len=6)
    k1, v1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    keys, values = cache.update(0, k1, v1)
    assert keys.shape == (2, 3, 4, 4) and torch.equal(keys, k1) and torch.equal(values, v1)
    assert keys.data_ptr() == cache.keys[0].data_ptr()  # a view of the buffer, not a copy
    assert cache.length == 0  # nothing is committed until the forward advances
    cache.update(1, k1, v1)
    cache.advance(4)
    k2 = torch.randn(2, 3, 1, 4)
    keys, _ = cache.update(0, k2, k2)
    assert keys.shape == (2, 3, 5, 4) and torch.equal(keys[:, :, :4], k1) and torch.equal(keys[:, :, 4:], k2)
    cache.advance(1)
    with pytest.raises(GenerationError, match="KV cache is full"):
        cache.update(0, torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4))
    cache.crop(2)
    assert cache.length == 2
    with pytest.raises(GenerationError):
        cache.crop(3)
    cache.reset()
    assert cache.length == 0 and cache.max_len == 6


def test_for_config_and_select():
    config = tiny_config("256M").text
    cache = KVCache.for_config(config, batch_size=3, max_len=5)
    assert len(cache.keys) == config.num_hidden_layers
    assert cache.keys[0].shape == (3, config.num_key_value_heads, 5, config.head_dim)
    k = torch.arange(3.0)[:, None, None, None].expand(3, config.num_key_value_heads, 2, config.head_dim)
    for layer in range(config.num_hidden_layers):
        cache.update(layer, k, k)
    cache.advance(2)
    cache.select([2, 0])
    assert cache.batch_size == 2 and cache.length == 2
    assert cache.keys[1][:, 0, 0, 0].tolist() == [2.0, 0.0]
    with pytest.raises(GenerationError):
        cache.select([])


def test_row_views_and_the_address_table():
    cache = KVCache(num_layers=3, batch_size=4, num_kv_heads=2, head_dim=4, max_len=5)
    view = cache.rows(1, 3)
    view.update(2, torch.ones(2, 2, 3, 4), torch.ones(2, 2, 3, 4))  # writes land in rows 1..2 of the buffers
    assert cache.keys[2][:, 0, 0, 0].tolist() == [0.0, 1.0, 1.0, 0.0] and view.pointers is None
    with pytest.raises(GenerationError):
        cache.rows(3, 5)
    table = torch.full((2, 3), -1, dtype=torch.int64)
    assert cache.bind_pointers(table) is table and cache.pointers is table
    assert (table * 16).tolist() == [[k.data_ptr() for k in cache.keys], [v.data_ptr() for v in cache.values]]
    assert len({k.untyped_storage().data_ptr() for k in cache.keys + cache.values}) == 1  # one allocation
    cache.select([0, 2])  # new buffers: the table no longer describes them
    assert cache.pointers is None
    assert cache.bind_pointers()[0, 1].item() * 16 == cache.keys[1].data_ptr()
    cache.keys[0] = torch.zeros(2 * 2 * 5 * 4 + 1)[1:].view(2, 2, 5, 4)  # starts 4 bytes into its storage
    with pytest.raises(GenerationError, match="16-byte"):
        cache.bind_pointers()


def test_decode_step_by_step_equals_full_forward(lm):
    """Left-padded batch: prefill, then one token at a time, then a chunk of three (chunked prefill)."""
    ids, mask = left_pad([torch.randint(0, 300, (14,)), torch.randint(0, 300, (9,))])
    with torch.no_grad():
        full = lm(ids, attention_mask=mask)
        cache = KVCache.for_config(lm.config, batch_size=2, max_len=ids.shape[1])
        pieces = [lm(ids[:, :6], attention_mask=mask[:, :6], cache=cache)]
        for t in range(6, 11):
            pieces.append(lm(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache))
        pieces.append(lm(ids[:, 11:], attention_mask=mask, cache=cache))
    stepped = torch.cat(pieces, dim=1)
    real = mask.bool()
    assert torch.isfinite(stepped).all()
    assert (stepped[real] - full[real]).abs().max().item() <= 1e-4


def test_decode_without_mask_and_logits_to_keep(lm):
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        full = lm(ids)
        cache = KVCache.for_config(lm.config, batch_size=1, max_len=10)
        last = lm(ids[:, :7], cache=cache, logits_to_keep=1)
        assert last.shape == (1, 1, lm.config.vocab_size)
        steps = [lm(ids[:, 7:9], cache=cache), lm(ids[:, 9:10], cache=cache)]  # a chunk, then one token
        with pytest.raises(GenerationError, match=r"attention_mask has shape \(1, 1\), expected .* \(1, 11\)"):
            lm(ids[:, :1], attention_mask=torch.ones(1, 1, dtype=torch.long), cache=cache)
    assert (last[0, 0] - full[0, 6]).abs().max().item() <= 1e-4
    assert (torch.cat(steps, 1) - full[:, 7:]).abs().max().item() <= 1e-4


def test_dropping_a_finished_row(lm):
    """After select() keeps one row, decoding it continues exactly as if it had run alone."""
    long, short = torch.randint(0, 300, (8,)), torch.randint(0, 300, (5,))
    ids, mask = left_pad([long, short])
    extra = torch.randint(0, 300, (2, 3))
    with torch.no_grad():
        cache = KVCache.for_config(lm.config, batch_size=2, max_len=12)
        lm(ids, attention_mask=mask, cache=cache)
        cache.select([1])
        kept_mask = mask[1:]
        outs = []
        for t in range(3):
            kept_mask = torch.cat([kept_mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
            outs.append(lm(extra[1:, t : t + 1], attention_mask=kept_mask, cache=cache))
        alone = lm(torch.cat([short, extra[1]])[None])
    assert (torch.cat(outs, 1)[0] - alone[0, -3:]).abs().max().item() <= 1e-4
