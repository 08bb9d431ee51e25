"""The one place where a model's LayerNorm, feed-forward GELU, attention and output-head loss
get their implementation.

- "triton": our kernels: LayerNorm (fused with the residual add before it), bias+GELU fused
  after the bias-free matmul, flash attention, and the fused linear + cross-entropy (the
  (B·T, V) logits never exist); a decoding step's attention is the split-KV decode kernel;
- "torch": the plain-PyTorch references beside each kernel (the book's math), the loss from
  the logits upcast to fp32; a KV cache's masked attention the reference's math;
- "sdpa": `F.layer_norm`, `F.gelu(approximate="tanh")`, `F.scaled_dot_product_attention`, the
  loss as "torch";
- "auto": the fastest for the device: "triton" on a CUDA GPU of compute capability 8.0 on;
  on an older one (sm_75, T4), where Triton's dots are FMA loops and the attention kernels
  refuse to run, "triton+sdpa" (our LayerNorm, GELU and fused loss, which have no dots, with
  SDPA's attention); on a CPU "sdpa" (PyTorch's fused ops beat the plain references, and the
  kernels would run as those references or through Triton's interpreter).

"sdpa" is PyTorch's own fastest ops, the baseline the benchmarks compare against. "torch" is the
book's math, op for op: the tests that pin the book's numbers ask for it by name. Every
backend computes the same function with the same parameters, so `GPTModel.set_backend` switches
one in place. (The kernels themselves also run on CPU tensors: through Triton's interpreter
when TRITON_INTERPRET=1, else as their references; see `kernels/_dispatch.py`.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fastgpt.kernels import (
    add_layer_norm,
    add_layer_norm_reference,
    attention,
    attention_reference,
    attention_varlen,
    attention_varlen_reference,
    bias_gelu,
    decode_attention,
    fused_linear_cross_entropy,
    gelu,
    gelu_reference,
    layer_norm,
    layer_norm_reference,
)
from fastgpt.kernels._dispatch import TENSOR_CORE_CAPABILITY


@dataclass(frozen=True)
class Ops:
    """The implementations one backend gives the model's layers."""

    name: str
    layer_norm: Callable[..., torch.Tensor]
    """(x (..., d), weight (d,), bias (d,), eps) -> normalized x."""
    linear_gelu: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    """(linear layer d -> 4d, x (..., d)) -> GELU(linear(x)) (..., 4d), tanh form."""
    attention: Callable[..., torch.Tensor]
    """(q (B, H, Tq, hd), k, v (B, H, Tk, hd), causal, dropout_p) -> (B, H, Tq, hd); causal is
    aligned bottom-right (query i sees keys up to Tk - Tq + i), as a KV cache needs."""
    head_loss: Callable[..., torch.Tensor]
    """(x (B, T, d), head (Linear d -> V'), vocab_size V <= V', targets (B, T) long,
    ignore_index) -> the mean cross-entropy of the logits' first V columns over the targets
    that are not ignore_index, fp32."""
    add_layer_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    """(x (..., d), residual (..., d), weight (d,), bias (d,), eps) -> (layer_norm(residual +
    x), residual + x): a residual add fused with the LayerNorm that follows it. None (the
    default): `residual + x`, then this backend's `layer_norm`."""
    attention_varlen: Callable[..., torch.Tensor] | None = None
    """(q (N, H, hd), k, v (N, H, hd), cu_seqlens_q, cu_seqlens_k (S + 1,) int32, max_seqlen_q,
    max_seqlen_k, causal, dropout_p) -> (N, H, hd): attention within each of S sequences packed
    along the token axis (`kernels.attention_varlen`'s conventions). None: not available."""
    masked_attention: Callable[..., torch.Tensor] | None = None
    """(q (B, H, Tq, hd), k, v (B, H, Tk, hd), visible (B, 1, Tq, Tk) bool) -> (B, H, Tq, hd):
    attention under an explicit mask, no dropout (a KV cache whose rows have lengths of their
    own; every query sees at least one key). None (the default): SDPA with the mask."""
    decode_attention: Callable[..., torch.Tensor] | None = None
    """(q (B, H, hd), k, v (B, H, Tk, hd), lengths (B,) int32) -> (B, H, hd): one query per row
    against the first lengths[b] cached keys of its row (a decoding step). None (the default):
    ragged rows use `masked_attention`, rows of one length `attention` (one query, no mask)."""

    def __post_init__(self) -> None:
        if self.add_layer_norm is None:  # frozen: set once, here
            object.__setattr__(self, "add_layer_norm", partial(_add_then_norm, self.layer_norm))
        if self.masked_attention is None:
            object.__setattr__(self, "masked_attention", _sdpa_masked_attention)


def _add_then_norm(layer_norm, x, residual, weight, bias, eps):
    """The unfused add_layer_norm of a backend: `residual + x`, then its `layer_norm`."""
    new_residual = residual + x
    return layer_norm(new_residual, weight, bias, eps), new_residual


def _logits_loss(head, x, vocab_size, targets, ignore_index=-100):
    """The loss from the full (B, T, V) logits, upcast to fp32 (a softmax over 50k classes
    wants fp32), as the book computes it."""
    logits = head(x)[..., :vocab_size]  # (B, T, V)
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index
    )


