"""GELU, tanh approximation (GPT-2's): Triton forward and backward, and the PyTorch references.

    gelu(x) = 0.5 · x · (1 + tanh(u)),   u = sqrt(2/π) · (x + 0.044715 · x³)

`gelu(x)` for any shape; `bias_gelu(x, bias)` = gelu(x + bias) with bias (N,) broadcast over
x's last dimension (..., N), fused in one pass (the feed-forward layer's fc1 bias), with
gradients for x and bias (dbias reduced in a fixed order: deterministic). Inputs fp32, fp16 or
bf16; the math is fp32; outputs keep the input dtype (bias_gelu: the promoted dtype of x and
bias, as `x + bias` would have). Special values behave as `F.gelu(x, approximate="tanh")`:
gelu(+inf) = inf, gelu(-inf) = nan, gelu(nan) = nan, and the gradient is nan at ±inf and nan.
For large finite |x| (say 1e30 in fp32) the kernels give x or -0 with gradient 1 or 0, never an
overflow nan; the references (the book's formula, on CPU without the interpreter) give the same
values but, like PyTorch's own fp32 gelu, a nan gradient there (x³ overflows to inf, then 0·inf).

Where it runs (see `kernels/_dispatch.py`): CUDA tensors run the Triton kernels; CPU tensors
run them through Triton's interpreter when TRITON_INTERPRET=1, and otherwise fall back to
`gelu_reference` / `bias_gelu_reference`. The kernels are registered as `torch.library` ops
(`fastgpt::gelu_forward`, `fastgpt::bias_gelu_forward` and their backwards) so models using
them compile with `torch.compile(fullgraph=True)`. Non-contiguous x is copied once by `reshape`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import nn

from ._dispatch import (
    check_float,
    check_gpu,
    check_same_device,
    triton_interpreter_enabled,
    use_triton,
)
from ._dispatch import empty_output as _empty  # tests swap in a nan-filled allocator

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
KAPPA = 0.044715


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """The book's GELU: 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³))), computed in fp32 (fp64
    stays fp64), returned in x's dtype. Any shape."""
    xf = x.to(_compute_dtype(x))
    # Written as two fused multiply-adds, half the eager ops of the formula as it reads (what a
    # decoding step, one row at a time, pays for): inner = x + κ·x·x², y = ½x + ½x·tanh(·).
    inner = torch.addcmul(xf, xf * xf, xf, value=KAPPA)
    half = 0.5 * xf
    y = torch.addcmul(half, half, torch.tanh(SQRT_2_OVER_PI * inner))
    return y.to(x.dtype)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_reference(x + bias); x (..., N), bias (N,) -> (..., N) in the promoted dtype."""
    return gelu_reference(x + bias)


# --- Triton kernels ----------------------------------------------------------------------
#
# The interpreter has no libdevice tanh, and the textbook formula misbehaves in fp32: x³
# overflows for |x| > ~1e13, and the gradient's x · (1 - tanh²(u)) · (1 + 3κx²) then becomes
# inf · 0 = nan. So the kernels use the identity 0.5 · (1 + tanh(u)) = sigmoid(2u) and write
#     a = exp(-2|u|) ∈ [0, 1]      (never overflows)
#     s = sigmoid(2u) = 1 / (1 + a) if u ≥ 0 else a / (1 + a)        (no cancellation)
#     gelu(x)  = x · s
#     gelu'(x) = s + x · 2 s (1 - s) · du/dx,   s (1 - s) = a / (1 + a)²,
#     du/dx    = sqrt(2/π) · (1 + 3κ x²)
# with u and du/dx evaluated at x clamped to ±CLAMP. Past |x| = 20, a underflows to exactly 0
# in fp32 (|u| > 300), so the clamp changes no result; it only keeps x³ and x² finite. x itself
# (not the clamped value) multiplies s, so ±inf and nan propagate as in PyTorch:
# gelu(-inf) = -inf · 0 = nan, gelu'(±inf) = s ± inf · 0 = nan.

CLAMP = 20.0


@triton.jit
def _gelu_parts(x):
    """x fp32 -> (s, ds) with gelu(x) = x · s and gelu'(x) = s + x · ds."""
    xc = tl.minimum(tl.maximum(x, -20.0), 20.0)  # = CLAMP; see the prose above
    u = 0.7978845608028654 * xc * (1.0 + 0.044715 * xc * xc)  # sqrt(2/π) · (x + κx³)
    a = tl.exp(-2.0 * tl.abs(u))
    s = tl.where(u >= 0, 1.0 / (1.0 + a), a / (1.0 + a))
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * xc * xc)
    ds = 2.0 * a / ((1.0 + a) * (1.0 + a)) * du
    return s, ds


