"""KV-cached, batched, streaming generation: one prefill (vision once per image), then one token per step.

Rows of a batch are left-padded to one length and share one write position in a preallocated KV cache. On the CPU
a request's cache is its own and drops the rows of finished sequences, so the last long answer decodes at batch-1
speed; on a GPU the request borrows a CUDA-graph decode slot (`graphs.py`) where finished rows idle in place.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from smolvlm.engine.graphs import BATCH_BUCKETS, GraphedDecoder, GraphSession
from smolvlm.engine.kv_cache import KVCache
from smolvlm.engine.sampling import SamplingParams, sample_next
from smolvlm.engine.text_stream import IncrementalDetokenizer, StopStringMatcher
from smolvlm.errors import GenerationError

MAX_STOP_STRINGS = 64
MAX_STOP_LENGTH = 256
VISION_CHUNK = 8  # tiles through the vision tower at once: thousands of patches per GEMM, a bounded peak memory
# Prompt tokens per prefill forward, in whole rows (a longer row goes alone): the decoder's activations (its MLP's
# are ~32 bytes per token per hidden unit) then stay small beside a batch's KV cache, which is allocated by then.
PREFILL_CHUNK_TOKENS = 256


@dataclass
class GenerationConfig:
    """What to generate for one conversation; temperature 0 is greedy (the default)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise GenerationError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        if any(not isinstance(s, str) or len(s) > MAX_STOP_LENGTH for s in self.stop):
            raise GenerationError(f"stop strings must be strings of at most {MAX_STOP_LENGTH} characters")
        self.sampling()  # validates the sampling options

    def sampling(self) -> SamplingParams:
        """The sampling part of this config."""
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed)

    def updated(self, **options: object) -> "GenerationConfig":
        """A copy with some options changed (unknown names are an error)."""
        unknown = set(options) - set(self.__dataclass_fields__)
        if unknown:
            raise GenerationError(
                f"unknown generation option(s) {', '.join(sorted(unknown))}; known: "
                f"{', '.join(self.__dataclass_fields__)}"
            )
        return replace(self, **options)


@dataclass
class GenerationResult:
    """One finished answer with why it stopped and what it cost."""

    text: str
    finish_reason: str  # "stop" (end token or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float
    token_ids: list[int] = field(default_factory=list, repr=False)


@dataclass
class RowState:
    """Decoding state of one sequence: sampling, detokenizer, stop strings, tokens so far."""

    config: GenerationConfig
    params: SamplingParams
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    history: torch.Tensor  # prompt ids (no padding) + generated ids, for the repetition penalty
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    decode_seconds: float = 0.0

    def result(self, prefill_seconds: float) -> GenerationResult:
        """The finished row as a GenerationResult."""
        return GenerationResult(
            text="".join(self.pieces),
            finish_reason=self.finish_reason or "length",
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.tokens),
            prefill_seconds=prefill_seconds,
            decode_seconds=self.decode_seconds,
            token_ids=self.tokens,
        )


@dataclass
class StreamPiece:
    """Text decoded for one row at one step; `finish_reason` is set on the row's last piece."""

    row: int
    text: str
    finish_reason: str | None = None


STEP_MODES = ("eager", "static", "compiled", "graphs", "compiled-graphs")


def default_step_mode(device: torch.device, compile: bool = False) -> str:
    """CUDA graphs on a GPU, eager steps on the CPU; `compile` adds torch.compile to either."""
    if device.type == "cuda":
        return "compiled-graphs" if compile else "graphs"
    return "compiled" if compile else "eager"


