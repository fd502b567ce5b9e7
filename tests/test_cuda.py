"""The GPU path (CUDA graphs, fused projections, bf16) against the CPU path; skipped where there is no CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers_model import image_prompt, random_tiles, randomize_, tiny_config
from smolvlm.engine.generate import Engine, GenerationConfig
from smolvlm.model import SmolVLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NEW = 24


@pytest.fixture(scope="module", params=["256M", "2.2B"])
def case(request):
    config = tiny_config(request.param)
    model = randomize_(SmolVLM(config).eval(), seed=7)
    ids = torch.stack([image_prompt(config, tiles=2, text_before=3, text_after=4, seed=s) for s in (1, 2)])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded second row
    pixels, pixel_mask = random_tiles(config, [2, 2], seed=5)
    return config, model, ids, mask, dict(pixel_values=pixels, pixel_attention_mask=pixel_mask)


def _tokens(model, config, ids, mask, vision, step_mode: str, max_new=(NEW, NEW // 2), **options
            ) -> list[list[int]]:
    engine = Engine(model, str, [config.text.vocab_size - 1], step_mode=step_mode, **options)
    configs = [GenerationConfig(max_new_tokens=n) for n in max_new]
    return [r.token_ids for r in engine.generate(ids, mask, configs, **vision)]


def _on_gpu(model, dtype):
    return copy.deepcopy(model).to("cuda", dtype)


def test_fp32_graphs_on_the_gpu_equal_the_cpu(case, monkeypatch):
    """Same arithmetic precision, so greedy tokens must be identical (TF32 off: it is a 10-bit-mantissa format)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    config, model, ids, mask, vision = case
    cpu = _tokens(model, config, ids, mask, vision, "eager")
    assert _tokens(_on_gpu(model, torch.float32), config, ids, mask, vision, "graphs") == cpu


def test_bf16_graphs_on_the_gpu_equal_the_cpu_up_to_near_ties(case):
    """bf16 (the GPU default) against the fp32 CPU path: the greedy tokens are equal, except that from a position
    where the CPU's two best logits lie within bf16 rounding of each other (twice the largest logit error measured
    at the first step) the rows may part. The first-step logits are within 2% (relative norm) of the CPU's."""
    config, model, ids, mask, vision = case
    gpu_model = _on_gpu(model, torch.bfloat16)
    with torch.inference_mode():
        ref = model(ids, mask, **vision).logits[:, -1]
        got = gpu_model(ids.cuda(), mask.cuda(), **{k: v.cuda() for k, v in vision.items()}).logits[:, -1]
    got = got.float().cpu()
    assert (got - ref).norm() / ref.norm() < 0.02
    tolerance = 2 * (got - ref).abs().max().item()
    cpu = _tokens(model, config, ids, mask, vision, "eager", max_new=(NEW, NEW))
    gpu = _tokens(gpu_model, config, ids, mask, vision, "graphs", max_new=(NEW, NEW))
    # The CPU's logits along its own greedy path: where could bf16 rounding pick another token?
    full = torch.cat([ids, torch.tensor(cpu)], dim=1)
    with torch.inference_mode():
        logits = model(full, torch.cat([mask, torch.ones(2, NEW, dtype=mask.dtype)], 1), **vision).logits
    top2 = logits[:, ids.shape[1] - 1 : -1].topk(2, dim=-1).values  # (2, NEW, 2)
    margins = top2[..., 0] - top2[..., 1]
    for row in range(2):
        parted = next((i for i, (a, b) in enumerate(zip(cpu[row], gpu[row])) if a != b), None)
        print(f"row {row}: GPU = CPU for {NEW if parted is None else parted}/{NEW} tokens")
        if parted is not None:
            assert margins[row, parted] <= tolerance, (row, parted, margins[row, parted].item(), tolerance)


def test_graph_replays_equal_eager_gpu_steps(case):
    """Replaying a captured graph gives exactly what running the same static step eagerly on the GPU gives."""
    config, model, ids, mask, vision = case
    gpu_model = _on_gpu(model, torch.float32)  # fp32: the longer (bucketed) cache may sum attention in another order
    gpu_model.text_model.fuse_projections()
    eager_static = _tokens(gpu_model, config, ids, mask, vision, "static")
    assert _tokens(gpu_model, config, ids, mask, vision, "graphs") == eager_static


