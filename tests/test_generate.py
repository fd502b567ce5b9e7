"""The engine: greedy generation token-identical to transformers' generate; batching, stopping, streaming."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers_model import hf_smolvlm, image_prompt, left_pad, ours_from_hf, random_tiles, tiny_config
from smolvlm.engine import generate, graphs
from smolvlm.engine.generate import Engine, GenerationConfig
from smolvlm.errors import GenerationError, ImageError, PromptError

NEW = 12


@pytest.fixture(scope="module", params=["256M", "2.2B"])
def pair(request):
    config = tiny_config(request.param)
    hf = hf_smolvlm(config, seed=3)
    return config, hf, ours_from_hf(hf, config)


def _eos(config) -> int:
    return config.text.vocab_size - 1


def _reference(hf, config, input_ids, attention_mask, **vision) -> list[list[int]]:
    with torch.inference_mode():
        out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW, do_sample=False,
                          eos_token_id=_eos(config), pad_token_id=0, **vision)
    rows = out[:, input_ids.shape[1]:].tolist()
    return [row[: row.index(_eos(config))] if _eos(config) in row else row for row in rows]


def _ours(model, config, input_ids, attention_mask, **vision) -> list[list[int]]:
    engine = Engine(model, lambda ids: " ".join(map(str, ids)), [_eos(config)])
    configs = [GenerationConfig(max_new_tokens=NEW)] * input_ids.shape[0]
    return [r.token_ids for r in engine.generate(input_ids, attention_mask, configs, **vision)]


def test_text_only_greedy_matches_transformers(pair):
    config, hf, ours = pair
    ids = torch.randint(1, config.image_token_id - 1, (1, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    assert _ours(ours, config, ids, mask) == _reference(hf, config, ids, mask)


def test_multi_image_greedy_matches_transformers(pair):
    config, hf, ours = pair
    ids = image_prompt(config, tiles=3, text_before=4, text_after=5, seed=1)[None]
    pixels, pixel_mask = random_tiles(config, [3], seed=2)
    vision = dict(pixel_values=pixels, pixel_attention_mask=pixel_mask)
    mask = torch.ones_like(ids)
    assert _ours(ours, config, ids, mask, **vision) == _reference(hf, config, ids, mask, **vision)


@pytest.mark.parametrize("chunk", [1, 2])
def test_vision_in_chunks_with_padding_tiles_matches_transformers(pair, chunk, monkeypatch):
    config, hf, ours = pair
    ids, mask = left_pad([image_prompt(config, tiles=n, text_before=2, text_after=3, seed=n) for n in (3, 1)])
    pixels, pixel_mask = random_tiles(config, [3, 1], seed=4)  # row 2: two all-zero padding tiles
    vision = dict(pixel_values=pixels, pixel_attention_mask=pixel_mask)
    monkeypatch.setattr(generate, "VISION_CHUNK", chunk)  # chunks of real and padding tiles, split unevenly
    assert _ours(ours, config, ids, mask, **vision) == _reference(hf, config, ids, mask, **vision)


@pytest.mark.parametrize("rows_per_forward", [1, 2])
def test_prefill_in_row_chunks_matches_transformers(pair, rows_per_forward, monkeypatch):
    """Rows prefilled a few at a time (each chunk with its own rows' image tokens) into one cache."""
    config, hf, ours = pair
    prompts = [image_prompt(config, tiles=n, text_before=2, text_after=3, seed=n) for n in (3, 1, 2)]
    ids, mask = left_pad(prompts)
    pixels, pixel_mask = random_tiles(config, [3, 1, 2], seed=4)
    vision = dict(pixel_values=pixels, pixel_attention_mask=pixel_mask)
    monkeypatch.setattr(generate, "PREFILL_CHUNK_TOKENS", rows_per_forward * ids.shape[1])
    assert _ours(ours, config, ids, mask, **vision) == _reference(hf, config, ids, mask, **vision)
    # Image tokens and features that do not match are an error whichever chunk they fall in.
    bad = ids.clone()
    bad[2, (bad[2] == config.image_token_id).nonzero()[0]] = 1  # the last row loses one image token
    with pytest.raises(PromptError, match="image tokens"):
        _ours(ours, config, bad, mask, **vision)


def test_padded_batch_greedy_matches_transformers(pair):
    config, hf, ours = pair
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, config.image_token_id - 1, (n,), generator=gen) for n in (4, 11, 7)]
    ids, mask = left_pad(rows)
    assert _ours(ours, config, ids, mask) == _reference(hf, config, ids, mask)


def test_batched_rows_equal_single_runs(pair):
    config, _, ours = pair
    gen = torch.Generator().manual_seed(9)
    rows = [torch.randint(1, config.image_token_id - 1, (n,), generator=gen) for n in (3, 8)]
    ids, mask = left_pad(rows)
    batched = _ours(ours, config, ids, mask)
    singles = [_ours(ours, config, r[None], torch.ones(1, len(r), dtype=torch.long))[0] for r in rows]
    assert batched == singles


