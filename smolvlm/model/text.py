"""Llama / SmolLM2 text decoder: token embedding, RoPE, grouped-query attention, SiLU-gated MLP, RMSNorm.

Module and parameter names follow transformers' LlamaModel / LlamaForCausalLM so state dicts map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm.config import TextConfig
from smolvlm.engine.kv_cache import KVCache
from smolvlm.errors import ConfigError, GenerationError


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled by a learned weight (Llama's definition)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension of x."""
        if x.dtype == torch.float32 or x.is_cuda:
            # One fused kernel. In bf16 it rounds once (after the weight) where Llama rounds before and after it,
            # a bf16-ulp difference the GPU path accepts for 7 fewer kernels per norm; the CPU keeps Llama's rounding.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Default (unscaled) rotary position embedding: cos/sin tables for given position ids."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim
        return 1.0 / (self.theta**exponents)  # (hd/2,)

    def reset_buffers(self, device: torch.device | str) -> None:
        """Recompute the frequency buffer on `device` (after the module was built on the meta device)."""
        self.inv_freq = self._inv_freq().to(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin), each (B, T, 1, hd), for position_ids (B, T); see `apply_rotary`."""
        freqs = position_ids[:, :, None, None].float() * self.inv_freq  # (B, T, 1, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, hd) by the position angles, halves convention: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).

    Swapping the halves with one flip and folding the minus sign into the sine takes fewer ops per layer than
    Llama's rotate_half, with bit-identical results.
    """
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x2, x1)
    return x * cos + swapped * signed_sin


def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated along dim 0: a view when they already lie back to back in one storage (packed
    weights, or linears fused before), else a copy."""
    first, offset = tensors[0], tensors[0].storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or (
                t.storage_offset() != offset):
            return torch.cat(tensors)
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack the weights (and biases) of linears that read the same input into one matrix, in place.

    Each linear's parameters become row slices (views) of the stacked tensor (`stacked`), so memory is not doubled
    and the state dict keeps its keys; one GEMM then replaces len(linears) small ones."""
    weight = stacked([lin.weight.detach() for lin in linears])
    bias = stacked([lin.bias.detach() for lin in linears]) if linears[0].bias is not None else None
    start = 0
    for lin in linears:
        rows = lin.out_features
        lin.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight, bias


class FusableProjections(nn.Module):
    """A module whose linears named in `fusable` read one input and can run as one GEMM (see `fuse_linears`)."""

    fusable: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.fused: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (weight, bias) once fused

    def fuse_projections(self) -> None:
        """Run the fusable linears as one GEMM from now on (inference only: their weights become views)."""
        self.fused = fuse_linears([getattr(self, name) for name in self.fusable])

    def fused_ready(self) -> bool:
        """True when fused and no wrapper (e.g. LoRA) has replaced a linear since: a wrapper must see its input."""
        return self.fused is not None and type(getattr(self, self.fusable[0])) is nn.Linear

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half() copy each weight apart: fuse them again
        super()._apply(fn, recurse)
        if self.fused is not None:
            self.fuse_projections()
        return self