class CacheSession:
    """One request's decoding in a cache of its own, which drops the rows of finished sequences."""

    def __init__(self, engine: "Engine", cache: KVCache, mask: torch.Tensor) -> None:
        self.engine, self.cache, self.mask = engine, cache, mask  # mask (B, T + max_new)

    def keep(self, kept: list[int]) -> None:
        """Only the rows at these positions (of the active rows) go on."""
        self.cache.select(kept)
        if self.engine.step_mode != "eager":
            self.cache.bind_pointers()  # the static step may read the cache through its address table
        self.mask = self.mask[kept]

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per active row ((B', 1)); their next-token logits (B', V)."""
        engine, cache, mask = self.engine, self.cache, self.mask
        if engine.step_mode == "eager":
            return engine._logits(tokens, mask[:, : cache.length + 1], cache)
        position = cache.length
        position_ids = mask[:, :position].sum(-1, keepdim=True)  # (B', 1): attended tokens before this one
        mask[:, position] = 1
        cache_position = torch.tensor([position], device=tokens.device)
        logits = engine._static_step(tokens, mask, position_ids, cache_position, cache)
        cache.advance(1)
        return logits

    def close(self) -> None:
        """Nothing to give back: the cache goes with the session."""


class Engine:
    """Generates from a SmolVLM (or a text-only CausalLM) given already-processed input tensors."""

    def __init__(self, model: torch.nn.Module, decode: Callable[[list[int]], str], eos_token_ids: Sequence[int],
                 step_mode: str = "auto", decode_kernel: bool | None = None, decode_linear: bool = True):
        """`step_mode`: "eager" (decode attends over the cached prefix), "static" (fixed shapes: whole-cache
        attention under a mask), "compiled" (the static step through torch.compile; compiles per batch size),
        "graphs" (the static step in preallocated slots, replayed from CUDA graphs on a GPU), "compiled-graphs"
        (both) or "auto" (`default_step_mode` for the model's device). `decode_kernel`: static steps run rope,
        cache write and attention of each layer as one Triton kernel (`model/decode_attention.py`; needs Triton);
        None (the default) turns it on for static steps on a GPU wherever it can run. `decode_linear`: with the
        kernel, batch-1 steps also run each projection as one Triton kernel with its norm, SiLU gate or residual
        add (`model/decode_linear.py`)."""
        self.model = model
        if step_mode == "auto":
            step_mode = default_step_mode(self.device)
        if step_mode not in STEP_MODES:
            raise GenerationError(f"step_mode must be one of auto, {', '.join(STEP_MODES)}, got {step_mode!r}")
        self.decode = decode
        self.eos_token_ids = set(int(i) for i in eos_token_ids)
        self.text_config = model.config.text if hasattr(model.config, "text") else model.config
        self.is_vlm = hasattr(model, "encode_images")
        self.step_mode = step_mode
        self.lookahead = self.device.type == "cuda"  # queue step t+1 before reading step t's tokens (see _decode)
        self.prefill_chunk_tokens = PREFILL_CHUNK_TOKENS
        decoder = model.text_model if self.is_vlm else model.model
        if decode_kernel is None:  # on where it was measured faster: GPU static steps (benchmarks/generate_cuda.py)
            decode_kernel = self.device.type == "cuda" and step_mode != "eager" and not decoder.decode_kernel_problem()
        if decode_kernel and step_mode == "eager":
            raise GenerationError("decode_kernel runs the static step: pick a step_mode other than eager")
        # A model's decoder follows its most recent engine's choice.
        decoder.use_decode_kernel(decode_kernel, decode_linear)
        self._static_step = self._static_logits
        if step_mode.startswith("compiled"):
            self._static_step = torch.compile(self._static_logits, fullgraph=True, dynamic=False)
        # On a GPU all of the engine's work runs on one stream of its own: CUDA-graph capture cannot use the
        # default stream, and each stream that runs GEMMs holds its own cuBLAS workspaces (tens of MiB), so using
        # one stream for prefill, capture and replay keeps memory at a single set.
        self._cuda_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._graphs: GraphedDecoder | None = None
        if step_mode.endswith("graphs"):
            # Fewer, larger GEMMs: on a GPU a small decode step is bound by its kernel count.
            decoder.fuse_projections()
            self._graphs = GraphedDecoder(self._static_step, self.text_config, self.dtype, self.device,
                                          reads_table=lambda max_len: max_len <= decoder.decode_kernel_max_len)

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The model's compute dtype."""
        return next(self.model.parameters()).dtype

    def _on_device(self) -> contextlib.AbstractContextManager:
        """Inference mode, on the engine's CUDA stream where there is one (entered per step, never across a yield)."""
        if self._cuda_stream is None:
            return torch.inference_mode()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.cuda.stream(self._cuda_stream))
        return stack

    def _synchronized_since(self, start: float) -> float:
        """Seconds since `start` once the engine's queued GPU work has finished (at once on the CPU)."""
        if self._cuda_stream is not None:
            self._cuda_stream.synchronize()
        return time.perf_counter() - start

    def _image_features(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Image tokens (n_real_tiles, tokens_per_tile, D) of a batch's tiles, VISION_CHUNK tiles at a time: the
        tower's activations for every tile at once would set a batched request's peak memory."""
        tiles, masks = self.model.flat_tiles(pixel_values, pixel_attention_mask)  # (N, 3, H, W), (N, H, W)
        features = []
        for i in range(0, tiles.shape[0], VISION_CHUNK):
            chunk = tiles[i : i + VISION_CHUNK].to(self.device, self.dtype)
            mask = None if masks is None else masks[i : i + VISION_CHUNK].to(self.device)
            features.append(self.model.encode_images(chunk, mask))
        return torch.cat(features) if len(features) > 1 else features[0]

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache, **vision) -> torch.Tensor:
        """Next-token logits (B, V) for the last position."""
        if self.is_vlm:
            out = self.model(input_ids, attention_mask, cache=cache, logits_to_keep=1, **vision)
            return out.logits[:, -1]
        return self.model(input_ids, attention_mask, cache=cache, logits_to_keep=1)[:, -1]

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache,
                 image_features: torch.Tensor | None) -> torch.Tensor:
        """Next-token logits (B, V) after each prompt, prefilling as many rows at a time as `prefill_chunk_tokens`
        allows; `image_features` (n_tiles, tokens_per_tile, D) are the batch's image tokens in row order."""
        B, T = input_ids.shape
        rows = max(1, self.prefill_chunk_tokens // T)
        vision = {} if image_features is None else {"image_features": image_features}
        if rows >= B:
            return self._logits(input_ids, attention_mask, cache, **vision)
        if image_features is not None:
            features = image_features.reshape(-1, image_features.shape[-1])  # (image tokens, D)
            per_row = (input_ids == self.model.config.image_token_id).sum(1)  # (B,)
            ends = [0, *per_row.cumsum(0).tolist()]  # row r's image tokens are features[ends[r]:ends[r + 1]]
            self.model.check_image_tokens(ends[-1], features.shape[0])
        logits = []
        for start in range(0, B, rows):
            stop = min(B, start + rows)
            if image_features is not None:
                vision = {"image_features": features[ends[start] : ends[stop]]}
            logits.append(self._logits(input_ids[start:stop], attention_mask[start:stop], cache.rows(start, stop),
                                       **vision))  # (rows, V)
        cache.advance(T)  # the row views advanced themselves
        return torch.cat(logits)

    def _static_logits(self, tokens: torch.Tensor, valid: torch.Tensor, position_ids: torch.Tensor,
                       cache_position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One static-shape decode step: tokens (B, 1), valid (B, max_len) -> next-token logits (B, V)."""
        out = self.model(tokens, valid, cache=cache, position_ids=position_ids, cache_position=cache_position)
        return (out.logits if self.is_vlm else out)[:, -1]

    def _session(self, attention_mask: torch.Tensor, max_new: int) -> tuple[CacheSession | GraphSession, KVCache]:
        """Where this request decodes, and the cache its prefill writes."""
        B, T = attention_mask.shape
        if self._graphs is not None and B <= BATCH_BUCKETS[-1]:  # larger batches run the same step uncaptured
            return self._graphs.session(attention_mask, max_new)
        cache = KVCache.for_config(self.text_config, B, T + max_new, dtype=self.dtype, device=attention_mask.device)
        if self.step_mode != "eager":
            cache.bind_pointers()  # the static step may read the cache through its address table
        # (B, T + max_new): eager steps slice the written prefix of all ones; static steps set each column as written
        future = (attention_mask.new_ones if self.step_mode == "eager" else attention_mask.new_zeros)(B, max_new)
        return CacheSession(self, cache, torch.cat([attention_mask, future], dim=1)), cache

    def stream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        configs: Sequence[GenerationConfig],
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        results: list[GenerationResult] | None = None,
    ) -> Iterator[StreamPiece]:
        """Yield text pieces as rows decode; when done, `results` (if given) is filled with one result per row."""
        B, T = input_ids.shape
        if len(configs) != B:
            raise GenerationError(f"{len(configs)} generation configs for a batch of {B}")
        device = self.device
        max_new = max(c.max_new_tokens for c in configs)
        limit = self.text_config.max_position_embeddings
        if T + max_new > limit:
            raise GenerationError(
                f"prompt of {T} tokens + max_new_tokens {max_new} exceeds the model's context of {limit} tokens; "
                "shorten the prompt, use fewer or smaller images, or lower max_new_tokens"
            )
        ids_cpu, mask_cpu = input_ids.cpu(), attention_mask.cpu()
        rows = [self.new_row(c, ids_cpu[i][mask_cpu[i].bool()]) for i, c in enumerate(configs)]
        start = time.perf_counter()
        with self._on_device():
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            image_features = None
            if pixel_values is not None:
                image_features = self._image_features(pixel_values, pixel_attention_mask)
            # After the vision tower, so that the request's KV cache and the tower's activations never coexist.
            session, cache = self._session(attention_mask, max_new)
        try:
            with self._on_device():
                logits = self._prefill(input_ids, attention_mask, cache, image_features)  # (B, V)
            image_features = cache = None  # not needed while decoding
            # Prefill time covers the vision tower, the KV cache (and a new slot's capture) and the prompt; the
            # first token needs the sync anyway.
            prefill_seconds = self._synchronized_since(start)
            yield from self._decode(session, logits, rows)
        finally:
            session.close()
        if results is not None:
            results.clear()
            results.extend(row.result(prefill_seconds) for row in rows)

    def _decode(self, session: CacheSession | GraphSession, logits: torch.Tensor, rows: list[RowState]
                ) -> Iterator[StreamPiece]:
        """Sample, stream and feed back one token per active row until every row has finished.

        With `lookahead` (the default on a GPU) the next step is queued on the device before the host reads this
        step's tokens, so the GPU computes while the host detokenizes and checks stops; rows that finish meanwhile
        have one step computed for nothing, and the last step of a request is wasted."""
        if isinstance(session, GraphSession) and all(r.params.greedy and r.params.repetition_penalty == 1.0
                                                      for r in rows):
            yield from self._decode_greedy(session, logits, rows)
            return
        active = list(range(len(rows)))  # original row index of each active row
        ahead: torch.Tensor | None = None  # logits of the step queued before reading this one's tokens
        while True:
            step_start = time.perf_counter()
            with self._on_device():
                penalized = any(rows[r].params.repetition_penalty != 1.0 for r in active)
                sampled = sample_next(
                    logits,
                    [rows[r].params for r in active],
                    [rows[r].generator for r in active],
                    [rows[r].history for r in active] if penalized else None,
                )  # (B',) on the device
                read = self._reader(sampled)
                if self.lookahead:
                    ahead = session.next_logits(sampled[:, None])  # (B', V), queued behind the copy of `sampled`
                tokens = read()  # the one sync per step
            keep: list[int] = []
            yield from self._advance(rows, active, tokens, keep)
            if not keep:
                return
            with self._on_device():
                if len(keep) < len(active):
                    session.keep(keep)
                    index = torch.tensor(keep, device=sampled.device)
                    sampled = sampled[index]
                    ahead = None if ahead is None else ahead[index]
                    active = [active[s] for s in keep]
                logits = ahead if ahead is not None else session.next_logits(sampled[:, None])  # (B', V)
            elapsed = time.perf_counter() - step_start
            for r in active:
                rows[r].decode_seconds += elapsed

    def _decode_greedy(self, session: GraphSession, logits: torch.Tensor, rows: list[RowState]
                       ) -> Iterator[StreamPiece]:
        """`_decode` for greedy rows in a decode slot: each step leaves its argmax as the next step's input, so a
        token costs one graph replay and one copy to the host (no sampling, feeding or logits gather launched
        apart); with `lookahead` the next replay is queued before this step's tokens are read."""
        active = list(range(len(rows)))
        with self._on_device():
            first = logits.argmax(-1)  # (B,): slot rows 0..B-1, as `slot_rows` starts
            session.feed(first[:, None])
            read = self._reader(first)
        while True:
            step_start = time.perf_counter()
            with self._on_device():
                queued = self._reader(session.next_greedy()) if self.lookahead else None
                tokens = read()  # the one sync per step
            keep: list[int] = []
            yield from self._advance(rows, active, [tokens[s] for s in session.slot_rows], keep)
            if not keep:
                return
            if len(keep) < len(active):  # finished rows go on decoding in their slot rows, unread
                session.keep(keep)
                active = [active[s] for s in keep]
            if queued is None:
                with self._on_device():
                    queued = self._reader(session.next_greedy())
            read = queued
            elapsed = time.perf_counter() - step_start
            for r in active:
                rows[r].decode_seconds += elapsed

    def _advance(self, rows: list[RowState], active: list[int], tokens: list[int], keep: list[int]
                 ) -> Iterator[StreamPiece]:
        """Take token i into row active[i], yield the text it releases, and add to `keep` the positions (in
        `active`) of the rows that go on."""
        for position, (r, token) in enumerate(zip(active, tokens)):
            piece = self.advance_row(rows[r], token)
            if piece or rows[r].finish_reason:
                yield StreamPiece(r, piece, rows[r].finish_reason)
            if rows[r].finish_reason is None:
                keep.append(position)

    def _reader(self, sampled: torch.Tensor) -> Callable[[], list[int]]:
        """A function giving `sampled` as a list: on a GPU it waits only for a copy queued now, not for later work
        (nor is it changed by later work: `sampled` may be a buffer the next step overwrites)."""
        if self._cuda_stream is None:
            values = sampled.tolist()
            return lambda: values
        host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
        host.copy_(sampled, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(self._cuda_stream)

        def read() -> list[int]:
            copied.synchronize()
            return host.tolist()

        return read

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        configs: Sequence[GenerationConfig],
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
    ) -> list[GenerationResult]:
        """Run the batch to completion; one result per row."""
        results: list[GenerationResult] = []
        for _ in self.stream(input_ids, attention_mask, configs, pixel_values, pixel_attention_mask, results):
            pass
        return results

    def new_row(self, config: GenerationConfig, prompt_ids: torch.Tensor) -> RowState:
        """Fresh decoding state for one sequence whose prompt (without padding) is `prompt_ids`."""
        params = config.sampling()
        return RowState(
            config=config,
            params=params,
            generator=params.make_generator(),
            detokenizer=IncrementalDetokenizer(self.decode),
            stops=StopStringMatcher(config.stop),
            history=prompt_ids,
            prompt_tokens=int(prompt_ids.numel()),
        )

    def advance_row(self, row: RowState, token: int) -> str:
        """Take one sampled token into a row; return the text it makes safe to emit."""
        if token in self.eos_token_ids:
            row.finish_reason = "stop"
            piece = self._drain(row)
        else:
            row.tokens.append(token)
            if row.params.repetition_penalty != 1.0:
                row.history = torch.cat([row.history, torch.tensor([token])])
            piece = row.stops.feed(row.detokenizer.push(token))
            if row.stops.stopped:
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.config.max_new_tokens:
                row.finish_reason = "length"
                piece += self._drain(row)
        row.pieces.append(piece)
        return piece

    @staticmethod
    def _drain(row: RowState) -> str:
        """Release what the detokenizer and stop matcher still hold at the end of a row."""
        tail = row.stops.feed(row.detokenizer.flush())
        return tail if row.stops.stopped else tail + row.stops.flush()
