"""The strongest plain-PyTorch GPT-2 to compare against: PyTorch's own fused ops.

`to_pytorch_fast(model)` rewires a `GPTModel` in place so that, with the same parameters,

- every LayerNorm calls `F.layer_norm`,
- every attention calls `F.scaled_dot_product_attention` (PyTorch picks flash /
  memory-efficient / cuDNN / math by itself),
- every feed-forward calls `F.gelu(approximate="tanh")` between its two Linear layers.

Together with `torch.compile` and `torch.optim.AdamW(fused=True)` this is the book's fastest
single-GPU recipe. fastgpt's model has no built-in switch to SDPA (its backends are our
kernels or the book's references), so the benchmark swaps the modules here instead; the
parameters (and their names in the state dict) are shared with the original modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastgpt.model import GPTModel, LayerKVCache


class TorchLayerNorm(nn.Module):
    """`F.layer_norm` with the weight and bias of an existing fastgpt LayerNorm."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class SDPAAttention(nn.Module):
    """Causal self-attention through `F.scaled_dot_product_attention`, with the `qkv` and
    `out_proj` of an existing fastgpt MultiHeadAttention (same [q | k | v] layout)."""

    def __init__(self, att: nn.Module):
        super().__init__()
        self.num_heads = att.num_heads
        self.head_dim = att.head_dim
        self.d_out = att.d_out
        self.dropout = att.dropout
        self.qkv = att.qkv
        self.out_proj = att.out_proj

    def forward(self, x: torch.Tensor, kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, d_in)
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, H, T_past + T, hd)
        dropout_p = self.dropout if self.training else 0.0
        t_keys = k.shape[-2]
        if t_keys == t:
            ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif t == 1:  # one new query sees every cached key: no mask
            ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            # SDPA's is_causal aligns the mask top-left; queries that continue a cache need it
            # bottom-right (query i sees keys up to t_past + i).
            i = torch.arange(t, device=x.device)[:, None]
            j = torch.arange(t_keys, device=x.device)[None, :]
            allowed = j <= i + (t_keys - t)  # (T, T_keys)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        ctx = ctx.transpose(1, 2).reshape(b, t, self.d_out)  # (B, T, d_out)
        return self.out_proj(ctx)


class TorchFeedForward(nn.Module):
    """fc1 -> `F.gelu(approximate="tanh")` -> fc2, with the Linear layers of a fastgpt
    FeedForward."""

    def __init__(self, ff: nn.Module):
        super().__init__()
        self.fc1 = ff.fc1
        self.fc2 = ff.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def to_pytorch_fast(model: GPTModel) -> GPTModel:
    """Swap every LayerNorm, attention and feed-forward of `model` for the PyTorch-op modules
    above, in place, and return it. The parameters stay the same tensors."""
    for block in model.trf_blocks:
        block.norm1 = TorchLayerNorm(block.norm1)
        block.att = SDPAAttention(block.att)
        block.norm2 = TorchLayerNorm(block.norm2)
        block.ff = TorchFeedForward(block.ff)
    model.final_norm = TorchLayerNorm(model.final_norm)
    return model
