"""The keys and values of the tokens generated so far, one buffer per attention layer.

`model.new_kv_cache()` makes one; `model(ids, kv_cache=cache)` appends the new tokens' keys and
values and attends over everything cached (`LayerKVCache.attend`), so that generation runs one
position per step instead of rerunning the whole sequence.

Two ways to fill it:
- all rows at one length (the default): `model(ids (B, T), kv_cache=cache)` appends T tokens
  to every row; the new tokens get positions cache.length ... cache.length + T - 1.
- rows of their own lengths (ragged batches, `fastgpt.generate`): after a prefill of
  right-padded prompts, `cache.set_lengths([n_0, n_1, ...])` says how many tokens of each row are
  real. From then on row b's new tokens are written at, and get the positions, lengths[b] ...,
  and attend to keys 0 .. their own position (a length mask): the padding after a short prompt
  is masked, then overwritten. The lengths are a (B,) int32 tensor on the device, advanced in
  place, so a decoding step needs no host sync and `torch.compile` (CUDA graphs included) can
  capture it; under compile the step attends over the whole preallocated buffer (static shapes),
  in eager mode over the keys cached so far.

Buffers of the full context are allocated once (`model.new_kv_cache(batch_size=...)` allocates
them at once, a static cache; otherwise on the first update) and reused after `reset()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: the cache is handed a backend's ops by the model
    from fastgpt.backends import Ops


class LayerKVCache:
    """Keys and values of one attention layer for the tokens seen so far.

    Buffers of shape (B, H, capacity, head_dim) get the dtype and device of the keys they
    receive (so autocast works) and are written in place. `length` is the number of positions
    in use (with per-row lengths, the longest row's); `lengths` is None, or the (B,) int32
    tensor of per-row lengths shared by every layer (set by `KVCache.set_lengths`)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0  # tokens cached so far (per-row lengths: the longest row's)
        self.lengths: torch.Tensor | None = None  # (B,) int32 on the device, or None
        self.step: tuple[torch.Tensor, ...] | None = None  # `step_masks` shared in one forward
        self.decode_lengths: list[torch.Tensor] | None = None  # shared by a step's layers
        self.k: torch.Tensor | None = None  # (B, H, capacity, hd)
        self.v: torch.Tensor | None = None  # (B, H, capacity, hd)

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
        """Make (or keep, when they match) the (B, H, capacity, hd) buffers."""
        if self.k is None or self.k.shape != shape or self.k.dtype != dtype:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, H, T_new, hd) to every row and return views of everything cached,
        (B, H, T_total, hd) each, where T_total = length before the call + T_new."""
        b, h, t_new, hd = k.shape
        if self.k is None or self.k.shape[:2] != (b, h) or self.k.dtype != k.dtype:
            if self.length != 0:
                raise ValueError(
                    f"KV cache holds {self.length} tokens for batch/heads/dtype "
                    f"{tuple(self.k.shape[:2])}/{self.k.dtype}, got keys {tuple(k.shape)} "
                    f"{k.dtype}; call reset() first"
                )
            self.allocate((b, h, self.capacity, hd), k.dtype, k.device)
        end = self.length + t_new
        if end > self.capacity:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {t_new} new tokens > capacity "
                f"{self.capacity} (the model's context_length); reset() and re-prefill"
            )
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        self.length = 0
        self.lengths = None
        self.step = None
        self.decode_lengths = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ops: Ops) -> torch.Tensor:
        """Cache k, v (B, H, T_new, hd) and attend the queries q (B, H, T_new, hd) over every
        cached key, causally (bottom-right: new query i sees the past and new keys up to i)
        with the backend `ops` -> (B, H, T_new, hd). No dropout: a cache serves generation.
        A one-token step runs the backend's `decode_attention` where it has one (the triton
        backend's split-KV kernel). With per-row lengths see `_attend_rows`."""
        if self.lengths is not None:
            return self._attend_rows(q, k, v, ops)
        k_all, v_all = self.update(k, v)  # (B, H, T_past + T_new, hd)
        if q.shape[2] == 1 and ops.decode_attention is not None:
            lengths = self._step_lengths(q.shape[0], q.device)
            return ops.decode_attention(q[:, :, 0], k_all, v_all, lengths)[:, :, None]
        return ops.attention(q, k_all, v_all, causal=True, dropout_p=0.0)

    def _step_lengths(self, batch: int, device) -> torch.Tensor:
        """(B,) int32, every row `length` keys: made by the first layer of a step that needs it
        and kept in the list `KVCache.positions` hands every layer (one tensor per step)."""
        shared = self.decode_lengths if self.decode_lengths is not None else []
        if not shared or shared[0].shape[0] != batch:
            shared[:] = [torch.full((batch,), self.length, dtype=torch.int32, device=device)]
        return shared[0]

    def _attend_rows(self, q, k, v, ops: Ops) -> torch.Tensor:
        """Per-row lengths: write row b's k, v (B, H, T, hd) at lengths[b] ..., attend each new
        query to its row's keys up to its own position (`ops.decode_attention` for one token
        where the backend has it, else `ops.masked_attention` under the length mask).
        `length` is advanced by `KVCache.advance`, after every layer."""
        t = k.shape[2]
        rows, pos, visible = self.step if self.step is not None else self.step_masks(t)
        self.k[rows, :, pos] = k.transpose(1, 2)  # (B, T, H, hd) into (B, H, capacity, hd)
        self.v[rows, :, pos] = v.transpose(1, 2)
        end = visible.shape[-1]
        keys, values = self.k[:, :, :end], self.v[:, :, :end]  # (B, H, end, hd)
        if t == 1 and ops.decode_attention is not None:
            ctx = ops.decode_attention(q[:, :, 0], keys, values, self.lengths + 1)  # (B, H, hd)
            return ctx[:, :, None]
        return ops.masked_attention(q, keys, values, visible)

    def step_masks(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For t new tokens per row: (rows (B, 1), positions (B, T), visible (B, 1, T, end)
        bool: key j seen by new query i of row b iff j <= lengths[b] + i). Eager: `end` is the
        keys in use so far; compiled: the whole buffer (one static shape)."""
        device = self.lengths.device
        pos = self.lengths.long()[:, None] + torch.arange(t, device=device)  # (B, T)
        rows = torch.arange(pos.shape[0], device=device)[:, None]  # (B, 1)
        end = self.capacity if torch.compiler.is_compiling() else self.length + t
        visible = torch.arange(end, device=device)[None, None, :] <= pos[:, :, None]
        return rows, pos, visible[:, None]


class KVCache:
    """One `LayerKVCache` per transformer block plus the number of positions consumed.

    Usage: `cache = model.new_kv_cache()`; `model(prompt, kv_cache=cache)` fills it (prefill);
    then `model(next_token (B, 1), kv_cache=cache)` runs one position at a time; the model
    takes the positions of the new tokens from `cache.positions` and calls `cache.advance`.
    """

    def __init__(self, n_layers: int, capacity: int):
        self.capacity = capacity
        self.layers = [LayerKVCache(capacity) for _ in range(n_layers)]
        self._lengths: torch.Tensor | None = None  # kept across resets: a static address

    @property
    def length(self) -> int:
        """Tokens cached so far (the position the next token will get); with per-row lengths,
        the longest row's."""
        return self.layers[0].length

    @property
    def lengths(self) -> torch.Tensor | None:
        """(B,) int32 per-row lengths on the device, or None when every row has `length`."""
        return self.layers[0].lengths

    def allocate(self, batch: int, heads: int, head_dim: int, dtype, device) -> None:
        """Preallocate every layer's (batch, heads, capacity, head_dim) buffers and the lengths
        (a static cache: `torch.compile` and CUDA graphs see the same tensors every step)."""
        for layer in self.layers:
            layer.allocate((batch, heads, self.capacity, head_dim), dtype, device)
        if self._lengths is None or self._lengths.shape != (batch,):
            self._lengths = torch.zeros(batch, dtype=torch.int32, device=device)

    def set_lengths(self, lengths: Sequence[int]) -> None:
        """Give each row its own length (host ints, each <= the `length` already cached, e.g.
        the prompts' lengths after prefilling them right-padded). Copied into one device tensor
        that is kept across calls (no host sync; a static address for CUDA graphs)."""
        lengths = [int(n) for n in lengths]
        k = self.layers[0].k
        if k is None or len(lengths) != k.shape[0]:
            raise ValueError(
                f"set_lengths needs one length per cached row after a prefill, got "
                f"{len(lengths)} lengths for a cache of batch "
                f"{None if k is None else k.shape[0]}"
            )
        if min(lengths) < 0 or max(lengths) > self.length:
            raise ValueError(f"lengths must lie in [0, {self.length}] (cached), got {lengths}")
        if self._lengths is None or self._lengths.shape != (len(lengths),):
            self._lengths = torch.zeros(len(lengths), dtype=torch.int32, device=k.device)
        self._lengths.copy_(torch.tensor(lengths, dtype=torch.int32), non_blocking=True)
        for layer in self.layers:
            layer.lengths, layer.length = self._lengths, max(lengths)
            layer.step = None

    def positions(self, t: int, device) -> torch.Tensor:
        """Positions of t new tokens: (T,) when every row has `length`, (B, T) with per-row
        lengths. Raises ValueError past the capacity (a host check, skipped under compile,
        where the caller keeps the lengths in range)."""
        if not torch.compiler.is_compiling() and self.length + t > self.capacity:
            past = f" after {self.length} cached tokens" if self.length else ""
            raise ValueError(
                f"sequence too long: {t} tokens{past} > context_length {self.capacity}"
            )
        if self.lengths is None:
            step_lengths: list[torch.Tensor] = []  # a decoding step's lengths, made lazily
            for layer in self.layers:
                layer.decode_lengths = step_lengths
            return torch.arange(self.length, self.length + t, device=device)
        step = self.layers[0].step_masks(t)
        if not torch.compiler.is_compiling():  # eager: one set of masks for every layer
            for layer in self.layers:
                layer.step = step
        return step[1]  # (B, T)

    def advance(self, t: int) -> None:
        """After a forward with per-row lengths: every row grew by t tokens (in place on the
        device). The host count `length` is left to `note_advanced` under compile."""
        if self.lengths is None:
            return  # each layer counted its own tokens in `update`
        for layer in self.layers:
            layer.step = None
        self.lengths.add_(t)
        if not torch.compiler.is_compiling():
            self.note_advanced(t)

    def note_advanced(self, t: int) -> None:
        """Count t more tokens on the host (what a compiled step, which touches only device
        tensors, leaves to its caller)."""
        for layer in self.layers:
            layer.length += t

    def reset(self) -> None:
        """Forget every cached token and the per-row lengths (buffers are kept and reused)."""
        for layer in self.layers:
            layer.reset()

    def __getitem__(self, i: int) -> LayerKVCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)
