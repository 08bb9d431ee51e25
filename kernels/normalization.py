"""LayerNorm over the last dimension: Triton forward and backward, and its PyTorch reference.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias        per row of the last dimension

`layer_norm(x, weight, bias, eps)` takes x of any leading shape (..., N), weight and bias (N,).
Statistics are fp32 with the biased variance (as `torch.nn.LayerNorm` and the book); x may be
fp32, fp16 or bf16 and y has x's dtype. dweight/dbias are reduced in a fixed order, so the same
inputs give bitwise identical gradients.

Where it runs (see `kernels/_dispatch.py`): CUDA tensors run the Triton kernels; CPU tensors
run them through Triton's interpreter when TRITON_INTERPRET=1, and otherwise fall back to
`layer_norm_reference` (plain PyTorch, same math). The kernels are registered as the
`torch.library` ops `fastgpt::layer_norm_forward` / `fastgpt::layer_norm_backward` with an
autograd formula, so a model calling `layer_norm` compiles with `torch.compile(fullgraph=True)`.

Layout: x is viewed as (M, N) rows with `reshape` (a view when the strides allow it, else a
copy); the kernels only need the last dimension contiguous (a row stride is passed), so a
sliced or row-strided x is read in place and a transposed one is copied once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import nn

from . import _autotune
from ._dispatch import (
    check_float,
    check_gpu,
    check_same_device,
    triton_interpreter_enabled,
    use_triton,
)
from ._dispatch import empty_output as _empty  # tests swap in a nan-filled allocator
from ._rowwise import program_rows
from .flash_core import arch_family, target_arch

# Widest row handled as one tile (elements); wider rows loop over column chunks of this size.
# Module-level so tests can shrink it to exercise the looping path cheaply.
MAX_BLOCK_N = 16384


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """The book's LayerNorm in plain PyTorch: statistics in fp32 (fp64 stays fp64), biased
    variance. x: (..., N), weight/bias: (N,) -> (..., N) in x's dtype."""
    xf = x.double() if x.dtype == torch.float64 else x.float()
    # One reduction for both statistics, and the affine map as one fused multiply-add: the
    # same math as mean, var, (x - mean) / sqrt(var + eps) * w + b in fewer eager ops (what a
    # decoding step, one row at a time, pays for).
    var, mean = torch.var_mean(xf, dim=-1, keepdim=True, correction=0)
    normed = (xf - mean) * torch.rsqrt(var + eps)
    y = torch.addcmul(bias.to(xf.dtype), normed, weight.to(xf.dtype))  # normed · w + b
    return y.to(x.dtype)


# --- Triton kernels ----------------------------------------------------------------------
#
# Forward, per row of N values (a program handles a tile of BLOCK_M rows × BLOCK_N columns):
#     mean = Σ x / N,   var = Σ (x - mean)² / N   (two passes over the row: no cancellation
#     from E[x²] - E[x]²),   rstd = 1 / sqrt(var + eps),   y = (x - mean) · rstd · w + b.
# The sums run over d = x - x₀ (x₀ = the row's first element), and x - mean = d - mean(d):
# a constant row then gives exactly d = 0 and y = b, where the rounding of a plain Σ x / N
# would be multiplied by rstd = 1/sqrt(eps) ≈ 316; it also helps rows far from zero.
# mean and rstd (fp32, one per row) are saved for the backward pass.
#
# Backward, with x̂ = (x - mean) · rstd and g = w · dy:
#     dx = rstd · (g - x̂ · mean(g · x̂) - mean(g))        (both means over the row)
#     dw = Σ_rows dy · x̂,   db = Σ_rows dy
# Each of P programs walks the row tiles pid, pid + P, pid + 2P, ... in order, accumulates its
# share of dw/db in fp32 and writes it to row `pid` of a (P, N) buffer; the launcher sums that
# buffer over dim 0. No atomics anywhere, so the reduction order is fixed: deterministic.
#
# When N > MAX_BLOCK_N the row does not fit one tile: the kernels loop over column chunks
# (SINGLE_TILE=False), reloading x per pass, and the backward adds each chunk's dw/db into its
# own (P, N) buffer row (read-modify-write by the one program that owns the row).
#
# The same two kernels run the residual add fused with the LayerNorm after it
# (kernels/fused_add_layer_norm.py, whose comment block gives its math), through constexpr
# flags that are False here, so that LayerNorm's code is compiled exactly as without them:
# - HAS_RESIDUAL (forward): load the residual too, s = residual + x added in fp32 and rounded
#   to s's dtype, store s, and normalize s in place of x (s₀ in place of x₀). The looping path
#   stores s in its first pass and its later passes read s back, after a barrier.
# - HAS_DRESIDUAL (backward): x is the saved s, and the gradient reaching s from its other
#   uses (dres) is added to dx before it is stored.


