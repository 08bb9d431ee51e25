"""Residual add fused with the LayerNorm that follows it: Triton forward and backward, and its
PyTorch reference.

    new_residual = residual + x
    normed = (new_residual - mean) / sqrt(var + eps) * weight + bias     per row (last dim)

`add_layer_norm(x, residual, weight, bias, eps)` -> (normed, new_residual). In a pre-LayerNorm
transformer x is a branch's output (attention, feed-forward) and residual the stream it is
added to: one kernel reads both, writes the new stream and its normalization, where the unfused
`residual + x` then `layer_norm` reads the stream three times and writes it twice. The idea of
flash-attention's `layer_norm_fn(x, weight, bias, residual=..., prenorm=True)`.

Dtypes: new_residual has the dtype of `residual + x` in PyTorch (`torch.result_type`: the
stream's dtype whenever the branch output is not wider, as in a model under autocast, an fp32
stream plus a bf16 branch), rounded exactly as PyTorch's add rounds it, and normed is the
LayerNorm of that rounded tensor, in the same dtype. Statistics are fp32 (biased variance), as
in `kernels/normalization.py`; x and residual may each be fp32, fp16 or bf16.

Backward: the gradient reaching new_residual is the incoming one plus the LayerNorm backward
of normed's gradient; that one tensor is the gradient of x and of residual both (cast to each
one's dtype). dweight/dbias are reduced in a fixed order: bitwise deterministic.

Where it runs (see `kernels/_dispatch.py`): CUDA tensors run the Triton kernels, CPU tensors
run them through Triton's interpreter when TRITON_INTERPRET=1, else `add_layer_norm_reference`.
Registered as the `torch.library` ops `fastgpt::add_layer_norm_forward` / `_backward` with an
autograd formula, so `torch.compile(fullgraph=True)` traces it. The kernels and launchers are
LayerNorm's (kernels/normalization.py: `layer_norm_forward` given the residual,
`layer_norm_backward` given its gradient, the kernels' residual flags on), and so are the
tiles, their tuning on a GPU and the widest single tile (`normalization.MAX_BLOCK_N`): the same
row widths take the looping path.
x and residual are viewed as (M, N) rows with `reshape`; only the last dimension must be
contiguous (a row stride is passed), else they are copied once.
"""

from __future__ import annotations

import torch

from ._dispatch import check_gpu, use_triton
from .normalization import (
    check_layer_norm_inputs,
    layer_norm_backward,
    layer_norm_forward,
    layer_norm_reference,
)


