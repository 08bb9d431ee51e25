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
in `kernels/layer_norm.py`; x and residual may each be fp32, fp16 or bf16.

Backward: the gradient reaching new_residual is the incoming one plus the LayerNorm backward
of normed's gradient; that one tensor is the gradient of x and of residual both (cast to each
one's dtype). dweight/dbias are reduced in a fixed order: bitwise deterministic.

Where it runs (see `kernels/_dispatch.py`): CUDA tensors run the Triton kernels, CPU tensors
run them through Triton's interpreter when TRITON_INTERPRET=1, else `add_layer_norm_reference`.
Registered as the `torch.library` ops `fastgpt::add_layer_norm_forward` / `_backward` with an
autograd formula, so `torch.compile(fullgraph=True)` traces it. The kernels are LayerNorm's
(kernels/layer_norm.py, their residual flags on), and so are the tiles, their tuning on a GPU
and the widest single tile (`layer_norm.MAX_BLOCK_N`): the same row widths take the looping
path.
x and residual are viewed as (M, N) rows with `reshape`; only the last dimension must be
contiguous (a row stride is passed), else they are copied once.
"""

from __future__ import annotations

import torch
import triton

from ._dispatch import check_float, check_same_device, use_triton
from ._dispatch import empty_output as _empty  # tests swap in a nan-filled allocator
from .layer_norm import (
    _layer_norm_backward,
    _layer_norm_backward_kernel,
    _layer_norm_forward,
    _layer_norm_forward_kernel,
    _num_backward_programs,
    _rows,
    _tuned_tile,
    layer_norm_reference,
)


def add_layer_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's math in plain PyTorch: exactly `residual + x`, then `layer_norm_reference`.
    x, residual: (..., N); weight, bias: (N,) -> (normed, new_residual), both (..., N)."""
    new_residual = residual + x
    return layer_norm_reference(new_residual, weight, bias, eps), new_residual


# --- Triton kernels ----------------------------------------------------------------------
#
# LayerNorm's own kernels run this op (kernels/layer_norm.py: `_layer_norm_forward_kernel`
# with HAS_RESIDUAL=True, `_layer_norm_backward_kernel` with HAS_DRESIDUAL=True), with its
# tiles and their tuning (`_tuned_tile`, the buckets named "add_layer_norm.forward" /
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


# --- Launchers ---------------------------------------------------------------------------