def test_stop_strings_streaming_and_usage(pair):
    config, _, ours = pair
    # No end token, and one letter per token: the answer is exactly NEW letters long.
    engine = Engine(ours, lambda ids: "".join(chr(97 + i % 26) for i in ids), [])
    ids = torch.randint(1, 50, (1, 6), generator=torch.Generator().manual_seed(2))
    full = engine.generate(ids, torch.ones_like(ids), [GenerationConfig(max_new_tokens=NEW)])[0]
    assert full.finish_reason == "length" and full.prompt_tokens == 6 and len(full.text) == NEW
    stop = full.text[4:6]
    results = []
    pieces = list(engine.stream(ids, torch.ones_like(ids), [GenerationConfig(max_new_tokens=NEW, stop=[stop])],
                                results=results))
    streamed = "".join(p.text for p in pieces)
    assert streamed == full.text[: full.text.index(stop)] == results[0].text
    assert results[0].finish_reason == "stop" and stop not in streamed
    assert pieces[-1].finish_reason == "stop"


def test_bad_options_and_context_overflow(pair):
    config, _, ours = pair
    with pytest.raises(GenerationError):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(GenerationError):
        GenerationConfig(stop=["x"] * 1000)
    with pytest.raises(GenerationError, match="unknown generation option"):
        GenerationConfig().updated(max_tokens=3)
    engine = Engine(ours, str, [_eos(config)])
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(GenerationError, match="context"):
        engine.generate(ids, torch.ones_like(ids), [GenerationConfig(max_new_tokens=10**6)])
    prompt = image_prompt(config, tiles=2, text_before=2, text_after=2, seed=1)[None]
    pixels, pixel_mask = random_tiles(config, [2], seed=2)
    with pytest.raises(ImageError, match="pixel_values must be"):  # checked before the tiles go in chunks
        engine.generate(prompt, torch.ones_like(prompt), [GenerationConfig()], pixel_values=pixels[0, 0])
    with pytest.raises(ImageError, match="does not match pixel_values"):
        engine.generate(prompt, torch.ones_like(prompt), [GenerationConfig()], pixel_values=pixels,
                        pixel_attention_mask=pixel_mask[:, :1])


def _rows_with_modes(model, config, ids, mask, max_new: list[int], step_mode: str, **vision) -> list[list[int]]:
    engine = Engine(model, lambda t: " ".join(map(str, t)), [_eos(config)], step_mode=step_mode)
    configs = [GenerationConfig(max_new_tokens=n) for n in max_new]
    return [r.token_ids for r in engine.generate(ids, mask, configs, **vision)]


def test_static_steps_equal_eager_steps_as_rows_leave(pair):
    config, _, ours = pair
    gen = torch.Generator().manual_seed(11)
    rows = [torch.randint(1, config.image_token_id - 1, (n,), generator=gen) for n in (4, 11, 7)]
    ids, mask = left_pad(rows)
    max_new = [5, NEW, 8]  # rows leave the batch (and the cache) at different steps
    eager = _rows_with_modes(ours, config, ids, mask, max_new, "eager")
    assert [len(r) for r in eager] == max_new
    assert _rows_with_modes(ours, config, ids, mask, max_new, "static") == eager


def test_graph_slots_equal_eager_steps_as_rows_leave(pair, monkeypatch):
    """The CUDA-graph path's slots and fused projections (run eagerly on the CPU) decode as eager steps do."""
    config, _, ours = pair
    gen = torch.Generator().manual_seed(12)
    rows = [torch.randint(1, config.image_token_id - 1, (n,), generator=gen) for n in (4, 11, 7)]
    ids, mask = left_pad(rows)
    max_new = [5, NEW, 8]
    eager = _rows_with_modes(ours, config, ids, mask, max_new, "eager")
    model = copy.deepcopy(ours)
    engine = Engine(model, str, [_eos(config)], step_mode="graphs")
    configs = [GenerationConfig(max_new_tokens=n) for n in max_new]
    assert [r.token_ids for r in engine.generate(ids, mask, configs)] == eager
    # The slot (batch bucket 4, one padding row) is reused by the next request and gives the same answers.
    assert [r.token_ids for r in engine.generate(ids, mask, configs)] == eager
    assert list(engine._graphs.slots) == [(4, graphs.length_bucket(ids.shape[1] + NEW))]
    # Off a GPU the slot keeps no cache between requests: each request's is allocated when it starts.
    assert next(iter(engine._graphs.slots.values())).cache is None
    # A second stream while the first is suspended gets a slot of its own instead of overwriting the first's cache.
    first = engine.stream(ids, mask, configs)
    next(first)
    second = engine.generate(ids[:2], mask[:2], configs[:2])
    assert [r.token_ids for r in second] == eager[:2]
    results = []
    list(engine.stream(ids, mask, configs, results=results))
    first.close()
    assert not any(slot.busy for slot in engine._graphs.slots.values())
    # A batch larger than the largest captured size decodes the same static step outside the slots.
    slots = list(engine._graphs.slots)
    monkeypatch.setattr(generate, "BATCH_BUCKETS", (1, 2))
    assert [r.token_ids for r in engine.generate(ids, mask, configs)] == eager
    assert list(engine._graphs.slots) == slots  # no slot made for it


