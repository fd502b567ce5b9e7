"""Continuous batching: one worker thread owns the model and admits new requests into the running decode batch.

Each loop of the worker:
  1. drops rows whose client cancelled or whose deadline passed;
  2. admits waiting requests (up to `max_batch_size` rows and `max_prefill_tokens` prompt tokens per step): their
     prompts are left-padded into one prefill batch with its own small KV cache, their first tokens are sampled, and
     the new cache rows are merged into the running cache;
  3. runs one decode step for every running row.

Merging KV rows: the KVCache keeps one write position shared by all rows, so the shorter side (running batch or
new batch) is left-padded with masked, zeroed columns up to the longer one. Position ids come from the attention
mask's cumulative sum, so padding never shifts a row's positions and a merged row decodes exactly as it would alone.
Leading columns that no remaining row attends to are trimmed when rows leave.

Vision features are cached per tile (keyed by a hash of the tile's pixels and mask, LRU, bounded), so an image sent
again — in any conversation — is not encoded again.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from smolvlm.engine.generate import Engine, GenerationConfig, GenerationResult, RowState
from smolvlm.engine.kv_cache import KVCache
from smolvlm.engine.sampling import sample_next
from smolvlm.errors import GenerationError


class QueueFullError(GenerationError):
    """The scheduler's waiting queue is full; retry later."""


class RequestTimeoutError(GenerationError):
    """A request ran past its deadline and was stopped."""


class CancelledError(GenerationError):
    """A request was cancelled by its client."""


@dataclass
class Update:
    """What the worker tells a request: a text piece, and at the end a result or an error."""

    text: str = ""
    finish_reason: str | None = None
    result: GenerationResult | None = None
    error: Exception | None = None

    @property
    def final(self) -> bool:
        """True for the last update a request gets."""
        return self.result is not None or self.error is not None


class Handle:
    """A submitted request: cancel it, iterate its updates, or wait for its result."""

    def __init__(self, sink: Callable[[Update], None] | None) -> None:
        self._queue: queue.Queue[Update] | None = None if sink is not None else queue.Queue()
        self._sink = sink if sink is not None else self._queue.put
        self.cancelled = threading.Event()
        self.done = threading.Event()

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next step boundary."""
        self.cancelled.set()

    def deliver(self, update: Update) -> None:
        """Pass an update to the owner (called by the worker)."""
        if update.final:
            self.done.set()
        self._sink(update)

    def updates(self, timeout: float | None = None) -> Iterator[Update]:
        """Yield updates until the final one (only for handles submitted without a sink)."""
        if self._queue is None:
            raise GenerationError("this handle delivers its updates to a sink; it cannot be iterated")
        while True:
            update = self._queue.get(timeout=timeout)
            yield update
            if update.final:
                return

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the finished answer; raises the request's error if it failed."""
        for update in self.updates(timeout):
            if update.error is not None:
                raise update.error
            if update.result is not None:
                return update.result
        raise GenerationError("request ended without a result")


@dataclass
class _Request:
    """A request waiting for admission or decoding."""

    prompt_ids: torch.Tensor  # (T,) without padding
    pixel_values: torch.Tensor | None  # (tiles, 3, H, W)
    pixel_attention_mask: torch.Tensor | None  # (tiles, H, W)
    config: GenerationConfig
    handle: Handle
    deadline: float | None
    row: RowState | None = None
    next_token: int = 0
    prefill_seconds: float = 0.0


class FeatureCache:
    """LRU cache of per-tile vision features keyed by a hash of the tile."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> torch.Tensor | None:
        """The cached features (tokens_per_tile, D) or None; a hit becomes the most recently used."""
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        """Store features, evicting the least recently used beyond capacity."""
        if self.capacity <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


def tile_key(tile: torch.Tensor, mask: torch.Tensor | None) -> bytes:
    """A content hash of one tile (3, H, W) and its pixel mask (H, W)."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(str((tuple(tile.shape), tile.dtype)).encode())
    digest.update(tile.contiguous().numpy().tobytes())
    if mask is not None:
        digest.update(mask.contiguous().numpy().tobytes())
    return digest.digest()