def _fused_head_loss(head, x, vocab_size, targets, ignore_index=-100):
    """The loss without the (B·T, V) logits: our chunked fused linear + cross-entropy on the
    whole head, padded rows included (aligned matmuls), its first vocab_size rows the classes
    (a padded vocabulary's extra rows get no probability and no gradient)."""
    if not isinstance(head, nn.Linear):  # a wrapped head (LoRA) computes its own logits
        return _logits_loss(head, x, vocab_size, targets, ignore_index)
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):  # the head's matmul as autocast would run it
        dtype = torch.get_autocast_dtype(x.device.type)
    weight = head.weight.to(dtype)  # (V', d), V' = vocab_size rounded up to vocab_multiple
    bias = head.bias.to(dtype) if head.bias is not None else None
    hidden = x.flatten(0, 1).to(dtype)  # (B·T, d)
    # The model checked the targets (or its data was checked once): no sync here.
    return fused_linear_cross_entropy(
        hidden, weight, targets.flatten(), bias, ignore_index=ignore_index,
        num_classes=vocab_size, check_targets=False,
    )  # fmt: skip


def _triton_linear_gelu(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(linear, nn.Linear) and linear.bias is not None:
        # One kernel adds the bias and applies GELU, saving a pass over (B, T, 4d).
        return bias_gelu(F.linear(x, linear.weight), linear.bias)
    return gelu(linear(x))  # a wrapped layer (e.g. LoRA) computes its own output


def masked_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """The reference attention's math (fp32 softmax) with an explicit mask: q (B, H, Tq, hd),
    k/v (B, H, Tk, hd), visible (B, 1, Tq, Tk) bool (every query sees at least one key)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(compute) @ k.to(compute).transpose(-2, -1)) * q.shape[-1] ** -0.5
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return (weights @ v.to(compute)).to(q.dtype)  # (B, H, Tq, hd)


def _sdpa_masked_attention(q, k, v, visible):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)


def _sdpa_layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _sdpa_attention(q, k, v, causal: bool = True, dropout_p: float = 0.0) -> torch.Tensor:
    tq, tk = q.shape[-2], k.shape[-2]
    if not causal or tq == 1:  # one new query sees every cached key: no mask
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    # SDPA's is_causal aligns the mask top-left; queries that continue a cache need it
    # bottom-right (query i sees keys up to Tk - Tq + i).
    i = torch.arange(tq, device=q.device)[:, None]
    j = torch.arange(tk, device=q.device)[None, :]
    allowed = j <= i + (tk - tq)  # (Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)


def _sdpa_attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
    causal: bool = True, dropout_p: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """SDPA once per packed sequence: q (Nq, H, hd), k, v (Nk, H, hd) -> (Nq, H, hd)."""
    pieces = []
    bounds = zip(cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), strict=True)  # one sync
    (q0, k0), *rest = bounds
    for q1, k1 in rest:
        # rows of one sequence (T, H, hd) -> (1, H, T, hd), SDPA's layout, and back
        qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t, a, b in
                      ((q, q0, q1), (k, k0, k1), (v, k0, k1)))  # fmt: skip
        pieces.append(_sdpa_attention(qi, ki, vi, causal, dropout_p)[0].transpose(0, 1))
        q0, k0 = q1, k1
    return torch.cat(pieces) if pieces else q * 0.0


BACKENDS: dict[str, Ops] = {
    "triton": Ops(
        "triton",
        layer_norm,
        _triton_linear_gelu,
        attention,
        _fused_head_loss,
        add_layer_norm=add_layer_norm,
        # The model's cu_seqlens come from `packed_rows`, valid as built: not re-read (a sync)
        # in every layer.
        attention_varlen=partial(attention_varlen, check_cu_seqlens=False),
        decode_attention=decode_attention,
    ),
    "torch": Ops(
        "torch",
        layer_norm_reference,
        lambda linear, x: gelu_reference(linear(x)),
        attention_reference,
        _logits_loss,
        add_layer_norm=add_layer_norm_reference,
        attention_varlen=attention_varlen_reference,
        masked_attention=masked_attention_reference,
    ),
    "sdpa": Ops(
        "sdpa",
        _sdpa_layer_norm,
        lambda linear, x: F.gelu(linear(x), approximate="tanh"),
        _sdpa_attention,
        _logits_loss,  # add_layer_norm: `residual + x`, then F.layer_norm
        attention_varlen=_sdpa_attention_varlen,
    ),
}


# "auto" on a CUDA GPU below sm_80: the row-wise kernels, PyTorch's attention (not a name
# one asks for: "triton" there refuses attention in one line, naming "sdpa").
TRITON_WITH_SDPA_ATTENTION = replace(
    BACKENDS["triton"],
    name="triton+sdpa",
    attention=_sdpa_attention,
    attention_varlen=_sdpa_attention_varlen,
    decode_attention=None,
)


def resolve_backend(backend: str) -> Ops:
    """The Ops of a backend name; "auto" is "triton" on a CUDA GPU of compute capability 8.0
    on, TRITON_WITH_SDPA_ATTENTION on an older one, "sdpa" without CUDA."""
    if backend == "auto":
        if not torch.cuda.is_available():
            return BACKENDS["sdpa"]
        if torch.cuda.get_device_capability() < TENSOR_CORE_CAPABILITY:
            return TRITON_WITH_SDPA_ATTENTION
        backend = "triton"
    if backend not in BACKENDS:
        names = ("auto", *BACKENDS)
        raise ValueError(f"backend must be one of {names}, got {backend!r}")
    return BACKENDS[backend]
