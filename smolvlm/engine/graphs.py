"""Decode steps replayed from CUDA graphs: fixed buffers per (batch bucket, cache length), captured once.

A captured step reads its inputs from, and writes its logits to, tensors that live as long as the graph. A request
borrows the slot whose batch bucket and cache length fit it: it prefills (eagerly) into the first rows of the slot's
KV cache, and every later token is one graph replay. Rows the bucket pads with, and rows that finished early, keep
decoding harmlessly in their own cache rows; nobody reads their logits. Position ids, the attention-mask column and
the cache write position advance inside the graph, and the step leaves each row's argmax as the next step's input:
greedy decoding is one replay a token, and the host copies in only tokens it sampled itself.

Where the step reaches the cache through its address table (the fused decode attention, the GPU default), the KV
cache is the request's own: allocated when the request starts (after its vision tower ran), bound to the slot's
table and freed when it ends, as a dynamic cache would be, while the graph is kept. Otherwise the graph holds the
cache's addresses and the slot keeps its cache between requests.

On the CPU the same slots run the step eagerly (no capture), which is how the bookkeeping is tested without a GPU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from smolvlm.config import TextConfig
from smolvlm.engine.kv_cache import KVCache
from smolvlm.errors import GenerationError

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Cache lengths round up to a multiple of this: requests of similar length share a graph, while at most 31 unused
# columns are allocated and attended over.
LENGTH_QUANTUM = 32
MAX_SLOTS = 4  # captured shapes kept; the least recently used goes (with its KV cache) when a new one is needed

# tokens (B, 1), mask (B, L), position_ids (B, 1), cache_position (1,), cache -> next-token logits (B, V)
StepFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, KVCache], torch.Tensor]


def batch_bucket(batch: int) -> int:
    """The captured batch size a batch of `batch` rows runs at."""
    for size in BATCH_BUCKETS:
        if batch <= size:
            return size
    raise GenerationError(f"batches of at most {BATCH_BUCKETS[-1]} rows decode through CUDA graphs, got {batch}")


def length_bucket(length: int) -> int:
    """The cache length a request needing `length` positions runs with."""
    return -(-length // LENGTH_QUANTUM) * LENGTH_QUANTUM


class DecodeSlot:
    """Static inputs, the KV cache address table, a KV cache (kept, or each request's) and (on CUDA) the captured
    graph of one decode-step shape."""

    def __init__(self, step: StepFunction, config: TextConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, pool: tuple | None = None, keeps_cache: bool = True) -> None:
        """`keeps_cache`: the cache lives as long as the slot (the step holds its addresses); else each request
        gets a new one, bound to the slot's address table (`KVCache.bind_pointers`), freed when it ends."""
        self.batch, self.max_len, self.keeps_cache = batch, max_len, keeps_cache
        self._step = step
        self._new_cache = lambda: KVCache.for_config(config, batch, max_len, dtype=dtype, device=device)
        self.busy = False  # a request is decoding in this slot
        with torch.inference_mode():
            self.cache: KVCache | None = self._new_cache()  # the capture's, then the first request's
            self.pointers = self.cache.bind_pointers()  # (2, layers) the table a captured step reads
            self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
            self.mask = torch.zeros(batch, max_len, dtype=torch.long, device=device)
            self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
            self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
            self.logits: torch.Tensor | None = None
            self.graph: torch.cuda.CUDAGraph | None = None
            if device.type == "cuda":
                self._capture(pool)

    def _forward(self) -> torch.Tensor:
        """One step on the static buffers: mark this column written, run the model, advance the positions, and
        leave each row's greedy next token in `tokens`: the next step's input unless the host writes others."""
        self.mask.index_fill_(1, self.cache_position, 1)
        logits = self._step(self.tokens, self.mask, self.position_ids, self.cache_position, self.cache)  # (B, V)
        self.position_ids.add_(1)
        self.cache_position.add_(1)
        torch.argmax(logits, dim=-1, keepdim=True, out=self.tokens)  # (B, 1), one kernel
        return logits

    def _capture(self, pool: tuple | None) -> None:
        # Warm up (cuBLAS workspaces, lazy kernels, compilation) and capture on one non-default stream: the
        # caller's (the engine runs on a stream of its own), else a new one. Each stream has its own cuBLAS
        # workspaces, so a stream per step would cost memory.
        caller = torch.cuda.current_stream()
        stream = caller if caller != torch.cuda.default_stream() else torch.cuda.Stream()
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool, stream=stream):
                self.logits = self._forward()
        caller.wait_stream(stream)

    def begin(self, attention_mask: torch.Tensor) -> KVCache:
        """Start a request whose prompt mask is (B, T): reset the step inputs; return the cache to prefill into."""
        B, T = attention_mask.shape
        if B > self.batch or T >= self.max_len:
            raise GenerationError(f"a ({B}, {T}) prompt does not fit a decode slot of ({self.batch}, {self.max_len})")
        if self.cache is None:  # the last request's cache was freed: the graph runs over a new one
            self.cache = self._new_cache()
            self.cache.bind_pointers(self.pointers)
        self.mask.zero_()
        self.mask[:B, :T] = attention_mask
        self.position_ids.zero_()
        self.position_ids[:B, 0] = attention_mask.sum(-1)  # each row's next position: its attended tokens so far
        self.cache_position.fill_(T)
        self.busy = True
        return self.cache.rows(0, B)

    def run(self) -> torch.Tensor:
        """One decode step on whatever `tokens` holds; the next-token logits (batch, V) (a static buffer on CUDA)."""
        if self.graph is None:
            self.logits = self._forward()
        else:
            self.graph.replay()
        return self.logits

    def finish(self) -> None:
        """The request is over: free its cache unless the slot keeps one, and make the slot available."""
        if not self.keeps_cache:
            self.cache = None
        self.busy = False