class Attention(FusableProjections):
    """Causal grouped-query self-attention with rotary positions, reading/writing an optional KV cache."""

    fusable = ("q_proj", "k_proj", "v_proj")

    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """x (B, T, D) -> rotated q (B, T, H, hd), rotated k and plain v (B, T, KV, hd)."""
        B, T, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = rope
        if self.fused_ready():
            qkv = F.linear(x, *self.fused).view(B, T, H + 2 * KV, hd)
            qk = apply_rotary(qkv[:, :, : H + KV], cos, sin)  # q and k rotated together: half the kernels
            return qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + KV :]
        q = apply_rotary(self.q_proj(x).view(B, T, H, hd), cos, sin)
        k = apply_rotary(self.k_proj(x).view(B, T, KV, hd), cos, sin)
        return q, k, self.v_proj(x).view(B, T, KV, hd)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); `mask` is a boolean or additive (B, 1, T, S), or None for plain causal.

        With `cache_position` ((T,) tensor) the keys/values go to those cache columns and attention covers the
        whole cache buffer under `mask` (static shapes, see TextDecoder.forward)."""
        B, T, _ = x.shape
        if mask is not None and mask.dim() == 2:  # the static step's (B, max_len) 0/1 mask: one fused kernel
            return self.o_proj(self._decode_kernel(x, rope, mask, cache, cache_position).view(B, 1, -1))
        q, k, v = self.project(x, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd), (B, KV, T, hd) x2
        if cache_position is not None:
            k, v = cache.write(self.layer_idx, k, v, cache_position)  # (B, KV, max_len, hd)
        elif cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KV, S, hd) with S = past + T
        if T == 1:
            # Decode: one query sees every cached key, so no causal mask. The query heads that share a kv head
            # become query rows of that kv head: plain attention, several times faster on CPU than SDPA's GQA.
            group = self.num_heads // self.num_kv_heads
            q = q.reshape(B, self.num_kv_heads, group, self.head_dim)  # (B, KV, G, hd)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, KV, G, hd)
            return self.o_proj(out.reshape(B, 1, self.num_heads * self.head_dim))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.num_kv_heads != self.num_heads
        )  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def _decode_kernel(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], valid: torch.Tensor,
                       cache: KVCache, cache_position: torch.Tensor) -> torch.Tensor:
        """One new token per row through `decode_attention` (rope, cache write, attention): x (B, 1, D) -> (B, H hd)."""
        B = x.shape[0]
        if self.fused_ready():
            qkv = F.linear(x, *self.fused)
        else:  # LoRA-wrapped projections must each see the input
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        return self.decode_attention(qkv.view(B, -1), rope, valid, cache, cache_position)

    def decode_attention(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], valid: torch.Tensor,
                         cache: KVCache, cache_position: torch.Tensor) -> torch.Tensor:
        """Projected q/k/v (B, (H + 2 KV) hd) of one new token per row -> attention out (B, H hd), in one kernel."""
        B = qkv.shape[0]
        cos, sin = rope  # (B, 1, 1, hd) each
        if cache.pointers is None:
            raise GenerationError("the fused decode attention reads the cache through its address table: "
                                  "call cache.bind_pointers() after allocating or reordering the cache")
        return torch.ops.smolvlm.decode_attention(
            qkv, cos.reshape(B, -1), sin.reshape(B, -1), cache.keys[self.layer_idx], cache.pointers,
            self.layer_idx, valid, cache_position, self.num_heads)


class MLP(FusableProjections):
    """SiLU-gated feed-forward: down(silu(gate(x)) * up(x))."""

    fusable = ("gate_proj", "up_proj")

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ConfigError(f"unsupported text hidden_act {config.hidden_act!r}: Llama / SmolLM2 use 'silu'")
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        if self.fused_ready():
            gate, up = F.linear(x, *self.fused).chunk(2, dim=-1)  # (B, T, I) each
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, cache_position)
        return x + self.mlp(self.post_attention_layernorm(x))

    def linears_fused(self) -> bool:
        """True when `decode_step` can run: q/k/v and gate/up fused, every projection a plain linear (no LoRA
        wrapper) without bias."""
        attn, mlp = self.self_attn, self.mlp
        plain = all(type(lin) is nn.Linear and lin.bias is None for lin in (attn.o_proj, mlp.down_proj))
        return plain and attn.fused_ready() and mlp.fused_ready() and attn.fused[1] is None and mlp.fused[1] is None

    def decode_step(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], valid: torch.Tensor,
                    cache: KVCache, cache_position: torch.Tensor) -> torch.Tensor:
        """One new token per row, (B, 1, D) -> (B, 1, D), in five kernels: norm + q/k/v, attention, output
        projection + residual, norm + gate/up + SiLU gate, down projection + residual (decode_linear.py)."""
        B, _, D = x.shape
        attn, mlp, pre, post = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        linear = torch.ops.smolvlm.decode_linear
        h = x.view(B, D)
        qkv = linear(h, attn.fused[0], pre.weight, None, pre.eps, False)  # (B, (H + 2 KV) hd)
        out = attn.decode_attention(qkv, rope, valid, cache, cache_position)  # (B, H hd)
        h = linear(out, attn.o_proj.weight, None, h, 0.0, False)  # (B, D)
        gated = linear(h, mlp.fused[0], post.weight, None, post.eps, True)  # (B, I)
        return linear(gated, mlp.down_proj.weight, None, h, 0.0, False).view(B, 1, D)


def position_ids_from_mask(attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    """Positions of the last `num_new` tokens, counting only attended tokens (left padding shifts them)."""
    positions = attention_mask.long().cumsum(-1) - 1  # (B, S)
    positions = positions.masked_fill(attention_mask == 0, 0)
    return positions[:, -num_new:]  # (B, T)


def causal_padding_mask(
    attention_mask: torch.Tensor | None, past: int, num_new: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean attention mask (B, 1, T, S) for T new queries after `past` cached tokens; None when plain causal.

    Every query may always see itself, so rows of padding tokens never become fully masked (that would give NaN
    in SDPA, and a NaN value times a zero weight still poisons real rows).
    """
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is None and (past == 0 or num_new == 1):
        return None  # SDPA's is_causal (prefill) or no mask at all (single-token decode)
    total = past + num_new
    query_pos = torch.arange(past, total, device=device)[:, None]  # (T, 1)
    key_pos = torch.arange(total, device=device)[None, :]  # (1, S)
    mask = (key_pos <= query_pos)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
        mask = mask | (key_pos == query_pos)[None, None]
    return mask