def merge_rows(
    a: KVCache, mask_a: torch.Tensor, b: KVCache, mask_b: torch.Tensor, extra: int
) -> tuple[KVCache, torch.Tensor]:
    """Stack the rows of cache `b` under those of `a`, left-padding the shorter to the longer; room for `extra` more."""
    length = max(a.length, b.length)
    rows = a.batch_size + b.batch_size
    merged = KVCache(len(a.keys), rows, a.keys[0].shape[1], a.keys[0].shape[3], length + extra,
                     dtype=a.keys[0].dtype, device=a.keys[0].device)  # fmt: skip
    for bufs, src_a, src_b in ((merged.keys, a.keys, b.keys), (merged.values, a.values, b.values)):
        for out, x, y in zip(bufs, src_a, src_b):
            out[:, :, :length].zero_()  # padding must be finite: masked weights are 0, but 0 * NaN is NaN
            out[: a.batch_size, :, length - a.length : length] = x[:, :, : a.length]
            out[a.batch_size :, :, length - b.length : length] = y[:, :, : b.length]
    merged.length = length
    mask = mask_a.new_zeros(rows, length)  # (B_a + B_b, length)
    mask[: a.batch_size, length - a.length :] = mask_a
    mask[a.batch_size :, length - b.length :] = mask_b
    return merged, mask


