"""KV-cached, batched, streaming generation: one prefill (vision once per image), then one token per step.

Rows of a batch are left-padded to one length, share one write position in a preallocated KV cache, and leave the
batch as soon as they finish (the cache drops their rows), so the last long answer decodes at batch-1 speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from smolvlm.engine.kv_cache import KVCache
from smolvlm.engine.sampling import SamplingParams, sample_next
from smolvlm.engine.text_stream import IncrementalDetokenizer, StopStringMatcher
from smolvlm.errors import GenerationError

MAX_STOP_STRINGS = 64
MAX_STOP_LENGTH = 256


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


STEP_MODES = ("eager", "static", "compiled")


class Engine:
    """Generates from a SmolVLM (or a text-only CausalLM) given already-processed input tensors."""

    def __init__(self, model: torch.nn.Module, decode: Callable[[list[int]], str], eos_token_ids: Sequence[int],
                 step_mode: str = "eager"):
        """`step_mode`: "eager" (decode attends over the cached prefix), "static" (fixed shapes: whole-cache
        attention under a mask) or "compiled" (the static step through torch.compile; compiles per batch size)."""
        if step_mode not in STEP_MODES:
            raise GenerationError(f"step_mode must be one of {', '.join(STEP_MODES)}, got {step_mode!r}")
        self.model = model
        self.decode = decode
        self.eos_token_ids = set(int(i) for i in eos_token_ids)
        self.text_config = model.config.text if hasattr(model.config, "text") else model.config
        self.is_vlm = hasattr(model, "encode_images")
        self.step_mode = step_mode
        self._static_step = self._static_logits
        if step_mode == "compiled":
            self._static_step = torch.compile(self._static_logits, fullgraph=True, dynamic=False)

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The model's compute dtype."""
        return next(self.model.parameters()).dtype

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache, **vision) -> torch.Tensor:
        """Next-token logits (B, V) for the last position."""
        if self.is_vlm:
            out = self.model(input_ids, attention_mask, cache=cache, logits_to_keep=1, **vision)
            return out.logits[:, -1]
        return self.model(input_ids, attention_mask, cache=cache, logits_to_keep=1)[:, -1]

    def _static_logits(self, tokens: torch.Tensor, valid: torch.Tensor, position_ids: torch.Tensor,
                       cache_position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One static-shape decode step: tokens (B, 1), valid (B, max_len) -> next-token logits (B, V)."""
        out = self.model(tokens, valid, cache=cache, position_ids=position_ids, cache_position=cache_position)
        return (out.logits if self.is_vlm else out)[:, -1]

    def _decode_logits(self, tokens: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B', V) after feeding one token per row; `mask` (B', max_len) has every written column set."""
        if self.step_mode == "eager":
            return self._logits(tokens, mask[:, : cache.length + 1], cache)
        position = cache.length
        position_ids = mask[:, :position].sum(-1, keepdim=True)  # (B', 1): attended tokens before this one
        mask[:, position] = 1
        cache_position = torch.tensor([position], device=tokens.device)
        logits = self._static_step(tokens, mask, position_ids, cache_position, cache)
        cache.advance(1)
        return logits

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
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        max_new = max(c.max_new_tokens for c in configs)
        limit = self.text_config.max_position_embeddings
        if T + max_new > limit:
            raise GenerationError(
                f"prompt of {T} tokens + max_new_tokens {max_new} exceeds the model's context of {limit} tokens; "
                "shorten the prompt, use fewer or smaller images, or lower max_new_tokens"
            )
        rows = [self.new_row(c, input_ids[i][attention_mask[i].bool()].cpu()) for i, c in enumerate(configs)]
        vision = {}
        if pixel_values is not None:
            vision = {"pixel_values": pixel_values.to(device, self.dtype)}
            if pixel_attention_mask is not None:
                vision["pixel_attention_mask"] = pixel_attention_mask.to(device)

        cache = KVCache.for_config(self.text_config, B, T + max_new, dtype=self.dtype, device=device)
        # (B, T + max_new): eager steps slice the written prefix of all ones; static steps set each column as written
        future = (attention_mask.new_ones if self.step_mode == "eager" else attention_mask.new_zeros)(B, max_new)
        mask = torch.cat([attention_mask, future], dim=1)
        start = time.perf_counter()
        with torch.inference_mode():
            logits = self._logits(input_ids, attention_mask, cache, **vision)  # (B, V)
        prefill_seconds = time.perf_counter() - start

        active = list(range(B))  # original row index of each cache row
        with torch.inference_mode():
            for step in range(max_new):
                step_start = time.perf_counter()
                next_tokens = sample_next(
                    logits,
                    [rows[r].params for r in active],
                    [rows[r].generator for r in active],
                    [rows[r].history for r in active] if any(rows[r].params.repetition_penalty != 1.0 for r in active) else None,
                ).tolist()
                keep = []
                for slot, (r, token) in enumerate(zip(active, next_tokens)):
                    piece = self.advance_row(rows[r], token)
                    if piece or rows[r].finish_reason:
                        yield StreamPiece(r, piece, rows[r].finish_reason)
                    if rows[r].finish_reason is None:
                        keep.append(slot)
                if not keep:
                    break
                if len(keep) < len(active):
                    cache.select(keep)
                    mask = mask[keep]
                    active = [active[s] for s in keep]
                tokens = torch.tensor([next_tokens[s] for s in keep], device=device)[:, None]  # (B', 1)
                logits = self._decode_logits(tokens, mask, cache)
                elapsed = time.perf_counter() - step_start
                for r in active:
                    rows[r].decode_seconds += elapsed
        if results is not None:
            results.clear()
            results.extend(row.result(prefill_seconds) for row in rows)

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
