"""Static key/value cache: preallocated per-layer buffers the text decoder writes into and attends over.

One write position is shared by every row of the batch (rows of different lengths are left-padded and the padding
is masked), so a decode step copies one column per layer and attends over a view — no concatenation, no allocation.
The decoder calls `update` once per layer and `advance` once per forward, after its last layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from smolvlm.config import TextConfig
from smolvlm.errors import GenerationError


class KVCache:
    """Per-layer key/value buffers of shape (B, kv_heads, max_len, head_dim) and a shared write position."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1 or max_len < 1:
            raise GenerationError(f"KVCache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}")
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        # Zeros, not empty: static-shape decoding attends over the whole buffer with unwritten columns masked, and
        # a masked NaN from uninitialised memory would still poison the output (0 * NaN = NaN). One allocation.
        buffers = torch.zeros(2, num_layers, *shape, dtype=dtype, device=device)
        self.keys, self.values = list(buffers[0].unbind(0)), list(buffers[1].unbind(0))
        self.max_len = max_len
        self.length = 0  # tokens stored so far (the write position)
        self.pointers: torch.Tensor | None = None  # see bind_pointers

    @classmethod
    def for_config(
        cls,
        config: TextConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "KVCache":
        """A cache sized for a text decoder built from `config`."""
        return cls(
            config.num_hidden_layers,
            batch_size,
            config.num_key_value_heads,
            config.head_dim,
            max_len,
            dtype=dtype,
            device=device,
        )

    @property
    def batch_size(self) -> int:
        """Rows currently held."""
        return self.keys[0].shape[0]

    def bind_pointers(self, table: torch.Tensor | None = None) -> torch.Tensor:
        """Write where every layer's key and value buffer starts into `table` ((2, layers) int64 on the cache's
        device, a new one if None), keep it as `pointers` and return it. A kernel that reaches the cache through
        this table leaves no buffer address in a CUDA graph, so the graph replays over any cache bound to it.
        The table holds addresses in 16-byte units: multiplied back in the kernel, they tell the compiler the
        buffers are 16-byte aligned, so that it loads them in vectors."""
        addresses = [[k.data_ptr() for k in self.keys], [v.data_ptr() for v in self.values]]
        if any(a % 16 for row in addresses for a in row):
            raise GenerationError("KV cache buffers must start at 16-byte aligned addresses for the address table")
        units = torch.tensor(addresses) // 16
        if table is None:
            table = units.to(self.keys[0].device)
        else:
            table.copy_(units)
        self.pointers = table
        return table

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values (B, kv_heads, T, hd) at the write position; return views of all so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise GenerationError(
                f"KV cache is full: {self.length} tokens stored + {k.shape[2]} new > max_len {self.max_len}; "
                "allocate a longer cache (prompt length + max_new_tokens)"
            )
        key_buf, value_buf = self.keys[layer], self.values[layer]
        key_buf[:, :, self.length : end] = k
        value_buf[:, :, self.length : end] = v
        return key_buf[:, :, :end], value_buf[:, :, :end]  # (B, kv_heads, end, hd) each

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Static-shape update: write (B, kv_heads, T, hd) at the positions of the (T,) tensor `cache_position` and
        return the whole buffers. No Python-side position is read, so the step compiles / graph-captures once."""
        self.keys[layer].index_copy_(2, cache_position, k)
        self.values[layer].index_copy_(2, cache_position, v)
        return self.keys[layer], self.values[layer]  # (B, kv_heads, max_len, hd) each

    def advance(self, n: int) -> None:
        """Commit `n` tokens written by the last forward (the decoder calls this after its last layer)."""
        self.length += n

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (e.g. to reuse a shared prompt prefix)."""
        if not 0 <= length <= self.length:
            raise GenerationError(f"cannot crop a cache of {self.length} tokens to {length}")
        self.length = length

    def reset(self) -> None:
        """Empty the cache, keeping its buffers for the next request."""
        self.length = 0

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows start..stop of these buffers at the same write position (writes land here)."""
        if not 0 <= start < stop <= self.batch_size:
            raise GenerationError(f"cannot take rows {start}..{stop} of a cache of {self.batch_size}")
        view = KVCache.__new__(KVCache)
        view.keys = [buf[start:stop] for buf in self.keys]
        view.values = [buf[start:stop] for buf in self.values]
        view.max_len, view.length, view.pointers = self.max_len, self.length, None
        return view

    def select(self, rows: Sequence[int] | torch.Tensor) -> None:
        """Keep only the given batch rows, in the given order (drop finished sequences, reorder beams)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.keys[0].device)
        if index.numel() == 0:
            raise GenerationError("KVCache.select needs at least one row")
        self.keys = [buf.index_select(0, index) for buf in self.keys]
        self.values = [buf.index_select(0, index) for buf in self.values]
        self.pointers = None  # new buffers: bind_pointers again