def add_layer_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The book's math in plain PyTorch: exactly `residual + x`, then `layer_norm_reference`.
    x, residual: (..., N); weight, bias: (N,) -> (normed, new_residual), both (..., N)."""
    new_residual = residual + x
    return layer_norm_reference(new_residual, weight, bias, eps), new_residual


# --- The kernels' math for this op -------------------------------------------------------
#
# LayerNorm's launchers and kernels run this op (kernels/normalization.py: `layer_norm_forward`
# with a residual launches `_layer_norm_forward_kernel` with HAS_RESIDUAL=True,
# `layer_norm_backward` with dresidual `_layer_norm_backward_kernel` with HAS_DRESIDUAL=True),
# with LayerNorm's tiles and their tuning (the buckets named "add_layer_norm.forward" /
# ".backward").
#
# Forward, per row (a program handles BLOCK_M rows × BLOCK_N columns): s = residual + x, added
# in fp32 and rounded to s's dtype (fp32 has more than 2p + 2 bits for p = 11 (fp16) and 8
# (bf16), so this double rounding equals PyTorch's correctly rounded 16-bit add), stored, then
# LayerNorm of the rounded s exactly as the plain LayerNorm of x: sums over d = s - s₀
# (s₀ the row's first element, as stored), two passes, mean and rstd saved for the backward.
#
# Backward, with ŝ = (s - mean) · rstd, g = w · dy and ds_in the gradient reaching s from its
# other uses (the rest of the residual stream):
#     ds = ds_in + rstd · (g - ŝ · mean(g · ŝ) - mean(g)),   dw = Σ_rows dy · ŝ,   db = Σ_rows dy
# ds is the gradient of both x and residual. dw/db: each of P programs walks row tiles pid,
# pid + P, ... and writes its share to row pid of a (P, N) fp32 buffer, summed over dim 0 by
# the launcher: no atomics, a fixed order.
#
# Rows wider than a tile (SINGLE_TILE=False) loop over column chunks: the forward's first pass
# adds and stores s, the later passes read s back (after a barrier); the backward adds each
# chunk's dw/db into its own buffer row (the buffers start zeroed, a barrier after each chunk).


# --- torch.library ops -------------------------------------------------------------------


@torch.library.custom_op("fastgpt::add_layer_norm_forward", mutates_args=())
def _add_layer_norm_forward_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    normed, mean, rstd, new_residual = layer_norm_forward(x, weight, bias, eps, residual=residual)
    return normed, new_residual, mean, rstd


@_add_layer_norm_forward_op.register_fake
def _(x, residual, weight, bias, eps):
    dtype = torch.result_type(residual, x)
    stats = x.shape[:-1]
    return (
        x.new_empty(x.shape, dtype=dtype),
        x.new_empty(x.shape, dtype=dtype),
        x.new_empty(stats, dtype=torch.float32),
        x.new_empty(stats, dtype=torch.float32),
    )


@torch.library.custom_op("fastgpt::add_layer_norm_backward", mutates_args=())
def _add_layer_norm_backward_op(
    dnormed: torch.Tensor,
    dnew_residual: torch.Tensor,
    new_residual: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_backward(dnormed, new_residual, weight, mean, rstd, dresidual=dnew_residual)


@_add_layer_norm_backward_op.register_fake
def _(dnormed, dnew_residual, new_residual, weight, mean, rstd):
    n = new_residual.shape[-1]
    return new_residual.new_empty(new_residual.shape), weight.new_empty(n), weight.new_empty(n)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _ = inputs
    _, new_residual, mean, rstd = output
    ctx.save_for_backward(new_residual, weight, mean, rstd)
    ctx.dtypes = (x.dtype, residual.dtype, bias.dtype)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dnormed, dnew_residual, _dmean, _drstd):
    new_residual, weight, mean, rstd = ctx.saved_tensors
    x_dtype, residual_dtype, bias_dtype = ctx.dtypes
    ds, dw, db = _add_layer_norm_backward_op(
        dnormed, dnew_residual, new_residual, weight, mean, rstd
    )
    # One gradient for both summands: the same tensor when the dtypes agree.
    return ds.to(x_dtype), ds.to(residual_dtype), dw, db.to(bias_dtype), None


_add_layer_norm_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --- Public API --------------------------------------------------------------------------


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) with new_residual = residual + x and normed its LayerNorm over
    the last dimension. x, residual: (..., N) of one shape, fp32/fp16/bf16; weight, bias: (N,).
    Both outputs are (..., N) contiguous in `torch.result_type(residual, x)`, differentiable in
    x, residual, weight and bias.

    CUDA: one Triton kernel each way. CPU: the same kernels through Triton's interpreter when
    TRITON_INTERPRET=1, else `add_layer_norm_reference`. Empty inputs go to the reference too.
    Raises TypeError for non-float tensors, ValueError for mixed devices, a residual of another
    shape than x, or weight/bias shapes other than (N,)."""
    device = check_layer_norm_inputs("add_layer_norm", x, weight, bias, residual=residual)
    check_gpu("add_layer_norm", x, residual, weight, bias)
    if x.numel() == 0 or not use_triton(device):
        return add_layer_norm_reference(x, residual, weight, bias, eps)
    normed, new_residual, _, _ = torch.ops.fastgpt.add_layer_norm_forward(
        x, residual, weight, bias, float(eps)
    )
    return normed, new_residual
