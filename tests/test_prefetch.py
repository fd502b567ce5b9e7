"""Batches built ahead: the same items in the same order from the background thread and from worker processes."""

from __future__ import annotations

import os

import pytest
import torch

from smolvlm.train.prefetch import prefetched


def build(step: int) -> dict:
    return {"step": step, "values": torch.arange(3) * step, "pid": os.getpid()}


@pytest.mark.parametrize("workers", [0, 2])
def test_items_arrive_in_step_order(workers):
    items = list(prefetched(build, range(3, 9), workers))
    assert [item["step"] for item in items] == list(range(3, 9))
    assert all(torch.equal(item["values"], torch.arange(3) * item["step"]) for item in items)
    assert all((item["pid"] == os.getpid()) == (workers == 0) for item in items)


def test_no_steps_and_bad_worker_counts():
    assert list(prefetched(build, range(0), 2)) == []
    with pytest.raises(ValueError, match="data workers"):
        list(prefetched(build, range(2), -1))


def fails_at_two(step: int) -> int:
    if step == 2:
        raise RuntimeError("broken sample at step 2")
    return step


@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_while_building_reaches_the_consumer(workers):
    seen = []
    with pytest.raises(RuntimeError, match="broken sample at step 2"):
        for step in prefetched(fails_at_two, range(5), workers):
            seen.append(step)
    assert seen == [0, 1]