class TextDecoder(nn.Module):
    """Llama decoder stack (no LM head): embed_tokens, layers, final norm."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.decode_kernel_max_len = 0  # static steps with caches up to this long use decode_attention.py's kernel
        self.linear_kernels = False  # ... and those of at most decode_linear.MAX_BATCH rows decode_linear.py's

    def decode_kernel_problem(self) -> str | None:
        """Why the one-kernel decode attention cannot run for this decoder, or None when it can."""
        from smolvlm.model import decode_attention

        if not decode_attention.available():
            return "the fused decode attention needs Triton (CUDA builds of torch ship it)"
        if not decode_attention.compiler_found():
            return "the fused decode attention needs a C compiler for Triton (gcc or clang on PATH, or set CC)"
        head_dim = self.config.head_dim
        if head_dim & (head_dim - 1):
            return f"the fused decode attention needs a power-of-two head_dim, this model has {head_dim}"
        return None

    def use_decode_kernel(self, enabled: bool = True, linear: bool = True) -> None:
        """Run static decode steps (caches up to its MAX_CACHE_LEN) through the one-kernel decode attention, and
        with `linear` those of few rows through the fused projections of decode_linear.py too."""
        from smolvlm.model import decode_attention, decode_linear  # noqa: F401  (registers the ops)

        problem = self.decode_kernel_problem() if enabled else None
        if problem:
            raise ConfigError(problem)
        self.decode_kernel_max_len = decode_attention.MAX_CACHE_LEN if enabled else 0
        self.linear_kernels = enabled and linear

    def fuse_projections(self) -> None:
        """One GEMM for q/k/v and one for gate/up in every layer (inference only; kept across .to())."""
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs_embeds (B, T, D), attention_mask (B, past+T) with 1 = attend -> hidden states (B, T, D).

        Static-shape decoding (`cache_position` given, for torch.compile and CUDA graphs): one new token per row
        written at cache column `cache_position` ((1,) tensor); `attention_mask` then spans the whole cache
        (B, max_len) with 1 on every written column including this one, `position_ids` (B, 1) is required, and
        the caller advances the cache, so nothing here depends on Python-side state."""
        B, T, _ = inputs_embeds.shape
        if cache_position is not None:
            if cache is None or attention_mask is None or position_ids is None or T != 1:
                raise GenerationError("static decoding takes one token per row with a cache, a whole-cache "
                                      "attention_mask and position_ids")
            if cache.max_len <= self.decode_kernel_max_len:
                mask = attention_mask  # (B, max_len) 0/1, read by the kernel as it is
            else:  # additive, built once: SDPA would otherwise turn a boolean mask into this in every layer
                mask = torch.zeros(attention_mask.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
                mask = mask.masked_fill(attention_mask == 0, float("-inf"))[:, None, None, :]  # (B, 1, 1, max_len)
        else:
            past = cache.length if cache is not None else 0
            if attention_mask is not None and attention_mask.shape != (B, past + T):
                raise GenerationError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, cached + new) = "
                    f"({B}, {past + T}): it covers every cached token plus this step's, so append a column per step"
                )
            if position_ids is None:
                if attention_mask is None:
                    position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None].expand(B, T)
                else:
                    position_ids = position_ids_from_mask(attention_mask, T)
            mask = causal_padding_mask(attention_mask, past, T, inputs_embeds.device)
        rope = self.rotary(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        if self._decode_linear_step(mask, B):
            for layer in self.layers:
                x = layer.decode_step(x, rope, mask, cache, cache_position)
        else:
            for layer in self.layers:
                x = layer(x, rope, mask, cache, cache_position)
        if cache is not None and cache_position is None:  # static steps leave advancing to the caller
            cache.advance(T)
        return self.norm(x)

    def _decode_linear_step(self, mask: torch.Tensor | None, batch: int) -> bool:
        """Whether this forward is a static step that runs each layer as `DecoderLayer.decode_step`."""
        from smolvlm.model import decode_linear

        two_dim = mask is not None and mask.dim() == 2  # the fused decode attention's (B, max_len) mask
        return (self.linear_kernels and two_dim and batch <= decode_linear.MAX_BATCH
                and all(layer.linears_fused() for layer in self.layers))


class CausalLM(nn.Module):
    """Text-only SmolLM2 / Llama model; state-dict keys exactly those of transformers' LlamaForCausalLM."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.model = TextDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head with the token embedding when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V); with logits_to_keep=n > 0 only the last n positions."""
        embeds = self.model.embed_tokens(input_ids)  # (B, T, D)
        hidden = self.model(embeds, attention_mask, position_ids, cache, cache_position)  # (B, T, D)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden)

    @classmethod
    def from_pretrained(
        cls, path_or_name: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "CausalLM":
        """Load a Hugging Face llama folder (local path or hub id) with safetensors weights."""
        from smolvlm.weights.checkpoint import load_causal_lm

        return load_causal_lm(path_or_name, device=device, dtype=dtype)

    def save_pretrained(self, directory: str) -> None:
        """Write config.json + model.safetensors that transformers' LlamaForCausalLM loads."""
        from smolvlm.weights.checkpoint import save_causal_lm

        save_causal_lm(self, directory)