@triton.jit
def _add_residual(x, res_rows, s_rows, offs, mask):
    """s = residual + x, added in fp32, rounded to s's dtype and stored; returned in fp32.
    x, offs, mask (BLOCK_M, BLOCK_N); res_rows, s_rows (BLOCK_M, 1) row pointers."""
    r = tl.load(res_rows + offs, mask=mask, other=0.0).to(tl.float32)
    s = (r + x).to(s_rows.dtype.element_ty)
    tl.store(s_rows + offs, s, mask=mask)
    return s.to(tl.float32)


@triton.jit
def _layer_norm_forward_kernel(
    x_ptr,  # (M, N), rows x_row_stride apart, columns contiguous
    res_ptr,  # HAS_RESIDUAL: (M, N) residual stream, rows res_row_stride apart; else None
    w_ptr,  # (N,)
    b_ptr,  # (N,)
    y_ptr,  # (M, N), rows y_row_stride apart
    s_ptr,  # HAS_RESIDUAL: (M, N) contiguous, the new residual s = residual + x; else None
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    x_row_stride,
    res_row_stride,
    y_row_stride,
    M,
    N,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    rows, row_mask = program_rows(M, BLOCK_M)  # (BLOCK_M,) int64, (BLOCK_M,)
    x_rows = x_ptr + rows[:, None] * x_row_stride  # (BLOCK_M, 1) pointers
    y_rows = y_ptr + rows[:, None] * y_row_stride
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    x0 = tl.load(x_rows, mask=row_mask[:, None], other=0.0).to(tl.float32)  # (BLOCK_M, 1)
    if HAS_RESIDUAL:  # from here on "x" is the row normalized: s, as stored
        res_rows = res_ptr + rows[:, None] * res_row_stride
        s_rows = s_ptr + rows[:, None] * N
        s_dtype = s_ptr.dtype.element_ty
        r0 = tl.load(res_rows, mask=row_mask[:, None], other=0.0).to(tl.float32)
        x0 = (r0 + x0).to(s_dtype).to(tl.float32)  # the row's first element of s, as stored
        src_rows = s_rows  # the passes after the first read s back
    else:
        src_rows = x_rows
    if SINGLE_TILE:
        mask = row_mask[:, None] & (cols[None, :] < N)  # (BLOCK_M, BLOCK_N)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x = _add_residual(x, res_rows, s_rows, cols[None, :], mask)
        d = tl.where(mask, x - x0, 0.0)
        mean_d = tl.sum(d, axis=1) / N  # (BLOCK_M,)
        xm = tl.where(mask, d - mean_d[:, None], 0.0)
        var = tl.sum(xm * xm, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = xm * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                x = _add_residual(x, res_rows, s_rows, c[None, :], mask)
            total += tl.sum(tl.where(mask, x - x0, 0.0), axis=1)
        if HAS_RESIDUAL:
            tl.debug_barrier()  # the passes below read back the s this program stored
        mean_d = total / N
        total_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = tl.load(src_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            xm = tl.where(mask, (x - x0) - mean_d[:, None], 0.0)
            total_sq += tl.sum(xm * xm, axis=1)
        rstd = 1.0 / tl.sqrt(total_sq / N + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < N)
            x = tl.load(src_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + c, mask=c < N, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + c, mask=c < N, other=0.0).to(tl.float32)
            y = ((x - x0) - mean_d[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
            tl.store(y_rows + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    mean = tl.sum(x0, axis=1) + mean_d  # (BLOCK_M,): x₀ + mean(d)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_backward_kernel(
    dy_ptr,  # (M, N), rows dy_row_stride apart, columns contiguous
    x_ptr,  # (M, N), rows x_row_stride apart, columns contiguous
    w_ptr,  # (N,)
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    dres_ptr,  # HAS_DRESIDUAL: (M, N) gradient reaching x from its other uses; else None
    dx_ptr,  # (M, N), rows dx_row_stride apart
    dw_partial_ptr,  # (P, N) fp32: row p = program p's share of dweight
    db_partial_ptr,  # (P, N) fp32: row p = program p's share of dbias
    dy_row_stride,
    x_row_stride,
    dres_row_stride,
    dx_row_stride,
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    HAS_DRESIDUAL: tl.constexpr,
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
            x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
            dy = tl.load(
                dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0
            ).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            g = dy * w[None, :]
            c1 = tl.sum(xhat * g, axis=1) / N  # (BLOCK_M,)
            c2 = tl.sum(g, axis=1) / N
            dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DRESIDUAL:
                dres = tl.load(
                    dres_ptr + rows[:, None] * dres_row_stride + cols[None, :], mask=mask, other=0.0
                ).to(tl.float32)
                dx = dres + dx
            dx_ptrs = dx_ptr + rows[:, None] * dx_row_stride + cols[None, :]
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            db_acc += dy
        tl.store(dw_row + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
        tl.store(db_row + cols, tl.sum(db_acc, axis=0), mask=col_mask)
    else:
        # The (P, N) buffers arrive zeroed; this program alone reads and writes its row.
        for tile in range(pid, num_row_tiles, num_programs):
            rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
            row_mask = rows < M
            x_rows = x_ptr + rows[:, None] * x_row_stride
            dy_rows = dy_ptr + rows[:, None] * dy_row_stride
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            sum_xhat_g = tl.zeros([BLOCK_M], dtype=tl.float32)
            sum_g = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c[None, :] < N)
                x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + c, mask=c < N, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
                g = dy * w[None, :]
                sum_xhat_g += tl.sum(xhat * g, axis=1)
                sum_g += tl.sum(g, axis=1)
            c1 = sum_xhat_g / N
            c2 = sum_g / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                c_mask = c < N
                mask = row_mask[:, None] & c_mask[None, :]
                x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
                g = dy * w[None, :]
                dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                if HAS_DRESIDUAL:
                    dres_ptrs = dres_ptr + rows[:, None] * dres_row_stride + c[None, :]
                    dx = tl.load(dres_ptrs, mask=mask, other=0.0).to(tl.float32) + dx
                dx_ptrs = dx_ptr + rows[:, None] * dx_row_stride + c[None, :]
                tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                dw = tl.load(dw_row + c, mask=c_mask, other=0.0) + tl.sum(dy * xhat, axis=0)
                db = tl.load(db_row + c, mask=c_mask, other=0.0) + tl.sum(dy, axis=0)
                tl.store(dw_row + c, dw, mask=c_mask)
                tl.store(db_row + c, db, mask=c_mask)
                tl.debug_barrier()  # the next visit of these columns must see this store


# --- Launchers ---------------------------------------------------------------------------
def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t (..., n) as (M, n) with contiguous columns: a view when the strides allow it."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(1) == 1 or n == 1 else t2.contiguous()


class _Tiles(NamedTuple):
    """The bounds `_tile` picks within on one target. BLOCK_N is the width's next power of two
    up to `widest` (and MAX_BLOCK_N): the whole row in one tile when it fits, else the
    looping path over chunks of up to `chunk` columns. Rows share a tile up to its elements."""

    widest: int | None  # BLOCK_N of a one-tile row at most (None: MAX_BLOCK_N alone)
    chunk: int | None  # BLOCK_N of the looping path at most (None: as one tile)
    elements: int  # BLOCK_M · BLOCK_N at most
    rows: int  # BLOCK_M at most
    warps: tuple[tuple[int, int], ...]  # (tile elements at most, num_warps); 16 past the last
    chunk_warps: int | None  # num_warps of the looping path (None: by its elements, as above)
    more_warps_over: int | None  # tuning tries twice the warps above this BLOCK_N (None: untuned)


# Why these numbers (registers and spills at every width, dtype and arch, of each tile and
# tuning candidate): benchmarks/results/compile/ (README.md there, budget.json). A GPU tile
# holds up to 16 fp32 elements a thread per array (512 a warp); the interpreter runs programs
# one by one, so its tiles are large (few programs) and it runs one config, untuned.
_SM_80_TILES = _Tiles(
    widest=8192, chunk=4096, elements=4096, rows=64, warps=((2048, 4), (4096, 8)),
    chunk_warps=16, more_warps_over=256,
)  # fmt: skip
# By arch family (flash_core.arch_family). sm_75 (T4): the looping path in chunks of 2048
# columns, two rows a tile: Triton 3.6's ptxas gave the 1 x 4096 16-warp chunk tile's fp16
# forward 64 registers and 8 B of spills there; 2 x 2048 holds as many elements a thread and
# compiles without spills with 3.6 and 3.9, as does its 8-warp tuning candidate.
_GPU_TILES = {
    "sm_75": _SM_80_TILES._replace(chunk=2048),
    "sm_80": _SM_80_TILES,
    "sm_86": _SM_80_TILES,
    "sm_120": _SM_80_TILES,
    "sm_90": _SM_80_TILES,
    "sm_100": _SM_80_TILES,
}
_INTERPRETER_TILES = _Tiles(
    widest=None, chunk=None, elements=65536, rows=64, warps=((2048, 4), (8192, 8)),
    chunk_warps=None, more_warps_over=None,
)  # fmt: skip


def _target_tiles() -> _Tiles:
    """The bounds for the arch Triton compiles for (its active driver: the compile check's
    stub names one), or the interpreter's."""
    if triton_interpreter_enabled():
        return _INTERPRETER_TILES
    return _GPU_TILES[arch_family(target_arch())]


def _tile(m: int, n: int) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, SINGLE_TILE, num_warps) for M rows of width N on this target."""
    tiles = _target_tiles()
    block_n = min(triton.next_power_of_2(n), MAX_BLOCK_N, tiles.widest or MAX_BLOCK_N)
    single = block_n >= n
    if not single:
        block_n = min(block_n, tiles.chunk or block_n)
    block_m = max(1, min(tiles.elements // block_n, triton.next_power_of_2(m), tiles.rows))
    num_warps = next((w for most, w in tiles.warps if block_m * block_n <= most), 16)
    if not single and tiles.chunk_warps is not None:
        num_warps = tiles.chunk_warps
    return block_m, block_n, single, num_warps


TILE_KEYS = ("BLOCK_M", "BLOCK_N", "SINGLE_TILE", "num_warps")


def _tile_candidates(m: int, n: int) -> list[dict[str, int]]:
    """The configs a GPU may tune among for M rows of width N, `_tile`'s first (the pinned
    one: the interpreter and CPU run only it). The others hold no more elements per thread,
    so no more registers: twice the warps over the same tile (above `more_warps_over`
    columns), or half the rows of a multi-row tile over half the warps. Each is compiled by
    the compile check."""
    pinned = _tile(m, n)
    block_m, block_n, single, num_warps = pinned
    tiles = [pinned]
    more_warps_over = _target_tiles().more_warps_over
    if more_warps_over is not None:
        if num_warps < 16 and block_n > more_warps_over:
            tiles.append((block_m, block_n, single, num_warps * 2))
        if block_m > 1 and num_warps > 4:
            tiles.append((block_m // 2, block_n, single, num_warps // 2))
    return [dict(zip(TILE_KEYS, tile, strict=True)) for tile in tiles]


def _tuned_tile(pass_name: str, x2: torch.Tensor, launch, op: str) -> dict[str, int]:
    """The tile config to launch `x2`'s (M, N) rows with: tuned once per bucket on a GPU
    (kernels/_autotune.py; `launch(config)` runs the pass with a config), pinned elsewhere.
    `op` names the bucket's op: "layer_norm", or "add_layer_norm" (the fused residual add,
    the kernels' flags on, tuned apart)."""
    m, n = x2.shape
    key = _autotune.bucket_key(
        f"{op}.{pass_name}", x2.dtype, f"N<={triton.next_power_of_2(n)}", m,
        _autotune.arch_name(x2.device),
    )  # fmt: skip
    device_key = _autotune.tuning_device_key(x2.device)
    candidates = _tile_candidates(m, n)
    return _autotune.choose(key, candidates, launch, device_key, no_timing=_autotune.tracing(x2))


def layer_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The forward pass of LayerNorm and, given a residual, of the residual add fused with it
    (kernels/fused_add_layer_norm.py), no autograd. x, residual (..., N), weight/bias (N,) ->
    (y, mean, rstd, s): the rows normalized are x, or s = residual + x (..., N) contiguous in
    result_type(residual, x) (None without a residual); y (..., N) contiguous in their dtype,
    mean and rstd (...,) fp32."""
    if residual is not None and not use_triton(x.device):  # PyTorch's add, then the fallback
        s = residual + x
        y, mean, rstd, _ = layer_norm_forward(s, weight, bias, eps)
        return y, mean, rstd, s
    n = x.shape[-1]
    dtype = x.dtype if residual is None else torch.result_type(residual, x)
    y = _empty(x.shape, dtype, x.device)
    s = None if residual is None else _empty(x.shape, dtype, x.device)
    mean = _empty(x.shape[:-1], torch.float32, x.device)
    rstd = _empty(x.shape[:-1], torch.float32, x.device)
    if x.numel() == 0:
        return y, mean, rstd, s
    if not use_triton(x.device):  # CPU without the interpreter: the same math in PyTorch
        xf = x.float()
        mean.copy_(xf.mean(dim=-1))
        rstd.copy_(torch.rsqrt(xf.var(dim=-1, unbiased=False) + eps))
        xhat = (xf - mean[..., None]) * rstd[..., None]
        y.copy_(xhat * weight.float() + bias.float())
        return y, mean, rstd, s
    x2 = _rows(x, n)  # (M, N)
    r2 = None if residual is None else _rows(residual, n)  # (M, N)
    m = x2.shape[0]
    w, b = weight.contiguous(), bias.contiguous()
    r_stride = None if r2 is None else r2.stride(0)

    def launch(tile: dict[str, int]) -> None:  # every output written whole by each launch
        _layer_norm_forward_kernel[(triton.cdiv(m, tile["BLOCK_M"]),)](
            x2, r2, w, b, y, s, mean, rstd, x2.stride(0), r_stride, n, m, n, eps,
            **tile, HAS_RESIDUAL=r2 is not None,
        )  # fmt: skip

    # tuned by the dtype of the rows normalized (s's, as y's), the fused op in buckets apart
    tuning_rows, op = (x2, "layer_norm") if s is None else (s.view(m, n), "add_layer_norm")
    launch(_tuned_tile("forward", tuning_rows, launch, op=op))
    return y, mean, rstd, s


def _num_backward_programs(device: torch.device, num_row_tiles: int) -> int:
    """How many programs share the rows in the backward pass (= rows of the partial buffers)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(num_row_tiles, 2 * sms))
    return max(1, min(num_row_tiles, 8))


def layer_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dresidual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward pass of `layer_norm_forward`, no autograd. dy, x (..., N) (x: the rows
    normalized, the forward's x or s), weight (N,), mean/rstd (...,) fp32, and with the fused
    residual add dresidual (..., N), the gradient reaching s from its other uses, added to dx
    -> dx (..., N) in x's dtype, dweight and dbias (N,) in weight's dtype."""
    if dresidual is not None and not use_triton(x.device):
        dx, dw, db = layer_norm_backward(dy, x, weight, mean, rstd)
        return dx + dresidual, dw, db
    n = x.shape[-1]
    dx = _empty(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        zeros = torch.zeros(n, dtype=weight.dtype, device=x.device)
        return dx, zeros, zeros.clone()
    if not use_triton(x.device):
        xf, dyf = x.float(), dy.float()
        xhat = (xf - mean[..., None]) * rstd[..., None]
        g = dyf * weight.float()
        c1 = (xhat * g).mean(dim=-1, keepdim=True)
        c2 = g.mean(dim=-1, keepdim=True)
        dx.copy_((g - (xhat * c1 + c2)) * rstd[..., None])
        dw = (dyf * xhat).reshape(-1, n).sum(0)
        db = dyf.reshape(-1, n).sum(0)
        return dx, dw.to(weight.dtype), db.to(weight.dtype)
    x2, dy2 = _rows(x, n), _rows(dy, n)  # (M, N)
    dres2 = None if dresidual is None else _rows(dresidual, n)  # (M, N)
    m = x2.shape[0]
    w, mean1, rstd1 = weight.contiguous(), mean.reshape(-1), rstd.reshape(-1)
    dres_stride = None if dres2 is None else dres2.stride(0)

    def launch(tile: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """dx written whole; the (P, N) partial sums of dw and db, fresh for each launch."""
        programs = _num_backward_programs(x.device, triton.cdiv(m, tile["BLOCK_M"]))
        if tile["SINGLE_TILE"]:  # each program stores its row of the partial sums once
            dw_partial = _empty((programs, n), torch.float32, x.device)  # (P, N)
            db_partial = _empty((programs, n), torch.float32, x.device)  # (P, N)
        else:  # the looping path accumulates into its row, so it must start at zero
            dw_partial = torch.zeros((programs, n), dtype=torch.float32, device=x.device)
            db_partial = torch.zeros((programs, n), dtype=torch.float32, device=x.device)
        _layer_norm_backward_kernel[(programs,)](
            dy2, x2, w, mean1, rstd1, dres2, dx, dw_partial, db_partial,
            dy2.stride(0), x2.stride(0), dres_stride, n, m, n, **tile,
            HAS_DRESIDUAL=dres2 is not None,
        )  # fmt: skip
        return dw_partial, db_partial

    op = "layer_norm" if dres2 is None else "add_layer_norm"
    dw_partial, db_partial = launch(_tuned_tile("backward", x2, launch, op=op))
    # torch's sum over dim 0 of a fixed-shape buffer runs in a fixed order: deterministic.
    return dx, dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)


# --- torch.library ops -------------------------------------------------------------------


@torch.library.custom_op("fastgpt::layer_norm_forward", mutates_args=())
def _layer_norm_forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd, _ = layer_norm_forward(x, weight, bias, eps)
    return y, mean, rstd


@_layer_norm_forward_op.register_fake
def _(x, weight, bias, eps):
    stats = x.shape[:-1]
    return (
        x.new_empty(x.shape),
        x.new_empty(stats, dtype=torch.float32),
        x.new_empty(stats, dtype=torch.float32),
    )


@torch.library.custom_op("fastgpt::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_backward(dy, x, weight, mean, rstd)


@_layer_norm_backward_op.register_fake
def _(dy, x, weight, mean, rstd):
    n = x.shape[-1]
    return x.new_empty(x.shape), weight.new_empty(n), weight.new_empty(n)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_backward_op(dy, x, weight, mean, rstd)
    return dx, dw, db.to(ctx.bias_dtype), None


_layer_norm_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --- Public API --------------------------------------------------------------------------


def check_layer_norm_inputs(
    op: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.device:
    """The device of `layer_norm`'s inputs (with a residual: `add_layer_norm`'s); TypeError /
    ValueError naming the first bad one, the message starting with `op`."""
    device = check_same_device(x=x, residual=residual, weight=weight, bias=bias)
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        check_float(name, t)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension, got a scalar")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"{op}: residual must have x's shape {tuple(x.shape)}, "
            f"got {tuple(residual.shape)} (no broadcasting)"
        )
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (n,):
            raise ValueError(
                f"{op}: {name} must have shape ({n},) to match x's last dimension "
                f"(x is {tuple(x.shape)}), got {tuple(t.shape)}"
            )
    return device


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm of x over its last dimension. x: (..., N) fp32/fp16/bf16, weight/bias: (N,)
    -> (..., N) in x's dtype (contiguous), differentiable in x, weight and bias.

    Mixed dtypes are promoted, not refused: the math is fp32 whatever the inputs, y and dx
    come in x's dtype and dweight/dbias in the parameters' (an fp32 model fed fp16
    activations, or fp16 parameters given fp32 inputs, both work as with F.layer_norm under
    autocast).

    CUDA: Triton kernels. CPU: the same kernels through Triton's interpreter when
    TRITON_INTERPRET=1, else `layer_norm_reference`. Empty x goes to the reference too.
    Raises TypeError for non-float tensors, ValueError for mixed devices or weight/bias shapes
    other than (N,)."""
    device = check_layer_norm_inputs("layer_norm", x, weight, bias)
    check_gpu("layer_norm", x, weight, bias)
    if x.numel() == 0 or not use_triton(device):
        return layer_norm_reference(x, weight, bias, eps)
    y, _, _ = torch.ops.fastgpt.layer_norm_forward(x, weight, bias, float(eps))
    return y


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with learned `weight` (ones) and `bias` (zeros), the
    state-dict keys of GPT-2's layer norms. dim: width N; eps: added to the variance."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)