@triton.jit
def _load_flat_block(x_ptr, numel, BLOCK: tl.constexpr):
    """This program's block of a flat (numel,) tensor: its offsets (BLOCK,) int64, their mask,
    and x there in fp32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, x


@triton.jit
def _gelu_forward_kernel(
    x_ptr,  # (numel,) contiguous
    y_ptr,  # (numel,)
    numel,
    BLOCK: tl.constexpr,
):
    offs, mask, x = _load_flat_block(x_ptr, numel, BLOCK)
    s, _ = _gelu_parts(x)
    tl.store(y_ptr + offs, (x * s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_backward_kernel(
    dy_ptr,  # (numel,) contiguous
    x_ptr,  # (numel,) contiguous
    dx_ptr,  # (numel,)
    numel,
    BLOCK: tl.constexpr,
):
    offs, mask, x = _load_flat_block(x_ptr, numel, BLOCK)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s, ds = _gelu_parts(x)
    tl.store(dx_ptr + offs, (dy * (s + x * ds)).to(dx_ptr.dtype.element_ty), mask=mask)


# bias_gelu works on x viewed as (M, N) in tiles of BLOCK_M rows × BLOCK_N columns, grid
# (row programs, column blocks). The forward is elementwise with z = x + b. The backward writes
# dx = dy · gelu'(z) and, like LayerNorm's, reduces dbias = Σ_rows dx without atomics: row
# program p walks the row tiles p, p + P, p + 2P, ... and stores its column sums to row p of a
# (P, N) fp32 buffer that the launcher sums over dim 0.


@triton.jit
def _bias_gelu_forward_kernel(
    x_ptr,  # (M, N) contiguous
    b_ptr,  # (N,)
    y_ptr,  # (M, N) contiguous
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]  # (BLOCK_M, BLOCK_N)
    offs = rows[:, None] * N + cols[None, :]
    b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
    s, _ = _gelu_parts(z)
    tl.store(y_ptr + offs, (z * s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_backward_kernel(
    dy_ptr,  # (M, N) contiguous
    x_ptr,  # (M, N) contiguous
    b_ptr,  # (N,)
    dx_ptr,  # (M, N) contiguous
    db_partial_ptr,  # (P, N) fp32: row p = row program p's share of dbias
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_row_programs = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_mask = cols < N
    b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), num_row_programs):
        rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
        mask = (rows < M)[:, None] & col_mask[None, :]  # (BLOCK_M, BLOCK_N)
        offs = rows[:, None] * N + cols[None, :]
        z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s, ds = _gelu_parts(z)
        dz = tl.where(mask, dy * (s + z * ds), 0.0)
        tl.store(dx_ptr + offs, dz.to(dx_ptr.dtype.element_ty), mask=mask)
        db_acc += dz
    tl.store(db_partial_ptr + pid.to(tl.int64) * N + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# --- Launchers ---------------------------------------------------------------------------
def _flat_block() -> int:
    # The interpreter runs programs one by one: few, large blocks (one config, no autotuning).
    return 65536 if triton_interpreter_enabled() else 1024


def _gelu_parts_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' math in PyTorch (CPU without the interpreter): x fp32 -> (s, ds)."""
    xc = x.clamp(-CLAMP, CLAMP)
    u = SQRT_2_OVER_PI * xc * (1.0 + KAPPA * xc * xc)
    a = torch.exp(-2.0 * u.abs())
    s = torch.where(u >= 0, 1.0 / (1.0 + a), a / (1.0 + a))
    ds = 2.0 * a / ((1.0 + a) * (1.0 + a)) * SQRT_2_OVER_PI * (1.0 + 3.0 * KAPPA * xc * xc)
    return s, ds