def trim_padding(cache: KVCache, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading cache columns no row attends to (views, no copy); return the trimmed mask."""
    first = int(mask.any(dim=0).long().argmax())  # first column some row attends to
    if first == 0:
        return mask
    cache.keys = [k[:, :, first:] for k in cache.keys]
    cache.values = [v[:, :, first:] for v in cache.values]
    cache.pointers = None
    cache.length -= first
    cache.max_len -= first
    return mask[:, first:]


class Scheduler:
    """Serves many generation requests at once from one Engine with continuous batching."""

    def __init__(
        self,
        engine: Engine,
        max_batch_size: int = 32,
        max_queue: int = 64,
        max_prefill_tokens: int = 4096,
        feature_cache_tiles: int = 256,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.features = FeatureCache(feature_cache_tiles)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._cache: KVCache | None = None
        self._mask: torch.Tensor | None = None  # (B, cache.length) 1 = attend
        self._lock = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.max_running = 0  # the largest decode batch seen, for tests and stats

    # ---- public ----

    def start(self) -> "Scheduler":
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="smolvlm-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the worker; requests still in flight get an error."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for request in list(self._waiting) + self._running:
            request.handle.deliver(Update(error=GenerationError("the server is shutting down")))
        self._waiting.clear()
        self._running = []
        self._cache = self._mask = None

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def submit(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        config: GenerationConfig,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        timeout: float | None = None,
        sink: Callable[[Update], None] | None = None,
    ) -> Handle:
        """Queue one prompt (a Batch row: input_ids (1, T), pixels (1, tiles, 3, H, W)); raises QueueFullError."""
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise GenerationError(f"submit takes one prompt at a time, got a batch of {input_ids.shape[0]}")
            keep = attention_mask[0].bool() if attention_mask is not None else slice(None)
            input_ids = input_ids[0][keep]
        if pixel_values is not None and pixel_values.dim() == 5:
            pixel_values = pixel_values[0]
            pixel_attention_mask = None if pixel_attention_mask is None else pixel_attention_mask[0]
        limit = self.engine.text_config.max_position_embeddings
        if input_ids.numel() + config.max_new_tokens > limit:
            raise GenerationError(
                f"prompt of {input_ids.numel()} tokens + max_new_tokens {config.max_new_tokens} exceeds the model's "
                f"context of {limit} tokens; shorten the prompt, use fewer images, or lower max_new_tokens"
            )
        handle = Handle(sink)
        deadline = None if timeout is None else time.perf_counter() + timeout
        request = _Request(input_ids.cpu(), pixel_values, pixel_attention_mask, config, handle, deadline)
        with self._lock:
            if self._stop:
                raise GenerationError("the scheduler is stopped")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
            self._waiting.append(request)
            self._lock.notify_all()
        return handle

    def stats(self) -> dict[str, int]:
        """Queue and batch sizes and feature-cache counters."""
        return {"waiting": len(self._waiting), "running": len(self._running), "max_batch_size": self.max_batch_size,
                "max_queue": self.max_queue, "steps": self.steps, "feature_cache_tiles": len(self.features),
                "feature_cache_hits": self.features.hits, "feature_cache_misses": self.features.misses}  # fmt: skip

    # ---- worker ----

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._running:
                    self._lock.wait()
                if self._stop:
                    return
                admitted = self._take_waiting()
            # a failing step fails its own requests, never the worker: a bad prefill leaves the running batch alone
            try:
                if admitted:
                    self._admit(admitted)
            except Exception as e:  # noqa: BLE001
                _fail(admitted, e)
            try:
                self._drop_finished_or_expired()
                if self._running:
                    self._decode_step()
            except Exception as e:  # noqa: BLE001
                _fail(self._running, e)
                self._running = []
                self._cache = self._mask = None

    def _take_waiting(self) -> list[_Request]:
        """Pop the requests to prefill now (called under the lock); cancelled ones are answered and skipped."""
        taken: list[_Request] = []
        tokens = 0
        while self._waiting and len(self._running) + len(taken) < self.max_batch_size:
            request = self._waiting[0]
            if request.handle.cancelled.is_set() or _expired(request):
                self._waiting.popleft()
                request.handle.deliver(Update(error=_stop_reason(request)))
                continue
            if taken and tokens + request.prompt_ids.numel() > self.max_prefill_tokens:
                break
            tokens += request.prompt_ids.numel()
            taken.append(self._waiting.popleft())
        return taken

    def _drop_finished_or_expired(self) -> None:
        stopped = [i for i, r in enumerate(self._running) if r.handle.cancelled.is_set() or _expired(r)]
        for i in stopped:
            self._running[i].handle.deliver(Update(error=_stop_reason(self._running[i])))
        if stopped:
            self._keep([i for i in range(len(self._running)) if i not in set(stopped)])

    def _keep(self, slots: list[int]) -> None:
        """Keep only these running rows (and their cache rows)."""
        if not slots:
            self._running, self._cache, self._mask = [], None, None
            return
        if len(slots) == len(self._running):
            return
        self._cache.select(slots)
        self._mask = trim_padding(self._cache, self._mask[slots])
        self._running = [self._running[s] for s in slots]

    def _image_features(self, requests: list[_Request]) -> torch.Tensor | None:
        """Features of every real tile of these requests, in order, encoding only tiles not in the cache."""
        per_tile: list[torch.Tensor] = []
        model, device, dtype = self.engine.model, self.engine.device, self.engine.dtype
        for request in requests:
            if request.pixel_values is None:
                continue
            tiles = request.pixel_values  # (n, 3, H, W)
            masks = request.pixel_attention_mask  # (n, H, W) or None
            real = tiles.flatten(1).ne(0).any(dim=1).tolist()
            keys = [tile_key(tiles[i], None if masks is None else masks[i]) if real[i] else None
                    for i in range(len(tiles))]  # fmt: skip
            found = {i: self.features.get(k) for i, k in enumerate(keys) if k is not None}
            missing = [i for i, f in found.items() if f is None]
            if missing:
                index = torch.tensor(missing)
                pixel_mask = None if masks is None else masks[index].to(device)
                with torch.inference_mode():
                    encoded = model.encode_images(tiles[index].to(device, dtype), pixel_mask)  # (m, tokens, D)
                for i, features in zip(missing, encoded):
                    found[i] = features
                    self.features.put(keys[i], features)
            per_tile.extend(found[i] for i in sorted(found))
        return torch.stack(per_tile) if per_tile else None  # (n_tiles, tokens_per_tile, D)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, cache: KVCache,
                 image_features: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Next-token logits (B, V) for the last position."""
        with torch.inference_mode():
            if self.engine.is_vlm:
                out = self.engine.model(input_ids, mask, cache=cache, image_features=image_features, logits_to_keep=1)
                return out.logits[:, -1]
            return self.engine.model(input_ids, mask, cache=cache, logits_to_keep=1)[:, -1]

    def _admit(self, requests: list[_Request]) -> None:
        """Prefill new requests as one left-padded batch, sample their first tokens, merge them into the batch."""
        device = self.engine.device
        start = time.perf_counter()
        length = max(r.prompt_ids.numel() for r in requests)
        ids = torch.zeros(len(requests), length, dtype=torch.long)
        mask = torch.zeros(len(requests), length, dtype=torch.long)
        for i, r in enumerate(requests):
            n = r.prompt_ids.numel()
            ids[i, length - n :] = r.prompt_ids
            mask[i, length - n :] = 1
            r.row = self.engine.new_row(r.config, r.prompt_ids)
        ids, mask = ids.to(device), mask.to(device)
        cache = KVCache.for_config(self.engine.text_config, len(requests), length, self.engine.dtype, device)
        logits = self._forward(ids, mask, cache, self._image_features(requests))  # (B_new, V)
        elapsed = time.perf_counter() - start
        for r in requests:
            r.prefill_seconds = elapsed
        keep = self._sample_and_advance(requests, logits)
        if not keep:
            return
        if len(keep) < len(requests):
            cache.select(keep)
            mask = mask[keep]
        joining = [requests[i] for i in keep]
        extra = max(r.config.max_new_tokens - len(r.row.tokens) for r in self._running + joining)
        if self._cache is None:  # regrow the prompt-sized cache to hold the answers
            self._cache = _regrow(cache, mask, extra)
            self._mask, self._running = mask, joining
        else:
            self._cache, self._mask = merge_rows(self._cache, self._mask, cache, mask, extra)
            self._running = self._running + joining
        self.max_running = max(self.max_running, len(self._running))

    def _decode_step(self) -> None:
        """Feed every running row its last sampled token and sample the next."""
        device = self.engine.device
        if self._cache.length + 1 > self._cache.max_len:
            extra = max(r.config.max_new_tokens - len(r.row.tokens) for r in self._running)
            self._cache = _regrow(self._cache, self._mask, extra)
        start = time.perf_counter()
        tokens = torch.tensor([r.next_token for r in self._running], device=device)[:, None]  # (B, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._running), 1)], dim=1)  # (B, L + 1)
        logits = self._forward(tokens, self._mask, self._cache)  # (B, V)
        elapsed = time.perf_counter() - start
        for r in self._running:
            r.row.decode_seconds += elapsed
        self.steps += 1
        self._keep(self._sample_and_advance(self._running, logits))

    def _sample_and_advance(self, requests: list[_Request], logits: torch.Tensor) -> list[int]:
        """Sample one token per row, stream its text, finish rows that are done; return the slots still going."""
        rows = [r.row for r in requests]
        penalty = any(row.params.repetition_penalty != 1.0 for row in rows)
        next_tokens = sample_next(
            logits, [row.params for row in rows], [row.generator for row in rows],
            [row.history for row in rows] if penalty else None,
        ).tolist()  # fmt: skip
        keep = []
        for slot, (request, token) in enumerate(zip(requests, next_tokens)):
            piece = self.engine.advance_row(request.row, token)
            if request.row.finish_reason is None:
                request.next_token = token
                keep.append(slot)
                if piece:
                    request.handle.deliver(Update(text=piece))
                continue
            request.handle.deliver(Update(text=piece, finish_reason=request.row.finish_reason))
            request.handle.deliver(Update(result=request.row.result(request.prefill_seconds)))
        return keep


def _regrow(cache: KVCache, mask: torch.Tensor, extra: int) -> KVCache:
    """A copy of `cache` with room for `extra` more tokens (merged with an empty cache)."""
    empty = KVCache(1, 1, 1, 1, 1)
    empty.keys = [k[:0] for k in cache.keys]
    empty.values = [v[:0] for v in cache.values]
    return merge_rows(cache, mask, empty, mask.new_zeros(0, 0), extra)[0]


def _fail(requests: list[_Request], error: Exception) -> None:
    for request in requests:
        if not request.handle.done.is_set():
            request.handle.deliver(Update(error=error))


def _expired(request: _Request) -> bool:
    return request.deadline is not None and time.perf_counter() > request.deadline


def _stop_reason(request: _Request) -> GenerationError:
    if request.handle.cancelled.is_set():
        return CancelledError("the request was cancelled")
    return RequestTimeoutError("the request ran past its time limit and was stopped; lower max_tokens or retry")