@pytest.mark.parametrize("lookahead", [False, True])
def test_graph_slots_sample_as_eager_steps_do(pair, lookahead):
    """A decode slot's step leaves its greedy picks as the next input: rows that sample or penalise repeats must
    have the host's picks replace them, and a greedy row beside them still decodes its eager tokens."""
    config, _, ours = pair
    gen = torch.Generator().manual_seed(14)
    ids, mask = left_pad([torch.randint(1, config.image_token_id - 1, (n,), generator=gen) for n in (4, 11, 7)])
    configs = [GenerationConfig(max_new_tokens=NEW, temperature=0.9, seed=3),
               GenerationConfig(max_new_tokens=NEW, repetition_penalty=1.5), GenerationConfig(max_new_tokens=8)]
    runs = []
    for step_mode in ("eager", "graphs"):
        engine = Engine(copy.deepcopy(ours), str, [_eos(config)], step_mode=step_mode)
        engine.lookahead = lookahead
        runs.append([r.token_ids for r in engine.generate(ids, mask, configs)])
    assert runs[1] == runs[0]
    assert runs[0][0] != _rows_with_modes(ours, config, ids, mask, [NEW, NEW, 8], "eager")[0]  # it did sample


@pytest.mark.parametrize("step_mode", ["eager", "graphs"])
def test_lookahead_steps_stream_the_same_pieces(pair, step_mode):
    """Queuing step t+1 before reading step t's tokens (the GPU default) changes nothing a caller sees: the same
    pieces in the same order, rows that stop on a string or on length, a cache that holds the wasted last step."""
    config, _, ours = pair
    gen = torch.Generator().manual_seed(13)
    ids, mask = left_pad([torch.randint(1, config.image_token_id - 1, (n,), generator=gen) for n in (4, 11, 7)])
    configs = [GenerationConfig(max_new_tokens=n) for n in (5, NEW, 8)]
    plain = _rows_with_modes(ours, config, ids, mask, [5, NEW, 8], "eager")
    configs[1] = GenerationConfig(max_new_tokens=NEW, stop=[" ".join(map(str, plain[1][3:5]))])
    streams = []
    for lookahead in (False, True):
        engine = Engine(copy.deepcopy(ours), lambda t: " ".join(map(str, t)) + " ", [_eos(config)],
                        step_mode=step_mode)
        engine.lookahead = lookahead
        results = []
        pieces = [(p.row, p.text, p.finish_reason) for p in engine.stream(ids, mask, configs, results=results)]
        streams.append((pieces, [(r.token_ids, r.finish_reason) for r in results]))
    assert streams[0] == streams[1]
    assert streams[1][1][1][1] == "stop" and [r[1] for r in streams[1][1]] == ["length", "stop", "length"]


def test_fused_projections_keep_the_logits(pair):
    config, _, ours = pair
    model = copy.deepcopy(ours)
    model.text_model.fuse_projections()
    ids = torch.randint(1, config.image_token_id - 1, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    layer = model.text_model.layers[0]
    assert layer.self_attn.q_proj.weight.data_ptr() == layer.self_attn.fused[0].data_ptr()  # views, no copy
    assert set(model.state_dict()) == set(ours.state_dict())
    model.to(torch.float64)  # moving re-fuses from the moved weights
    assert layer.mlp.fused[0].dtype == torch.float64
    assert layer.mlp.up_proj.weight.data_ptr() == layer.mlp.fused[0][config.text.intermediate_size :].data_ptr()
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits.float(), ours(ids).logits, rtol=1e-4, atol=1e-4)


def test_compiled_steps_equal_eager_steps(pair):
    config, _, ours = pair
    if config.vision.patch_size != 16:
        pytest.skip("one family is enough for the compiled step (compiling costs seconds)")
    ids = image_prompt(config, tiles=2, text_before=3, text_after=4, seed=4)[None].repeat(2, 1)
    pixels, pixel_mask = random_tiles(config, [2, 2], seed=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded second row
    vision = dict(pixel_values=pixels, pixel_attention_mask=pixel_mask)
    eager = _rows_with_modes(ours, config, ids, mask, [NEW, NEW], "eager", **vision)
    assert _rows_with_modes(ours, config, ids, mask, [NEW, NEW], "compiled", **vision) == eager


def test_unknown_step_mode_is_refused(pair):
    config, _, ours = pair
    with pytest.raises(GenerationError, match="step_mode"):
        Engine(ours, str, [_eos(config)], step_mode="warp")
