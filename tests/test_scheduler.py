"""Continuous batching: answers through the scheduler equal VLM.generate's, whenever a request joins the batch."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import write_tiny_checkpoint
from smolvlm.api import load
from smolvlm.engine.kv_cache import KVCache
from smolvlm.errors import PromptError
from smolvlm.processing import Batch
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


def run_joining_mid_flight(scheduler: Scheduler, batches: list, configs: list) -> list:
    """Submit the first prompt; the others are submitted from its first update, so they join a running batch."""
    first_updates: queue.Queue = queue.Queue()
    others: list = []

    def on_first_update(update) -> None:  # runs on the worker thread, between two steps
        if not others:
            others.extend(scheduler.submit(b.input_ids, b.attention_mask, c, b.pixel_values, b.pixel_attention_mask)
                          for b, c in zip(batches[1:], configs[1:]))  # fmt: skip
        first_updates.put(update)

    b = batches[0]
    scheduler.submit(b.input_ids, b.attention_mask, configs[0], b.pixel_values, b.pixel_attention_mask,
                     sink=on_first_update)  # fmt: skip
    while (update := first_updates.get(timeout=60)).result is None:
        assert update.error is None, update.error
    return [update.result] + [h.result(60) for h in others]


def test_greedy_equals_generate_including_mid_flight_admission(vlm):
    expected = [vlm.generate(c, max_new_tokens=20, return_result=True) for c in CONVERSATIONS]
    assert expected[0].completion_tokens > 1  # the first request is still running when the others arrive
    batches = [vlm.prepare([c]) for c in CONVERSATIONS]
    with Scheduler(vlm.engine, max_batch_size=8) as scheduler:
        results = run_joining_mid_flight(scheduler, batches, [vlm.config_for({"max_new_tokens": 20})] * 4)
        assert scheduler.max_running == 4
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
    batch = vlm.prepare([CONVERSATIONS[0]])
    long_updates: queue.Queue = queue.Queue()

    def cancel_at_first_update(update) -> None:  # on the worker thread: the cancel lands between two steps
        long.cancel()
        long_updates.put(update)

    long = scheduler.submit(batch.input_ids, batch.attention_mask, vlm.config_for({"max_new_tokens": 500}),
                            batch.pixel_values, batch.pixel_attention_mask, sink=cancel_at_first_update)  # fmt: skip
    short = vlm.prepare([CONVERSATIONS[1]])
    timed = scheduler.submit(short.input_ids, short.attention_mask, vlm.config_for({}), timeout=0.0)
    with pytest.raises(QueueFullError):
        scheduler.submit(short.input_ids, short.attention_mask, vlm.config_for({}))
    with scheduler:
        with pytest.raises(RequestTimeoutError):
            timed.result(60)
        updates = [long_updates.get(timeout=60)]
        while not updates[-1].final:
            updates.append(long_updates.get(timeout=60))
        assert isinstance(updates[-1].error, CancelledError) and len(updates) <= 3
        # the slot is free: a new request is served alone
        after = _submit(scheduler, vlm, CONVERSATIONS[1], max_new_tokens=4).result(60)
        assert after.text == vlm.generate(CONVERSATIONS[1], max_new_tokens=4)
        assert scheduler.stats()["running"] == 0


def test_text_only_causal_lm_rows_joining_mid_flight():
    from smolvlm.config import TextConfig
    from smolvlm.engine.generate import Engine, GenerationConfig
    from smolvlm.model.text import CausalLM

    config = TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    model = CausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    engine = Engine(model, lambda ids: "".join(f"<{i}>" for i in ids), [96])
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=gen) for n in (3, 17, 8)]
    configs = [GenerationConfig(max_new_tokens=n) for n in (30, 12, 20)]
    expected = [engine.generate(p[None], torch.ones(1, len(p), dtype=torch.long), [c])[0] for p, c in zip(prompts, configs)]
    assert expected[0].completion_tokens > 1
    batches = [Batch(p[None], torch.ones(1, len(p), dtype=torch.long)) for p in prompts]
    with Scheduler(engine) as scheduler:
        results = run_joining_mid_flight(scheduler, batches, configs)
        assert scheduler.max_running == 3
    assert [r.token_ids for r in results] == [e.token_ids for e in expected]
    assert [r.text for r in results] == [e.text for e in expected]


def test_a_failing_prefill_fails_only_its_request(vlm):
    good = vlm.prepare([CONVERSATIONS[1]])
    bad = vlm.prepare([_conversation("mismatched", _image(4))])
    bad.pixel_values = torch.cat([bad.pixel_values, bad.pixel_values], dim=1)  # twice the tiles the prompt holds
    bad.pixel_attention_mask = torch.cat([bad.pixel_attention_mask, bad.pixel_attention_mask], dim=1)
    handles = []

    def submit_bad(update) -> None:
        if not handles:
            handles.append(scheduler.submit(bad.input_ids, bad.attention_mask, vlm.config_for({}), bad.pixel_values,
                                            bad.pixel_attention_mask))  # fmt: skip
        good_updates.put(update)

    good_updates: queue.Queue = queue.Queue()
    with Scheduler(vlm.engine) as scheduler:
        scheduler.submit(good.input_ids, good.attention_mask, vlm.config_for({"max_new_tokens": 12}),
                         sink=submit_bad)  # fmt: skip
        while (update := good_updates.get(timeout=60)).result is None:
            assert update.error is None
        with pytest.raises(PromptError, match="image tokens"):
            handles[0].result(60)
    assert update.result.text == vlm.generate(CONVERSATIONS[1], max_new_tokens=12)
