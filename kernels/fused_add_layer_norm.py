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
autograd formula, so `torch.compile(fullgraph=True)` traces it. Tiles (and the widest single
tile, `layer_norm.MAX_BLOCK_N`) are LayerNorm's: the same row widths take the looping path.
x and residual are viewed as (M, N) rows with `reshape`; only the last dimension must be
contiguous (a row stride is passed), else they are copied once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import check_float, check_same_device, use_triton
from ._dispatch import empty_output as _empty  # tests swap in a nan-filled allocator
from .layer_norm import (
    _layer_norm_backward,
    _layer_norm_forward,
    _num_backward_programs,
    _rows,
    _tile,
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
# Forward, per row (a program handles BLOCK_M rows × BLOCK_N columns): s = residual + x, added
# in fp32 and rounded to s's dtype (fp32 has more than 2p + 2 bits for p = 11 (fp16) and 8
# (bf16), so this double rounding equals PyTorch's correctly rounded 16-bit add), stored, then
# LayerNorm of the rounded s exactly as `_layer_norm_forward_kernel`: sums over d = s - s₀
# (s₀ the row's first element), two passes, mean and rstd saved for the backward pass.
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
# chunk's dw/db into its own buffer row.


@triton.jit
def _add_layer_norm_forward_kernel(
    x_ptr,  # (M, N) branch output, rows x_row_stride apart, columns contiguous
    res_ptr,  # (M, N) residual stream, rows res_row_stride apart, columns contiguous
    w_ptr,  # (N,)
    b_ptr,  # (N,)
    y_ptr,  # (M, N) contiguous: normed, in s's dtype
    s_ptr,  # (M, N) contiguous: new residual s = residual + x
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    x_row_stride,
    res_row_stride,
    M,
    N,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) int64
    row_mask = rows < M
    x_rows = x_ptr + rows[:, None] * x_row_stride  # (BLOCK_M, 1) pointers
    res_rows = res_ptr + rows[:, None] * res_row_stride
    y_rows = y_ptr + rows[:, None] * N
    s_rows = s_ptr + rows[:, None] * N
    s_dtype = s_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    x0 = tl.load(x_rows, mask=row_mask[:, None], other=0.0).to(tl.float32)  # (BLOCK_M, 1)
    r0 = tl.load(res_rows, mask=row_mask[:, None], other=0.0).to(tl.float32)
    s0 = (r0 + x0).to(s_dtype).to(tl.float32)  # the row's first element of s, as stored
    if SINGLE_TILE:
        mask = row_mask[:, None] & (cols[None, :] < N)  # (BLOCK_M, BLOCK_N)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.load(res_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (r + x).to(s_dtype)
        tl.store(s_rows + cols[None, :], s, mask=mask)
        d = tl.where(mask, s.to(tl.float32) - s0, 0.0)
        mean_d = tl.sum(d, axis=1) / N  # (BLOCK_M,)
        sm = tl.where(mask, d - mean_d[:, None], 0.0)
        var = tl.sum(sm * sm, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = sm * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            r = tl.load(res_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            s = (r + x).to(s_dtype)
            tl.store(s_rows + c[None, :], s, mask=mask)
            total += tl.sum(tl.where(mask, s.to(tl.float32) - s0, 0.0), axis=1)
        tl.debug_barrier()  # the passes below read back the s this program stored
        mean_d = total / N
        total_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            s = tl.load(s_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            sm = tl.where(mask, (s - s0) - mean_d[:, None], 0.0)
            total_sq += tl.sum(sm * sm, axis=1)
        rstd = 1.0 / tl.sqrt(total_sq / N + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            s = tl.load(s_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c, mask=c < N, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + c, mask=c < N, other=0.0).to(tl.float32)
            y = ((s - s0) - mean_d[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
            tl.store(y_rows + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    mean = tl.sum(s0, axis=1) + mean_d  # (BLOCK_M,): s₀ + mean(d)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _add_layer_norm_backward_kernel(
    dy_ptr,  # (M, N) gradient of normed, rows dy_row_stride apart, columns contiguous
    ds_in_ptr,  # (M, N) gradient reaching s from its other uses, rows ds_in_row_stride apart
    s_ptr,  # (M, N) the saved new residual, rows s_row_stride apart, columns contiguous
    w_ptr,  # (N,)
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    ds_ptr,  # (M, N) contiguous: gradient of x and residual, in s's dtype
    dw_partial_ptr,  # (P, N) fp32: row p = program p's share of dweight
    db_partial_ptr,  # (P, N) fp32: row p = program p's share of dbias
    dy_row_stride,
    ds_in_row_stride,
    s_row_stride,
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_row_tiles = tl.cdiv(M, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    dw_row = dw_partial_ptr + pid.to(tl.int64) * N
    db_row = db_partial_ptr + pid.to(tl.int64) * N
    if SINGLE_TILE:
        col_mask = cols < N
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for tile in range(pid, num_row_tiles, num_programs):
            rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
            row_mask = rows < M
            mask = row_mask[:, None] & col_mask[None, :]  # (BLOCK_M, BLOCK_N)
            s = tl.load(s_ptr + rows[:, None] * s_row_stride + cols[None, :], mask=mask, other=0.0)
            dy = tl.load(
                dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0
            ).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            shat = tl.where(mask, (s.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            g = dy * w[None, :]
            c1 = tl.sum(shat * g, axis=1) / N  # (BLOCK_M,)
            c2 = tl.sum(g, axis=1) / N
            ds_in = tl.load(
                ds_in_ptr + rows[:, None] * ds_in_row_stride + cols[None, :], mask=mask, other=0.0
            ).to(tl.float32)
            ds = ds_in + (g - (shat * c1[:, None] + c2[:, None])) * rstd[:, None]
            ds_ptrs = ds_ptr + rows[:, None] * N + cols[None, :]
            tl.store(ds_ptrs, ds.to(ds_ptr.dtype.element_ty), mask=mask)
            dw_acc += dy * shat
            db_acc += dy
        tl.store(dw_row + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
        tl.store(db_row + cols, tl.sum(db_acc, axis=0), mask=col_mask)
    else:
        # The (P, N) buffers arrive zeroed; this program alone reads and writes its row.
        for tile in range(pid, num_row_tiles, num_programs):
            rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
            row_mask = rows < M
            s_rows = s_ptr + rows[:, None] * s_row_stride
            dy_rows = dy_ptr + rows[:, None] * dy_row_stride
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            sum_shat_g = tl.zeros([BLOCK_M], dtype=tl.float32)
            sum_g = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c[None, :] < N)
                s = tl.load(s_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + c, mask=c < N, other=0.0).to(tl.float32)
                shat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
                g = dy * w[None, :]
                sum_shat_g += tl.sum(shat * g, axis=1)
                sum_g += tl.sum(g, axis=1)
            c1 = sum_shat_g / N
            c2 = sum_g / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                c_mask = c < N
                mask = row_mask[:, None] & c_mask[None, :]
                s = tl.load(s_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
                shat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
                g = dy * w[None, :]
                ds_in_ptrs = ds_in_ptr + rows[:, None] * ds_in_row_stride + c[None, :]
                ds_in = tl.load(ds_in_ptrs, mask=mask, other=0.0).to(tl.float32)
                ds = ds_in + (g - (shat * c1[:, None] + c2[:, None])) * rstd[:, None]
                ds_ptrs = ds_ptr + rows[:, None] * N + c[None, :]
                tl.store(ds_ptrs, ds.to(ds_ptr.dtype.element_ty), mask=mask)
                dw = tl.load(dw_row + c, mask=c_mask, other=0.0) + tl.sum(dy * shat, axis=0)
                db = tl.load(db_row + c, mask=c_mask, other=0.0) + tl.sum(dy, axis=0)
                tl.store(dw_row + c, dw, mask=c_mask)
                tl.store(db_row + c, db, mask=c_mask)
                tl.debug_barrier()  # the next visit of these columns must see this store


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
    block_m, block_n, single, num_warps = _tile(m, n)
    _add_layer_norm_forward_kernel[(triton.cdiv(m, block_m),)](
        x2, r2, weight.contiguous(), bias.contiguous(), normed, new_residual, mean, rstd,
        x2.stride(0), r2.stride(0), m, n, eps,
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_TILE=single, num_warps=num_warps,
    )  # fmt: skip
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
    block_m, block_n, single, num_warps = _tile(m, n)
    programs = _num_backward_programs(s2.device, triton.cdiv(m, block_m))
    if single:  # each program stores its row of the partial sums once
        dw_partial = _empty((programs, n), torch.float32, s2.device)  # (P, N)
        db_partial = _empty((programs, n), torch.float32, s2.device)  # (P, N)
    else:  # the looping path accumulates into its row, so it must start at zero
        dw_partial = torch.zeros((programs, n), dtype=torch.float32, device=s2.device)
        db_partial = torch.zeros((programs, n), dtype=torch.float32, device=s2.device)
    _add_layer_norm_backward_kernel[(programs,)](
        dy2, ds_in2, s2, weight.contiguous(), mean.reshape(-1), rstd.reshape(-1), ds,
        dw_partial, db_partial,
        dy2.stride(0), ds_in2.stride(0), s2.stride(0), m, n,
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_TILE=single, num_warps=num_warps,
    )  # fmt: skip
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
