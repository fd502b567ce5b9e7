"""Continuous batching: answers through the scheduler equal VLM.generate's, whenever a request joins the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import write_tiny_checkpoint
from smolvlm.api import load
from smolvlm.engine.kv_cache import KVCache
from smolvlm.engine.scheduler import (
    CancelledError,
    FeatureCache,
    QueueFullError,
    RequestTimeoutError,
    Scheduler,
    merge_rows,
    trim_padding,
)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return load(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), device="cpu")


def _image(seed: int, size: tuple[int, int] = (96, 70)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _conversation(text: str, *images: Image.Image) -> list[dict]:
    parts = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def _submit(scheduler: Scheduler, vlm, conversation, **options):
    batch = vlm.prepare([conversation])
    return scheduler.submit(batch.input_ids, batch.attention_mask, vlm.config_for(options), batch.pixel_values,
                            batch.pixel_attention_mask)  # fmt: skip


CONVERSATIONS = [
    _conversation("Describe the picture in detail please.", _image(1)),
    _conversation("hi"),
    _conversation("Compare these two images.", _image(2), _image(3, (50, 120))),
    _conversation("What is the capital of France and why is it famous?"),
]


def test_greedy_equals_generate_including_mid_flight_admission(vlm):
    expected = [vlm.generate(c, max_new_tokens=20, return_result=True) for c in CONVERSATIONS]
    with Scheduler(vlm.engine, max_batch_size=8) as scheduler:
        first = _submit(scheduler, vlm, CONVERSATIONS[0], max_new_tokens=20)
        updates = first.updates(timeout=60)
        next(updates)  # the first request is decoding: the others join a running batch
        others = [_submit(scheduler, vlm, c, max_new_tokens=20) for c in CONVERSATIONS[1:]]
        results = [next(u.result for u in updates if u.result is not None)] + [h.result(60) for h in others]
        assert scheduler.max_running >= 2
    for got, want in zip(results, expected):
        assert got.token_ids == want.token_ids
        assert got.text == want.text
        assert (got.finish_reason, got.prompt_tokens, got.completion_tokens) == (
            want.finish_reason, want.prompt_tokens, want.completion_tokens)  # fmt: skip


def test_seeded_sampling_and_stop_strings_per_request(vlm):
    sampled = dict(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=7)
    plain = vlm.generate(CONVERSATIONS[3], max_new_tokens=16)
    stop = plain[3:6] if len(plain) > 6 else plain[:1]
    with Scheduler(vlm.engine) as scheduler:
        handles = [
            _submit(scheduler, vlm, CONVERSATIONS[1], **sampled),
            _submit(scheduler, vlm, CONVERSATIONS[3], max_new_tokens=16, stop=[stop]),
            _submit(scheduler, vlm, CONVERSATIONS[0], **{**sampled, "seed": 8}),
        ]
        results = [h.result(60) for h in handles]
    assert results[0].text == vlm.generate(CONVERSATIONS[1], **sampled)
    assert results[1].text == vlm.generate(CONVERSATIONS[3], max_new_tokens=16, stop=[stop])
    assert stop not in results[1].text and results[1].finish_reason == "stop"
    assert results[2].text == vlm.generate(CONVERSATIONS[0], **{**sampled, "seed": 8})


def test_repeated_image_is_encoded_once(vlm):
    image = _image(11)
    with Scheduler(vlm.engine, feature_cache_tiles=64) as scheduler:
        a = _submit(scheduler, vlm, _conversation("one", image), max_new_tokens=3).result(60)
        misses = scheduler.features.misses
        assert misses > 0 and scheduler.features.hits == 0
        b = _submit(scheduler, vlm, _conversation("another question", image), max_new_tokens=3).result(60)
        assert scheduler.features.misses == misses and scheduler.features.hits == misses
    assert a.text == vlm.generate(_conversation("one", image), max_new_tokens=3)
    assert b.text == vlm.generate(_conversation("another question", image), max_new_tokens=3)


def test_feature_cache_is_lru_and_bounded():
    cache = FeatureCache(2)
    cache.put(b"a", torch.zeros(1))
    cache.put(b"b", torch.ones(1))
    assert cache.get(b"a") is not None  # "b" is now the least recently used
    cache.put(b"c", torch.ones(1))
    assert len(cache) == 2 and cache.get(b"b") is None and cache.get(b"c") is not None


def test_merge_left_pads_the_shorter_side_and_trim_drops_dead_columns():
    a, b = KVCache(1, 1, 1, 2, 3), KVCache(1, 2, 1, 2, 5)
    a.keys[0][:] = 1.0
    a.values[0][:] = 1.0
    b.keys[0][:] = 2.0
    b.values[0][:] = 2.0
    a.length, b.length = 3, 5
    merged, mask = merge_rows(a, torch.ones(1, 3, dtype=torch.long), b, torch.tensor([[0, 1, 1, 1, 1]] * 2), 4)
    assert merged.length == 5 and merged.max_len == 9 and merged.batch_size == 3
    assert mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert merged.keys[0][0, 0, :5, 0].tolist() == [0, 0, 1, 1, 1]  # padding is zero, never garbage
    merged.select([0])
    mask = trim_padding(merged, mask[[0]])
    assert mask.tolist() == [[1, 1, 1]] and merged.length == 3 and merged.max_len == 7


def test_cancel_timeout_and_full_queue(vlm):
    scheduler = Scheduler(vlm.engine, max_queue=2)
    long = _submit(scheduler, vlm, CONVERSATIONS[0], max_new_tokens=500)
    batch = vlm.prepare([CONVERSATIONS[1]])
    timed = scheduler.submit(batch.input_ids, batch.attention_mask, vlm.config_for({}), timeout=0.0)
    with pytest.raises(QueueFullError):
        scheduler.submit(batch.input_ids, batch.attention_mask, vlm.config_for({}))
    with scheduler:
        with pytest.raises(RequestTimeoutError):
            timed.result(60)
        updates = long.updates(timeout=60)
        next(updates)
        long.cancel()
        with pytest.raises(CancelledError):
            for update in updates:
                if update.error is not None:
                    raise update.error
        # the slot is free: a new request is served alone
        after = _submit(scheduler, vlm, CONVERSATIONS[1], max_new_tokens=4).result(60)
        assert after.text == vlm.generate(CONVERSATIONS[1], max_new_tokens=4)
        assert scheduler.stats()["running"] == 0