def _add_layer_norm_forward(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual (..., N) -> normed, new_residual (..., N) contiguous in
    result_type(residual, x), mean and rstd (...,) fp32."""
    n = x.shape[-1]
    dtype = torch.result_type(residual, x)
    if not use_triton(x.device):  # CPU without the interpreter: the same math in PyTorch
        new_residual = residual + x
        normed, mean, rstd = _layer_norm_forward(new_residual, weight, bias, eps)
        return normed, new_residual, mean, rstd
    normed = _empty(x.shape, dtype, x.device)
    new_residual = _empty(x.shape, dtype, x.device)
    mean = _empty(x.shape[:-1], torch.float32, x.device)
    rstd = _empty(x.shape[:-1], torch.float32, x.device)
    if x.numel() == 0:
        return normed, new_residual, mean, rstd
    x2, r2 = _rows(x, n), _rows(residual, n)  # (M, N)
    m = x2.shape[0]
    w, b = weight.contiguous(), bias.contiguous()

    def launch(tile: dict[str, int]) -> None:  # every output written whole by each launch
        _layer_norm_forward_kernel[(triton.cdiv(m, tile["BLOCK_M"]),)](
            x2, r2, w, b, normed, new_residual, mean, rstd, x2.stride(0), r2.stride(0), n, m, n,
            eps, **tile, HAS_RESIDUAL=True,
        )  # fmt: skip

    # tuned by the stream's dtype (s's, as normed's), the bucket apart from LayerNorm's
    launch(_tuned_tile("forward", new_residual.view(m, n), launch, op="add_layer_norm"))
    return normed, new_residual, mean, rstd


def _add_layer_norm_backward(
    dnormed: torch.Tensor,
    dnew_residual: torch.Tensor,
    new_residual: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dnormed, dnew_residual, new_residual (..., N), weight (N,), mean/rstd (...,) fp32 ->
    ds (..., N) in new_residual's dtype (the gradient of x and of residual), dweight and dbias
    (N,) in weight's dtype."""
    n = new_residual.shape[-1]
    if not use_triton(new_residual.device):
        ds, dw, db = _layer_norm_backward(dnormed, new_residual, weight, mean, rstd)
        return ds + dnew_residual, dw, db
    ds = _empty(new_residual.shape, new_residual.dtype, new_residual.device)
    if new_residual.numel() == 0:
        zeros = torch.zeros(n, dtype=weight.dtype, device=new_residual.device)
        return ds, zeros, zeros.clone()
    s2, dy2, ds_in2 = (_rows(t, n) for t in (new_residual, dnormed, dnew_residual))  # (M, N)
    m = s2.shape[0]
    w, mean1, rstd1 = weight.contiguous(), mean.reshape(-1), rstd.reshape(-1)

    def launch(tile: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """ds written whole; the (P, N) partial sums of dw and db, fresh for each launch."""
        programs = _num_backward_programs(s2.device, triton.cdiv(m, tile["BLOCK_M"]))
        if tile["SINGLE_TILE"]:  # each program stores its row of the partial sums once
            dw_partial = _empty((programs, n), torch.float32, s2.device)  # (P, N)
            db_partial = _empty((programs, n), torch.float32, s2.device)  # (P, N)
        else:  # the looping path accumulates into its row, so it must start at zero
            dw_partial = torch.zeros((programs, n), dtype=torch.float32, device=s2.device)
            db_partial = torch.zeros((programs, n), dtype=torch.float32, device=s2.device)
        _layer_norm_backward_kernel[(programs,)](
            dy2, s2, w, mean1, rstd1, ds_in2, ds, dw_partial, db_partial,
            dy2.stride(0), s2.stride(0), ds_in2.stride(0), n, m, n, **tile, HAS_DRESIDUAL=True,
        )  # fmt: skip
        return dw_partial, db_partial

    dw_partial, db_partial = launch(_tuned_tile("backward", s2, launch, op="add_layer_norm"))
    # torch's sum over dim 0 of a fixed-shape buffer runs in a fixed order: deterministic.
    return ds, dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)


# --- torch.library ops -------------------------------------------------------------------


@torch.library.custom_op("fastgpt::add_layer_norm_forward", mutates_args=())
def _add_layer_norm_forward_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _add_layer_norm_forward(x, residual, weight, bias, eps)


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
    return _add_layer_norm_backward(dnormed, dnew_residual, new_residual, weight, mean, rstd)


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


def _check_inputs(x, residual, weight, bias) -> torch.device:
    """The device of the inputs; TypeError / ValueError naming the first bad one."""
    device = check_same_device(x=x, residual=residual, weight=weight, bias=bias)
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        check_float(name, t)
    if x.dim() == 0:
        raise ValueError("add_layer_norm: x must have at least one dimension, got a scalar")
    if residual.shape != x.shape:
        raise ValueError(
            f"add_layer_norm: residual must have x's shape {tuple(x.shape)}, "
            f"got {tuple(residual.shape)} (no broadcasting)"
        )
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (n,):
            raise ValueError(
                f"add_layer_norm: {name} must have shape ({n},) to match x's last dimension "
                f"(x is {tuple(x.shape)}), got {tuple(t.shape)}"
            )
    return device


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
    device = _check_inputs(x, residual, weight, bias)
    if x.numel() == 0 or not use_triton(device):
        return add_layer_norm_reference(x, residual, weight, bias, eps)
    normed, new_residual, _, _ = torch.ops.fastgpt.add_layer_norm_forward(
        x, residual, weight, bias, float(eps)
    )
    return normed, new_residual
