import pytest
import torch

from smolvlm.engine.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample_next
from smolvlm.errors import GenerationError


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    params = [SamplingParams(), SamplingParams()]
    assert sample_next(logits, params, [None, None]).tolist() == [1, 0]


def test_top_k_and_top_p_mask_the_tail():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [False, False, True, True]
    # top_p 0.8: 0.5 + 0.3 reaches it; the rest go
    assert torch.isinf(filter_logits(logits, 0, 0.8)).tolist() == [False, False, True, True]
    # top_p tiny keeps the single best token
    assert torch.isinf(filter_logits(logits, 0, 1e-6)).tolist() == [False, True, True, True]


def test_repetition_penalty_matches_transformers_rule():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_seeded_sampling_is_reproducible_and_respects_filters():
    logits = torch.randn(1, 50)
    p = SamplingParams(temperature=1.0, top_k=5, seed=7)
    a = [sample_next(logits, [p], [g]).item() for g in [p.make_generator()] for _ in range(20)]
    g = p.make_generator()
    b = [sample_next(logits, [p], [g]).item() for _ in range(20)]
    assert a == b
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    assert set(a) <= allowed and len(set(a)) > 1


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5),
                                    dict(repetition_penalty=0)])
def test_bad_params_raise(kwargs):
    with pytest.raises(GenerationError):
        SamplingParams(**kwargs)