class GraphSession:
    """One request's decoding through a slot: which slot row each still-active row of the request occupies.

    Use it under torch.inference_mode(), as the engine does: the slot's buffers are inference tensors."""

    def __init__(self, slot: DecodeSlot, batch: int) -> None:
        self.slot = slot
        self.slot_rows = list(range(batch))  # slot row of each active row
        self.rows = torch.arange(batch, device=slot.tokens.device)  # (B',) the same, on the device

    def keep(self, kept: list[int]) -> None:
        """Only the rows at these positions (of the active rows) go on."""
        self.slot_rows = [self.slot_rows[i] for i in kept]
        self.rows = torch.tensor(self.slot_rows, device=self.rows.device)

    def feed(self, tokens: torch.Tensor) -> None:
        """Make one token per active row ((B', 1), on the device) the next step's input."""
        self.slot.tokens.index_copy_(0, self.rows, tokens)

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per active row ((B', 1), on the device); their next-token logits (B', V)."""
        self.feed(tokens)
        return self.slot.run().index_select(0, self.rows)

    def next_greedy(self) -> torch.Tensor:
        """One step on the tokens the last step left as input (its greedy picks, or those fed since); the slot's
        greedy next tokens (bucket,), a static buffer: active row i's is at `slot_rows[i]`."""
        self.slot.run()
        return self.slot.tokens.view(-1)

    def close(self) -> None:
        """Give the slot back for the next request."""
        self.slot.finish()


class GraphedDecoder:
    """The decode slots of one model, created (and on CUDA captured) on first use and then reused."""

    def __init__(self, step: StepFunction, config: TextConfig, dtype: torch.dtype, device: torch.device,
                 reads_table: Callable[[int], bool] = lambda max_len: False) -> None:
        """`reads_table(max_len)`: whether the step for caches that long reaches them only through their address
        table, so that a slot's graph can outlive each request's cache."""
        self.step, self.config, self.dtype, self.device = step, config, dtype, device
        self.reads_table = reads_table
        self.slots: OrderedDict[tuple[int, int], DecodeSlot] = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None  # graphs share one pool

    def session(self, attention_mask: torch.Tensor, max_new_tokens: int) -> tuple[GraphSession, KVCache]:
        """A session for a (B, T) prompt and the cache to prefill it into."""
        B, T = attention_mask.shape
        key = (batch_bucket(B), length_bucket(T + max_new_tokens))
        slot = self.slots.get(key)
        if slot is not None and slot.busy:  # another stream of this engine is decoding in it: use a private one
            slot = self._new_slot(*key)
        elif slot is None:
            while len(self.slots) >= MAX_SLOTS:
                self.slots.popitem(last=False)
            slot = self.slots[key] = self._new_slot(*key)
        else:
            self.slots.move_to_end(key)  # most recently used last
        cache = slot.begin(attention_mask)
        return GraphSession(slot, B), cache

    def _new_slot(self, batch: int, max_len: int) -> DecodeSlot:
        # A graph holds the addresses of the cache it was captured with unless the step reads them from the table.
        keeps_cache = self.device.type == "cuda" and not self.reads_table(max_len)
        return DecodeSlot(self.step, self.config, batch, max_len, self.dtype, self.device, self.pool, keeps_cache)