@pytest.mark.parametrize("decode_kernel", [True, False])
def test_slots_keep_their_graph_and_free_each_requests_cache(case, decode_kernel):
    """With the fused decode attention (the GPU default) the graph reaches the KV cache through an address table:
    each request decodes in a cache of its own, freed when it ends (memory back where it was), under the same
    graph. Without it the graph holds the cache's addresses, and the slot keeps its cache."""
    if decode_kernel:
        pytest.importorskip("triton")
    config, model, ids, mask, vision = case
    engine = Engine(_on_gpu(model, torch.float32), str, [config.text.vocab_size - 1], step_mode="graphs",
                    decode_kernel=decode_kernel)
    configs = [GenerationConfig(max_new_tokens=n) for n in (NEW, NEW // 2)]
    first = [r.token_ids for r in engine.generate(ids, mask, configs, **vision)]
    (slot,) = engine._graphs.slots.values()
    graph = slot.graph
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    second = [r.token_ids for r in engine.generate(ids, mask, configs, **vision)]
    torch.cuda.synchronize()
    assert second == first and slot.graph is graph
    assert (slot.cache is None) == decode_kernel
    assert torch.cuda.memory_allocated() == before


def test_compiled_graphs_equal_graphs(case, monkeypatch):
    config, model, ids, mask, vision = case
    if config.vision.patch_size != 16:
        pytest.skip("one family is enough for the compiled step (compiling costs seconds)")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    gpu_model = _on_gpu(model, torch.float32)
    graphs = _tokens(gpu_model, config, ids, mask, vision, "graphs")
    assert _tokens(gpu_model, config, ids, mask, vision, "compiled-graphs") == graphs


@pytest.mark.parametrize("step_mode", ["graphs", "compiled-graphs"])
def test_fused_decode_kernel_equals_graphs(case, step_mode, monkeypatch):
    """The one-kernel decode attention (Triton; on by default on a GPU) in captured (and compiled) steps gives the
    tokens of the plain step."""
    pytest.importorskip("triton")
    config, model, ids, mask, vision = case
    if step_mode == "compiled-graphs" and config.vision.patch_size != 16:
        pytest.skip("one family is enough for the compiled step")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    plain = _tokens(_on_gpu(model, torch.float32), config, ids, mask, vision, "graphs", decode_kernel=False)
    assert _tokens(_on_gpu(model, torch.float32), config, ids, mask, vision, step_mode, decode_kernel=True) == plain


@pytest.mark.parametrize("step_mode", ["graphs", "compiled-graphs"])
def test_batch_1_projection_kernels_equal_cublas(case, step_mode, monkeypatch):
    """At batch 1 the default GPU step also runs each projection as one Triton kernel (model/decode_linear.py):
    the same tokens (fp32) as the step with cuBLAS projections."""
    pytest.importorskip("triton")
    config, model, ids, mask, vision = case
    if step_mode == "compiled-graphs" and config.vision.patch_size != 16:
        pytest.skip("one family is enough for the compiled step")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    one = ids[:1], mask[:1], {k: v[:1] for k, v in vision.items()}
    gpu_model = _on_gpu(model, torch.float32)
    cublas = _tokens(gpu_model, config, *one, step_mode, max_new=(NEW,), decode_linear=False)
    assert _tokens(gpu_model, config, *one, step_mode, max_new=(NEW,)) == cublas
    assert gpu_model.text_model.linear_kernels and gpu_model.text_model.layers[0].linears_fused()


def test_weights_load_into_one_allocation(case, tmp_path):
    """A GPU load packs every weight into one block (no per-tensor allocator slack); fusing keeps it one block."""
    _, model, *_ = case
    model.save_pretrained(tmp_path)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    gpu_model = SmolVLM.from_pretrained(tmp_path, device="cuda")
    weight_bytes = sum(p.nbytes for p in gpu_model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in gpu_model.parameters()}) == 1
    assert torch.cuda.memory_allocated() - before <= weight_bytes + 2**20
    Engine(gpu_model, str, [0], step_mode="graphs")  # fuses q/k/v and gate/up
    assert len({p.untyped_storage().data_ptr() for p in gpu_model.parameters()}) == 1