def _gelu_forward(x: torch.Tensor) -> torch.Tensor:
    """x (any shape) -> gelu(x), contiguous, in x's dtype."""
    y = _empty(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return y
    if not use_triton(x.device):
        xf = x.float()
        y.copy_(xf * _gelu_parts_torch(xf)[0])
        return y
    x1 = x.contiguous().view(-1)  # (numel,); copies a non-contiguous x
    block = _flat_block()
    _gelu_forward_kernel[(triton.cdiv(x1.numel(), block),)](x1, y, x1.numel(), BLOCK=block)
    return y


def _gelu_backward(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy, x (same shape) -> dx = dy · gelu'(x), contiguous, in x's dtype."""
    dx = _empty(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return dx
    if not use_triton(x.device):
        xf = x.float()
        s, ds = _gelu_parts_torch(xf)
        dx.copy_(dy.float() * (s + xf * ds))
        return dx
    x1, dy1 = x.contiguous().view(-1), dy.contiguous().view(-1)  # (numel,)
    block = _flat_block()
    grid = (triton.cdiv(x1.numel(), block),)
    _gelu_backward_kernel[grid](dy1, x1, dx, x1.numel(), BLOCK=block)
    return dx


def _bias_gelu_tile(m: int, n: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): up to 1024 columns (interpreter: 4096) and ~2048 elements a tile
    (interpreter: 65536). On a GPU the kernels run 4 warps, so 2048 elements are 16 per thread
    per array: with 4096 (32 per thread) the fp32 backward spilled 52 bytes on sm_90 with
    Triton 3.6 (fastgpt selftest --compile-only). At most 16 rows a tile on a GPU: 32 rows of
    width 64 spilled 8 B there (fp32 backward, Triton 3.6)."""
    interp = triton_interpreter_enabled()
    block_n = min(triton.next_power_of_2(n), 4096 if interp else 1024)
    target = 65536 if interp else 2048
    block_m = max(1, min(target // block_n, triton.next_power_of_2(m), target if interp else 16))
    return block_m, block_n


def _bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (..., N), bias (N,) -> gelu(x + bias) (..., N), contiguous, in the promoted dtype."""
    n = x.shape[-1]
    y = _empty(x.shape, torch.promote_types(x.dtype, bias.dtype), x.device)
    if x.numel() == 0:
        return y
    if not use_triton(x.device):
        z = x.float() + bias.float()
        y.copy_(z * _gelu_parts_torch(z)[0])
        return y
    x2 = x.reshape(-1, n).contiguous()  # (M, N)
    m = x2.shape[0]
    block_m, block_n = _bias_gelu_tile(m, n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _bias_gelu_forward_kernel[grid](
        x2, bias.contiguous(), y, m, n, BLOCK_M=block_m, BLOCK_N=block_n
    )
    return y


def _bias_gelu_backward(
    dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x (..., N), bias (N,) -> dx (..., N) in x's dtype, dbias (N,) in bias's dtype."""
    n = x.shape[-1]
    dx = _empty(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return dx, torch.zeros(n, dtype=bias.dtype, device=x.device)
    if not use_triton(x.device):
        z = x.float() + bias.float()
        s, ds = _gelu_parts_torch(z)
        dz = dy.float() * (s + z * ds)
        dx.copy_(dz)
        return dx, dz.reshape(-1, n).sum(0).to(bias.dtype)
    x2, dy2 = x.reshape(-1, n).contiguous(), dy.reshape(-1, n).contiguous()  # (M, N)
    m = x2.shape[0]
    block_m, block_n = _bias_gelu_tile(m, n)
    row_tiles, col_blocks = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    if x.device.type == "cuda":  # about four programs per SM in all
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        row_programs = max(1, min(row_tiles, triton.cdiv(4 * sms, col_blocks)))
    else:
        row_programs = max(1, min(row_tiles, 8))
    db_partial = _empty((row_programs, n), torch.float32, x.device)  # (P, N)
    _bias_gelu_backward_kernel[(row_programs, col_blocks)](
        dy2, x2, bias.contiguous(), dx, db_partial, m, n, BLOCK_M=block_m, BLOCK_N=block_n
    )
    # torch's sum over dim 0 of a fixed-shape buffer runs in a fixed order: deterministic.
    return dx, db_partial.sum(0).to(bias.dtype)


# --- torch.library ops -------------------------------------------------------------------


@torch.library.custom_op("fastgpt::gelu_forward", mutates_args=())
def _gelu_forward_op(x: torch.Tensor) -> torch.Tensor:
    return _gelu_forward(x)


@_gelu_forward_op.register_fake
def _(x):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastgpt::gelu_backward", mutates_args=())
def _gelu_backward_op(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _gelu_backward(dy, x)


@_gelu_backward_op.register_fake
def _(dy, x):
    return x.new_empty(x.shape)


def _gelu_setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _gelu_autograd_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _gelu_backward_op(dy, x)


_gelu_forward_op.register_autograd(_gelu_autograd_backward, setup_context=_gelu_setup_context)


@torch.library.custom_op("fastgpt::bias_gelu_forward", mutates_args=())
def _bias_gelu_forward_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _bias_gelu_forward(x, bias)


@_bias_gelu_forward_op.register_fake
def _(x, bias):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, bias.dtype))


@torch.library.custom_op("fastgpt::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(
    dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _bias_gelu_backward(dy, x, bias)


@_bias_gelu_backward_op.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _bias_gelu_setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _bias_gelu_autograd_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    return _bias_gelu_backward_op(dy, x, bias)


_bias_gelu_forward_op.register_autograd(
    _bias_gelu_autograd_backward, setup_context=_bias_gelu_setup_context
)


# --- Public API --------------------------------------------------------------------------


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU (tanh approximation) of x, any shape, fp32/fp16/bf16 -> same shape and dtype
    (contiguous), differentiable.

    CUDA: Triton kernels. CPU: the same kernels through Triton's interpreter when
    TRITON_INTERPRET=1, else `gelu_reference`. Empty x goes to the reference too.
    Raises TypeError for a non-float x."""
    check_float("x", x)
    check_gpu("gelu", x)
    if x.numel() == 0 or not use_triton(x.device):
        return gelu_reference(x)
    return torch.ops.fastgpt.gelu_forward(x)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) in one pass. x: (..., N), bias: (N,), fp32/fp16/bf16 -> (..., N) in the
    promoted dtype of x and bias (contiguous), differentiable in x and bias.

    Dispatch as `gelu` (fallback: `bias_gelu_reference`). Raises TypeError for non-float
    tensors, ValueError for mixed devices or a bias shape other than (N,)."""
    device = check_same_device(x=x, bias=bias)
    check_float("x", x)
    check_float("bias", bias)
    if x.dim() == 0 or tuple(bias.shape) != (x.shape[-1],):
        last = x.shape[-1] if x.dim() else "?"
        raise ValueError(
            f"bias_gelu: bias must have shape ({last},) to match x's last dimension "
            f"(x is {tuple(x.shape)}), got {tuple(bias.shape)}"
        )
    check_gpu("bias_gelu", x, bias)
    if x.numel() == 0 or not use_triton(device):
        return bias_gelu_reference(x, bias)
    return torch.ops.fastgpt.bias_gelu_forward(x, bias)


class GELU(nn.Module):
    """GELU (tanh approximation) as a module; see `gelu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x)
