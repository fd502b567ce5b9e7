"""Training batches built ahead of the step that uses them, by a thread or by worker processes.

Building a batch (decoding or rendering pictures, tokenizing) is Python work that a GPU step outruns many times over:
one thread keeps up with a CPU step, a GPU needs several processes. Each batch is a pure function of its step number,
so the order and contents are the same however many workers build them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

T = TypeVar("T")


class _StepBatches(Dataset, Generic[T]):
    """Item `step` is `make(step)`; worker processes inherit `make` by fork, so it need not pickle."""

    def __init__(self, make: Callable[[int], T]) -> None:
        self.make = make

    def __getitem__(self, step: int) -> T:
        return self.make(step)


def _as_is(item: T) -> T:
    return item


def prefetched(make: Callable[[int], T], steps: Sequence[int], workers: int = 0) -> Iterator[T]:
    """`make(step)` for each of `steps`, in order, computed ahead of use: one step ahead in a background thread when
    `workers` is 0, else `workers` forked processes each two steps ahead (tensors come back in shared memory)."""
    if workers < 0:
        raise ValueError(f"data workers must be >= 0, got {workers}")
    if not steps:
        return
    if workers == 0:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="smolvlm-data") as pool:
            pending = pool.submit(make, steps[0])
            try:
                for following in [*steps[1:], None]:
                    item = pending.result()
                    if following is not None:
                        pending = pool.submit(make, following)
                    yield item
            finally:
                pending.cancel()
        return
    loader = DataLoader(_StepBatches(make), batch_size=None, sampler=list(steps), num_workers=workers,
                        collate_fn=_as_is, prefetch_factor=2, multiprocessing_context="fork",
                        worker_init_fn=_one_thread)
    yield from loader


def _one_thread(worker: int) -> None:
    # Each worker builds whole batches; torch's own intra-op threads would only fight the other workers for cores.
    torch.set_num_threads(1)
