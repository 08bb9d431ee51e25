"""Flash attention with a fused causal mask. (STUB: the Triton kernel is being written.)"""

from __future__ import annotations

import math

import torch


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    sm_scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The book's attention: scores, -inf above the (bottom-right aligned) diagonal, softmax,
    dropout, weighted sum. q: (B, H, Tq, D), k/v: (B, H, Tk, D) -> (B, H, Tq, D)."""
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:
        i = torch.arange(tq, device=q.device)[:, None]
        j = torch.arange(tk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (tk - tq), float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see no key -> zeros
    if dropout_mask is not None:
        weights = weights * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, dropout_p)
    return (weights @ v.float()).to(q.dtype)


def attention(q, k, v, causal=True, sm_scale=None, dropout_p=0.0, seed=None):
    return attention_reference(q, k, v, causal, sm_scale, dropout_p)
