"""The keys and values of the tokens generated so far: one pair of buffers per attention layer.

`model.new_kv_cache()` makes one; `model(ids, kv_cache=cache, cache_lengths=lengths)` writes the
new tokens' keys and values after the tokens each row already holds and attends over everything
cached (`LayerKVCache.attend`), so that generation runs one position per step instead of
rerunning the whole sequence.

How many tokens each row holds is a `CacheLengths`, kept by whoever drives the cache: a decoding
loop (`fastgpt.generate`) owns one, passes it at every step and advances it after the step (as
gpt-fast's loop owns `input_pos`). A caller that passes none continues the cache's own count,
`cache.filled`, which the model advances: `model(ids, kv_cache=cache)` appends.

Two kinds of lengths:
- every row one length (`rows` None, the default): T new tokens get positions
  longest ... longest + T - 1, are written as one slice and attend causally (no masks).
- rows of their own lengths (ragged batches: after a prefill of right-padded prompts,
  `CacheLengths(max(n), rows=(n_0, n_1, ...) on the device)`): row b's new tokens are written
  at, and get the positions, rows[b] ..., and attend to keys 0 .. their own position (a length
  mask): the padding after a short prompt is masked, then overwritten. The per-row lengths are
  a (B,) int32 device tensor advanced in place, so a decoding step needs no host sync and
  `torch.compile` (CUDA graphs included) can capture it; under compile the step attends over
  the whole preallocated buffer (static shapes), in eager mode over the keys cached so far.

Buffers of the full context are allocated once (`model.new_kv_cache(batch_size=...)` allocates
them at once, a static cache; otherwise on the first write) and reused after `reset()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: the cache is handed a backend's ops by the model
    from fastgpt.backends import Ops


class CacheLengths:
    """How many tokens each row of a KV cache holds: `longest` (a host int, the longest row's;
    every row's when `rows` is None) and `rows`, None or the (B,) int32 per-row counts on the
    device. `model(..., cache_lengths=...)` reads it; its owner advances it after the forward."""

    def __init__(self, longest: int = 0, rows: torch.Tensor | None = None):
        self.longest = longest
        self.rows = rows

    def advance(self, t: int) -> None:
        """Every row grew by t tokens (the per-row counts in place: no host sync, and the same
        address for CUDA graphs)."""
        self.longest += t
        if self.rows is not None:
            self.rows.add_(t)


@dataclass(frozen=True)
class CacheStep:
    """Where one forward's T new tokens go in every layer's buffers and what they attend to:
    made once per forward by `KVCache.step` from the lengths before it, read by every layer."""

    positions: torch.Tensor  # (T,) with one length for every row, (B, T) with per-row lengths
    start: int  # one length: the first new position (the new keys fill [start, end))
    end: int  # keys attended: [0, end) (compiled per-row steps: the whole buffer)
    rows: torch.Tensor | None  # (B, 1) row index of a per-row write, None for a slice write
    visible: torch.Tensor | None  # (B, 1, T, end) bool: key j seen by new query i of row b
    decode_lengths: torch.Tensor | None  # (B,) int32 keys per row for a one-token decode op


class LayerKVCache:
    """Keys and values of one attention layer: buffers of shape (B, H, capacity, head_dim) that
    get the dtype and device of the keys they receive (so autocast works), written in place."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.k: torch.Tensor | None = None  # (B, H, capacity, hd)
        self.v: torch.Tensor | None = None  # (B, H, capacity, hd)

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
        """Make (or keep, when they match) the (B, H, capacity, hd) buffers."""
        if self.k is None or self.k.shape != shape or self.k.dtype != dtype:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T_new, hd) at positions start ... of every row and return views of
        the keys and values up to them, (B, H, start + T_new, hd) each."""
        b, h, t_new, hd = k.shape
        if self.k is None or self.k.shape[:2] != (b, h) or self.k.dtype != k.dtype:
            if start != 0 and self.k is not None:
                raise ValueError(
                    f"KV cache holds {start} tokens for batch/heads/dtype "
                    f"{tuple(self.k.shape[:2])}/{self.k.dtype}, got keys {tuple(k.shape)} "
                    f"{k.dtype}; call reset() first"
                )
            self.allocate((b, h, self.capacity, hd), k.dtype, k.device)
        end = start + t_new
        if end > self.capacity:
            raise ValueError(
                f"KV cache overflow: {start} cached + {t_new} new tokens > capacity "
                f"{self.capacity} (the model's context_length); reset() and re-prefill"
            )
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: CacheStep, ops: Ops
    ) -> torch.Tensor:
        """Cache k, v (B, H, T_new, hd) where `step` says and attend the queries q (B, H, T_new,
        hd) over every cached key of their row, causally (new query i sees the past and the new
        keys up to i), with the backend `ops` -> (B, H, T_new, hd). No dropout: a cache serves
        generation. A one-token step runs the backend's `decode_attention` where it has one
        (the triton backend's split-KV kernel); otherwise rows of one length run plain causal
        attention, rows of their own lengths `ops.masked_attention` under the length mask."""
        decode = step.decode_lengths is not None and ops.decode_attention is not None
        if step.rows is None:
            keys, values = self.update(k, v, step.start)  # (B, H, T_past + T_new, hd)
            if decode:
                return ops.decode_attention(q[:, :, 0], keys, values, step.decode_lengths)[
                    :, :, None
                ]
            return ops.attention(q, keys, values, causal=True, dropout_p=0.0)
        self.k[step.rows, :, step.positions] = k.transpose(1, 2)  # (B, T, H, hd) scattered
        self.v[step.rows, :, step.positions] = v.transpose(1, 2)
        keys, values = self.k[:, :, : step.end], self.v[:, :, : step.end]  # (B, H, end, hd)
        if decode:
            ctx = ops.decode_attention(q[:, :, 0], keys, values, step.decode_lengths)  # (B, H, hd)
            return ctx[:, :, None]
        return ops.masked_attention(q, keys, values, step.visible)


class KVCache:
    """One `LayerKVCache` per transformer block, and `filled`: the lengths that a forward given
    no `cache_lengths` continues (and advances).

    Usage: `cache = model.new_kv_cache()`; `model(prompt, kv_cache=cache)` fills it (prefill);
    then `model(next_token (B, 1), kv_cache=cache)` runs one position at a time. A decoding loop
    keeps its own `CacheLengths` instead: `model(ids, kv_cache=cache, cache_lengths=lengths)`,
    then `lengths.advance(T)`.
    """

    def __init__(self, n_layers: int, capacity: int):
        self.capacity = capacity
        self.layers = [LayerKVCache(capacity) for _ in range(n_layers)]
        self.filled = CacheLengths()

    @property
    def length(self) -> int:
        """Tokens `filled` so far (the position the next token will get); with per-row lengths,
        the longest row's."""
        return self.filled.longest

    @property
    def lengths(self) -> torch.Tensor | None:
        """`filled`'s (B,) int32 per-row lengths on the device, or None when every row has
        `length`."""
        return self.filled.rows

    def allocate(self, batch: int, heads: int, head_dim: int, dtype, device) -> None:
        """Preallocate every layer's (batch, heads, capacity, head_dim) buffers (a static cache:
        `torch.compile` and CUDA graphs see the same tensors every step)."""
        for layer in self.layers:
            layer.allocate((batch, heads, self.capacity, head_dim), dtype, device)

    def set_lengths(self, lengths: Sequence[int]) -> None:
        """Give each row of `filled` its own length (host ints, each <= the `length` already
        cached, e.g. the prompts' lengths after prefilling them right-padded)."""
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
        rows = torch.tensor(lengths, dtype=torch.int32).to(k.device, non_blocking=True)
        self.filled = CacheLengths(max(lengths), rows)

    def step(self, token_ids: torch.Tensor, lengths: CacheLengths | None, ops: Ops) -> CacheStep:
        """Where the new tokens token_ids (B, T) go after `lengths` (None: `filled`), for layers
        running `ops` (no side effects). Raises ValueError past the capacity (a host check,
        skipped under compile, where the caller keeps the lengths in range)."""
        lengths = self.filled if lengths is None else lengths
        (batch, t), device = token_ids.shape, token_ids.device
        compiling = torch.compiler.is_compiling()
        if not compiling and lengths.longest + t > self.capacity:
            past = f" after {lengths.longest} cached tokens" if lengths.longest else ""
            raise ValueError(
                f"sequence too long: {t} tokens{past} > context_length {self.capacity}"
            )
        decode = t == 1 and ops.decode_attention is not None  # (B,) lengths for its kernel
        if lengths.rows is None:
            start = lengths.longest
            positions = torch.arange(start, start + t, device=device)  # (T,)
            decode_lengths = None
            if decode:  # every row sees start + 1 keys
                decode_lengths = torch.full((batch,), start + 1, dtype=torch.int32, device=device)
            return CacheStep(positions, start, start + t, None, None, decode_lengths)
        device = lengths.rows.device
        positions = lengths.rows.long()[:, None] + torch.arange(t, device=device)  # (B, T)
        rows = torch.arange(positions.shape[0], device=device)[:, None]  # (B, 1)
        end = self.capacity if compiling else lengths.longest + t  # compiled: one static shape
        visible = torch.arange(end, device=device)[None, None, :] <= positions[:, :, None]
        decode_lengths = lengths.rows + 1 if decode else None
        return CacheStep(positions, 0, end, rows, visible[:, None], decode_lengths)

    def reset(self) -> None:
        """Forget every cached token and the per-row lengths (buffers are kept and reused)."""
        self.filled = CacheLengths()

    def __getitem__(self, i: int) -> LayerKVCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)
