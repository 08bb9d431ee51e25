"""The keys and values of the tokens generated so far, one buffer per attention layer.

`model.new_kv_cache()` makes one; `model(ids, kv_cache=cache)` appends the new tokens' keys and
values and attends over everything cached (`LayerKVCache.attend`), so that generation runs one
position per step instead of rerunning the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class LayerKVCache:
    """Keys and values of one attention layer for the tokens seen so far.

    Buffers of shape (B, H, capacity, head_dim) are allocated on the first `update`, with the
    dtype and device of the keys it receives (so autocast works), and written in place.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0  # tokens cached so far
        self.k: torch.Tensor | None = None  # (B, H, capacity, hd)
        self.v: torch.Tensor | None = None  # (B, H, capacity, hd)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, H, T_new, hd) and return views of everything cached,
        (B, H, T_total, hd) each, where T_total = length before the call + T_new."""
        b, h, t_new, hd = k.shape
        if self.k is None or self.k.shape[:2] != (b, h) or self.k.dtype != k.dtype:
            if self.length != 0:
                raise ValueError(
                    f"KV cache holds {self.length} tokens for batch/heads/dtype "
                    f"{tuple(self.k.shape[:2])}/{self.k.dtype}, got keys {tuple(k.shape)} "
                    f"{k.dtype}; call reset() first"
                )
            shape = (b, h, self.capacity, hd)
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
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

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        """Cache k, v (B, H, T_new, hd) and attend the queries q (B, H, T_new, hd) over every
        cached key, causally (bottom-right: new query i sees the past and new keys up to i)
        with `attention` (a backend's op) -> (B, H, T_new, hd). No dropout: a cache serves
        generation."""
        k_all, v_all = self.update(k, v)  # (B, H, T_past + T_new, hd)
        return attention(q, k_all, v_all, causal=True, dropout_p=0.0)


class KVCache:
    """One `LayerKVCache` per transformer block plus the number of positions consumed.

    Usage: `cache = model.new_kv_cache()`; `model(prompt, kv_cache=cache)` fills it (prefill);
    then `model(next_token (B, 1), kv_cache=cache)` runs one position at a time; the model
    takes the position of the new tokens from `cache.length`.
    """

    def __init__(self, n_layers: int, capacity: int):
        self.capacity = capacity
        self.layers = [LayerKVCache(capacity) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """Tokens cached so far (the position the next token will get)."""
        return self.layers[0].length

    def reset(self) -> None:
        """Forget every cached token (buffers are kept and reused)."""
        for layer in self.layers:
            layer.reset()

    def __getitem__(self, i: int) -> LayerKVCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)
