"""Fused linear + cross-entropy: the loss of a linear head whose (N × V) logits never exist.

    loss = cross_entropy(hidden @ weight.T + bias, targets)

`fused_linear_cross_entropy(hidden, weight, targets, bias=None, *, ignore_index=-100,
reduction="mean", num_classes=None, check_targets=True, use_kernel=True)` takes hidden (N, d),
weight (V, d) (an `nn.Linear(d, V)`'s weight, e.g. GPT-2's output head), optional bias (V,) and
targets (N,) int64, and returns the fp32 loss: a scalar for "mean" (over the targets that are not
`ignore_index`, nan when all are, as `F.cross_entropy`) and "sum", (N,) for "none" (0 at ignored
targets). It is differentiable in hidden, weight and bias. With num_classes < V only the first
num_classes rows of weight are classes: the rest pad the head to an aligned size (GPT-2's 50,257
to 50,304, `GPTConfig.vocab_multiple`), so the matmuls run on V rows, while those rows' logits
get no probability and their gradient rows are 0: the loss of the unpadded head.
hidden, weight and bias share one dtype, fp32, fp16 or bf16; every sum and the log-sum-exp are
fp32, so logits of ±1e4 do not overflow; the gradients are deterministic (no atomics: the
chunks are visited in order and each reduction has a fixed order).

Memory: the rows are processed in chunks of C rows (`_chunk_rows`), so besides the inputs and
the gradients (O(N·d + V·d)) only one (C × V) block of logits is alive at a time, never (N × V).
C is set by a budget, LOGITS_BUDGET_BYTES = 256 MiB of logits in the input dtype: gpt2-small's
head (V 50,257, d 768) takes 2,670 bf16 rows, so 8,192 tokens run in 4 chunks of 2,048 rows
(fp32: 1,335 rows, 7 chunks) and 16,384 in 7 (fp32: 13). At 16k tokens in fp32 the unfused loss
holds several (N × V) fp32 tensors (3.3 GB each); the fused one the 256 MiB chunk, the fp32
grad_weight (154 MB) and grad_hidden (`benchmarks/fused_loss_memory.py` measures both on CPU).
Per chunk, Liger-Kernel's way:

    logits  = hidden[chunk] @ weight.T + bias                 (C, V), one matmul, input dtype
    kernel  : loss per row and, in place of the logits, dz = softmax(logits) - onehot(target)
    grad_hidden[chunk] = dz @ weight;   grad_weight += dz.T @ hidden[chunk] (fp32, in place);
    grad_bias += Σ_rows dz (fp32)

grad_weight is one fp32 (V, d) accumulator for the whole call, added to in place by each chunk
(`_addmm_fp32`): no (V, d) tensor is allocated per chunk.

For "mean" and "sum" the gradients are computed during the forward pass and kept for backward,
which only scales them by the upstream gradient (÷ the number of counted targets for "mean"):
three matmuls in all instead of the unfused four. That backward allocates the returned
gradients and nothing of their size besides (`_scaled`; autograd's zero gradients of the
saved outputs are not materialized). For "none" the upstream gradient differs per
row, so the forward computes the losses only and the backward recomputes each chunk's logits
with dz scaled per row.

Where it runs (see `kernels/_dispatch.py`): on CUDA the per-chunk loss/gradient step is the
Triton kernel below; on CPU it runs through Triton's interpreter when TRITON_INTERPRET=1, and
otherwise the same step in PyTorch (`chunked_linear_cross_entropy_torch` always takes that
path). The matmuls are PyTorch's (cuBLAS on CUDA). The chunk loop is the `torch.library` op
`fastgpt::fused_linear_cross_entropy_forward` (and `..._backward` for "none") with an autograd
formula, so a model calling it compiles with `torch.compile(fullgraph=True)`.
`fused_linear_cross_entropy_reference` is the unfused loss, for the tests.

Bad inputs raise before any kernel runs: TypeError for dtypes (non-float hidden/weight/bias,
mixed dtypes, targets not int64), ValueError for shapes, devices, `reduction`, `num_classes`, and
a target outside [0, num_classes) that is not `ignore_index` (checked on the values, never a
device-side assert). That last check reads the targets on the host, a sync: check_targets=False
skips it for a caller that checked its targets once (the model's training loss, whose data was
checked where it was built).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import (
    check_float,
    check_gpu,
    check_same_device,
    triton_interpreter_enabled,
    use_triton,
)
from ._dispatch import empty_output as _empty  # tests swap in a nan-filled allocator
from ._rowwise import program_rows

REDUCTIONS = ("mean", "sum", "none")

# Widest vocabulary tile of the kernel (columns); wider rows loop over tiles of this size (GPT-2's
# 50,257 = seven tiles on a GPU). The interpreter, slow per operation, takes 50,257 in one tile.
# Module-level so tests can shrink it to exercise the looping path cheaply.
# 8192-wide tiles with 8 warps on a GPU (16 fp32 per thread): 32768 with 32 warps capped a thread
# at 64 registers and ptxas spilled at V = 50257, and one 16384-wide tile with 16 warps spilled
# 16 B in the fp32 gradient on sm_80 with Triton 3.6 (the compile check).
MAX_BLOCK_V = 65536 if triton_interpreter_enabled() else 8192
# Rows per chunk (see `_chunk_rows`). None: the budget below; an int forces it (tests).
CHUNK_ROWS: int | None = None
# The most bytes one chunk's logits (C, V) may take, in the input dtype: 256 MiB.
LOGITS_BUDGET_BYTES = 256 << 20
# Elements per block when a fp32 gradient meets a low-precision dtype blockwise (`_scaled`'s
# rounding, `_addmm_fp32`'s fallback): 4M, a 16 MiB fp32 temporary.
SCALE_BLOCK_ELEMENTS = 1 << 22


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """The unfused loss: `F.cross_entropy(hidden @ weight.T + bias, targets, **options)` on the
    whole (N, V) logits, in fp32 (fp64 inputs stay fp64); options: F.cross_entropy's
    ignore_index (default -100) and reduction (default "mean"). hidden (N, d), weight (V, d),
    bias (V,), targets (N,) int64 -> scalar ("mean", "sum") or (N,) ("none")."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(dtype) @ weight.to(dtype).T  # (N, V)
    if bias is not None:
        logits = logits + bias.to(dtype)
    return F.cross_entropy(logits, targets, **options)


# --- Triton kernel -----------------------------------------------------------------------
#
# One chunk of M rows of logits z (M, V) in the input dtype. A program handles BLOCK_M rows and
# walks the vocabulary in tiles of BLOCK_V columns, twice:
#
# Pass 1, an online log-sum-exp in fp32 (the running maximum m and the sum s of exp(z - m)):
#     m' = max(m, max(tile)),   s = s · exp(m - m') + Σ exp(tile - m'),   m = m'
#     log-sum-exp = m + log(s)
# Every exponent is ≤ 0, so logits of ±1e4 neither overflow nor lose the row's largest terms.
# Then the target's logit z_t is read and loss = (m - z_t) + log(s) (0 where target ==
# ignore_index). m and log(s) are kept apart: their sum, rounded at |m| ~ 1e4, would carry an
# absolute error of ~1e-3 into every exp(z - m - log(s)) below.
#
# Pass 2 (COMPUTE_GRAD), the gradient of the row's loss with respect to its logits, written over
# the logits in place (they are not needed any more):
#     dz = (exp((z - m) - log(s)) - [column == target]) · scale        (0 on ignored rows)
# with `scale` the row's upstream gradient: 1 for "mean"/"sum" (scaled later, in fp32, by the
# autograd backward) and the per-row upstream gradient for "none". A stride of 0 lets one
# scale serve every row.
#
# When the row fits one tile (SINGLE_TILE: V <= BLOCK_V) it is read once: e = exp(z - max) is
# kept and softmax = e / Σ e. Rows past M (in the last program of a chunk) are masked:
# exponents there are taken against 0 and nothing becomes nan.


@triton.jit
def _cross_entropy_forward_kernel(
    logits_ptr,  # (M, V), rows logits_row_stride apart, columns contiguous; dz on exit
    targets_ptr,  # (M,) int64
    scale_ptr,  # (M,) fp32, scale_stride apart (0: one scale for every row)
    loss_ptr,  # (M,) fp32
    logits_row_stride,
    scale_stride,
    M,
    V,
    ignore_index,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    rows, row_mask = program_rows(M, BLOCK_M)  # (BLOCK_M,) int64, (BLOCK_M,)
    z_rows = logits_ptr + rows * logits_row_stride  # (BLOCK_M,) pointers to each row's start
    cols = tl.arange(0, BLOCK_V)  # (BLOCK_V,)
    target = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)  # (BLOCK_M,)
    counted = row_mask & (target != ignore_index)

    if SINGLE_TILE:  # the whole row in one tile: read once, keep exp(z - m) for the gradient
        mask = row_mask[:, None] & (cols[None, :] < V)  # (BLOCK_M, BLOCK_V)
        ptrs = z_rows[:, None] + cols[None, :]
        z = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.where(row_mask, tl.max(z, axis=1), 0.0)  # (BLOCK_M,)
        e = tl.exp(z - m[:, None])  # 0 where masked
        s = tl.where(row_mask, tl.sum(e, axis=1), 1.0)  # >= 1: the maximum contributes 1
        log_s = tl.log(s)
    else:
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            mask = row_mask[:, None] & (c[None, :] < V)  # (BLOCK_M, BLOCK_V)
            z = tl.load(z_rows[:, None] + c[None, :], mask=mask, other=float("-inf"))
            z = z.to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # masked rows only
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            m = m_new
        m = tl.where(row_mask, m, 0.0)
        log_s = tl.log(tl.where(row_mask, s, 1.0))
    z_target = tl.load(z_rows + tl.where(counted, target, 0), mask=counted, other=0.0)
    loss = tl.where(counted, (m - z_target.to(tl.float32)) + log_s, 0.0)  # (BLOCK_M,)
    tl.store(loss_ptr + rows, loss, mask=row_mask)

    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr + rows * scale_stride, mask=row_mask, other=0.0)
        scale = tl.where(counted, scale.to(tl.float32), 0.0)  # (BLOCK_M,)
        if SINGLE_TILE:
            p = e * (1.0 / s)[:, None]
            dz = tl.where(cols[None, :] == target[:, None], p - 1.0, p) * scale[:, None]
            tl.store(ptrs, dz.to(logits_ptr.dtype.element_ty), mask=mask)
        else:
            for start in range(0, V, BLOCK_V):
                c = start + cols
                mask = row_mask[:, None] & (c[None, :] < V)
                ptrs = z_rows[:, None] + c[None, :]
                z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                p = tl.exp((z - m[:, None]) - log_s[:, None])
                dz = tl.where(c[None, :] == target[:, None], p - 1.0, p) * scale[:, None]
                tl.store(ptrs, dz.to(logits_ptr.dtype.element_ty), mask=mask)


# --- Launchers ---------------------------------------------------------------------------


def _chunk_rows(n: int, v: int, itemsize: int) -> int:
    """Rows per chunk of N rows of V logits of `itemsize` bytes: as many as fit
    LOGITS_BUDGET_BYTES (`CHUNK_ROWS` replaces the budget). The N rows are then split into
    that many chunks of equal size (the last at most one row shorter), so no small tail chunk
    is left over: a matmul of a few rows is slow on a GPU and, in CPU BLAS, takes a less
    accurate path (up to 10x the rounding error over a 50k-long sum)."""
    if n == 0:
        return 1
    if CHUNK_ROWS is not None:
        rows = max(1, CHUNK_ROWS)
    else:
        rows = max(1, LOGITS_BUDGET_BYTES // (v * itemsize))
    return triton.cdiv(n, triton.cdiv(n, rows))


def _tile(m: int, v: int) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_V, SINGLE_TILE, num_warps) for a chunk of M rows of V logits. On a GPU
    one row per program (a chunk has hundreds of rows), the vocabulary in tiles of up to
    MAX_BLOCK_V (SINGLE_TILE when one tile holds it); the interpreter runs programs one by one,
    so there several rows share a program."""
    block_v = min(triton.next_power_of_2(v), MAX_BLOCK_V)
    if triton_interpreter_enabled():
        block_m = max(1, min((1 << 18) // block_v, triton.next_power_of_2(m)))
    else:
        block_m = 1
    num_warps = min(16, max(4, block_v // 1024))
    return block_m, block_v, block_v >= v, num_warps


def _cross_entropy_chunk(
    z: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    loss: torch.Tensor,
    ignore_index: int,
    compute_grad: bool,
    use_kernel: bool,
) -> None:
    """Loss per row of the chunk z (M, V) into loss (M,) fp32; with compute_grad, dz over z.
    scale: (M,) fp32 or (1,) for every row. Without use_kernel (CPU without the interpreter)
    the kernel's step in PyTorch, the same math, in place."""
    if not use_kernel:
        zf = z.float()  # z itself when fp32 (then overwritten in place: it is ours)
        counted = targets != ignore_index
        safe = torch.where(counted, targets, 0)
        m = zf.amax(dim=1, keepdim=True)  # (M, 1)
        z_target = zf.gather(1, safe[:, None])  # (M, 1)
        shifted = zf.sub_(m)  # z - max, in place
        log_s = torch.logsumexp(shifted, dim=1, keepdim=True)  # (M, 1), log Σ exp(z - max)
        loss.copy_(torch.where(counted, ((m - z_target) + log_s).squeeze(1), 0.0))
        if compute_grad:
            p = shifted.sub_(log_s).exp_()  # (M, V) softmax, in place
            p[torch.arange(p.shape[0], device=p.device), safe] -= 1.0
            p.mul_(torch.where(counted, scale.float(), 0.0)[:, None])
            if p is not z:
                z.copy_(p)
        return
    m, v = z.shape
    block_m, block_v, single, num_warps = _tile(m, v)
    scale_stride = 0 if scale.numel() == 1 else scale.stride(0)
    _cross_entropy_forward_kernel[(triton.cdiv(m, block_m),)](
        z, targets, scale, loss,
        z.stride(0), scale_stride, m, v, ignore_index,
        BLOCK_M=block_m, BLOCK_V=block_v, SINGLE_TILE=single, COMPUTE_GRAD=compute_grad,
        num_warps=num_warps,
    )  # fmt: skip


_FP32_OUT_ADDMM: dict[tuple[str, torch.dtype], bool] = {}


def _fp32_out_addmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.addmm(acc, half, half, out_dtype=torch.float32, out=acc)` (cuBLAS
    accumulating into the fp32 acc in place, in one call) runs and is right on this device;
    probed once per device and dtype."""
    key = (str(device), dtype)
    if key not in _FP32_OUT_ADDMM:
        ok = False
        if device.type == "cuda":
            try:
                g = torch.Generator(device="cpu").manual_seed(0)
                a, b = torch.randn(16, 32, generator=g), torch.randn(32, 8, generator=g)
                c = torch.randn(16, 8, generator=g)
                a2, b2, acc = a.to(device, dtype), b.to(device, dtype), c.to(device)
                got = torch.addmm(acc, a2, b2, out_dtype=torch.float32, out=acc)
                want = c + a2.float().cpu() @ b2.float().cpu()
                ok = got is acc and torch.allclose(acc.cpu(), want, atol=1e-3)
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _FP32_OUT_ADDMM[key] = ok
    return _FP32_OUT_ADDMM[key]


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in place, acc (R, d) fp32, a (R, C) and b (C, d) in the input dtype: fp32
    by addmm_; fp16/bf16 by one cuBLAS call accumulating in fp32 where available, else in
    blocks of SCALE_BLOCK_ELEMENTS of acc, each product rounded to the input dtype and added
    in fp32 (a (block, d) temporary, never a whole (R, d) one)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _fp32_out_addmm_works(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        step = max(1, SCALE_BLOCK_ELEMENTS // max(1, acc.shape[1]))  # rows of acc a block
        for start in range(0, acc.shape[0], step):
            acc[start : start + step].add_(torch.mm(a[start : start + step], b))


def _check_target_values(targets: torch.Tensor, v: int, ignore_index: int) -> None:
    """ValueError naming the first target outside [0, V) that is not ignore_index (reads the
    targets on the host: a sync)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"fused_linear_cross_entropy: targets[{i}] = {int(targets[i])} is outside the "
            f"classes [0, {v}) and is not ignore_index ({ignore_index})"
        )


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    num_classes: int,
    compute_grad: bool,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The chunk loop. hidden (N, d), weight (V, d), bias (V,) | None, targets (N,) int64 in
    [0, num_classes) or ignore_index, scale (N,) or (1,) fp32 (the upstream gradient of each
    row's loss) -> loss (N,) fp32 and, with compute_grad, grad_hidden (N, d) in hidden's
    dtype, grad_weight (V, d) and grad_bias (V,) | None in fp32, for the upstream gradient
    `scale`. Columns past num_classes (a padded head) are computed by the matmul and then
    left out: their dz is 0."""
    n, d = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    targets = targets.contiguous()
    scale = scale.contiguous()
    loss = _empty((n,), torch.float32, device)
    grad_hidden = grad_weight = grad_bias = None
    if compute_grad:
        grad_hidden = _empty((n, d), hidden.dtype, device)
        grad_weight = torch.zeros((v, d), dtype=torch.float32, device=device)
        if bias is not None:
            grad_bias = torch.zeros(v, dtype=torch.float32, device=device)
    rows = _chunk_rows(n, v, hidden.element_size())
    buffer = _empty((min(rows, n), v), hidden.dtype, device)  # the one block of logits
    weight_t = weight.t()  # (d, V) view
    for start in range(0, n, rows):
        end = min(start + rows, n)
        h = hidden[start:end]  # (C, d)
        z = buffer[: end - start]  # (C, V)
        if bias is None:
            torch.mm(h, weight_t, out=z)
        else:
            torch.addmm(bias, h, weight_t, out=z)
        s = scale if scale.numel() == 1 else scale[start:end]
        chunk_targets = targets[start:end]
        classes = z[:, :num_classes]  # (C, num_classes), rows V apart
        _cross_entropy_chunk(
            classes, chunk_targets, s, loss[start:end], ignore_index, compute_grad, use_kernel
        )
        if compute_grad:  # z now holds dz (C, V)
            z[:, num_classes:].zero_()  # the padding's logits get no probability
            torch.mm(z, weight, out=grad_hidden[start:end])
            _addmm_fp32(grad_weight, z.t(), h)
            if grad_bias is not None:
                grad_bias += torch.sum(z, dim=0, dtype=torch.float32)
    return loss, grad_hidden, grad_weight, grad_bias


# --- torch.library ops -------------------------------------------------------------------


@torch.library.custom_op("fastgpt::fused_linear_cross_entropy_forward", mutates_args=())
def _fused_forward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    num_classes: int,
    reduction: str,
    compute_grad: bool,
    use_kernel: bool,
    check_targets: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, grad_hidden, grad_weight, grad_bias). The gradients are those of the summed
    loss (upstream gradient 1 per row, before "mean"'s division), computed only for "mean"/"sum"
    with compute_grad; otherwise, like an absent bias's, empty (0,) placeholders.
    check_targets: read the targets' values first (a host sync) and raise for a bad one."""
    if check_targets:
        _check_target_values(targets, num_classes, ignore_index)
    grad = compute_grad and reduction != "none"
    one = torch.ones(1, dtype=torch.float32, device=hidden.device)
    rows, gh, gw, gb = _chunked(
        hidden, weight, bias, targets, one, ignore_index, num_classes, grad, use_kernel
    )
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:  # 0 / 0 = nan when every target is ignored, as F.cross_entropy
        loss = rows.sum() / (targets != ignore_index).sum()
    f32 = torch.float32
    return (  # placeholders must not alias each other: a fresh empty tensor each
        loss,
        gh if gh is not None else hidden.new_empty((0,)),
        gw if gw is not None else hidden.new_empty((0,), dtype=f32),
        gb if gb is not None else hidden.new_empty((0,), dtype=f32),
    )


@_fused_forward_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, num_classes, reduction, compute_grad,
      use_kernel, check_targets):  # fmt: skip
    n, d = hidden.shape
    v = weight.shape[0]
    grad = compute_grad and reduction != "none"
    f32 = torch.float32
    return (
        hidden.new_empty((n,) if reduction == "none" else (), dtype=f32),
        hidden.new_empty((n, d) if grad else (0,)),
        hidden.new_empty((v, d) if grad else (0,), dtype=f32),
        hidden.new_empty((v,) if grad and bias is not None else (0,), dtype=f32),
    )


@torch.library.custom_op("fastgpt::fused_linear_cross_entropy_backward", mutates_args=())
def _fused_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    grad_loss: torch.Tensor,
    ignore_index: int,
    num_classes: int,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduction="none": grad_loss (N,) fp32 -> grad_hidden (N, d) in hidden's dtype,
    grad_weight (V, d) and grad_bias (V,) (or (0,) without bias) in fp32."""
    _, gh, gw, gb = _chunked(
        hidden, weight, bias, targets, grad_loss, ignore_index, num_classes, True, use_kernel
    )
    return gh, gw, gb if gb is not None else grad_loss.new_empty((0,))


@_fused_backward_op.register_fake
def _(hidden, weight, targets, bias, grad_loss, ignore_index, num_classes, use_kernel):
    v, d = weight.shape
    f32 = torch.float32
    return (
        hidden.new_empty(hidden.shape),
        hidden.new_empty((v, d), dtype=f32),
        hidden.new_empty((v,) if bias is not None else (0,), dtype=f32),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, num_classes, reduction, _, use_kernel, _ = inputs
    _, gh, gw, gb = output
    ctx.reduction, ctx.ignore_index, ctx.use_kernel = reduction, ignore_index, use_kernel
    ctx.num_classes = num_classes
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, targets)
    else:
        ctx.save_for_backward(gh, gw, gb, targets)
    ctx.mark_non_differentiable(gh, gw, gb)
    # gh, gw, gb never get a gradient: without this, autograd would hand _backward zero-filled
    # (N, d) and (V, d) tensors for them (another 147 MiB at gpt2-small's head, fp32).
    ctx.set_materialize_grads(False)


def _scaled(grad: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(grad.float() * scale).to(dtype) bit for bit, with no whole-size fp32 temporary: fp32 in
    place of fp32, and for a low-precision result blocks of SCALE_BLOCK_ELEMENTS rounded into
    it one at a time (a single mul with a bf16 `out=` would still make the whole fp32 product
    first: 147 MiB for gpt2-small's grad_weight). grad (R, ...) is saved for backward, so it is
    never scaled in place: a second backward (retain_graph=True) must find it unchanged."""
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    if grad.dtype == dtype == torch.float32:
        return torch.mul(grad, scale, out=out)
    rows = grad.shape[0]  # grad_hidden (N, d), grad_weight (V, d), grad_bias (V,)
    step = max(1, SCALE_BLOCK_ELEMENTS // max(1, grad.numel() // max(1, rows)))  # rows a block
    for start in range(0, rows, step):
        block = slice(start, start + step)
        out[block].copy_(grad[block].float() * scale)  # fp32 math, one rounding to dtype
    return out


def _backward(ctx, grad_loss, _dgh, _dgw, _dgb):
    hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
    if grad_loss is None:  # no gradient reached the loss (grads are not materialized)
        return (None,) * 10
    if ctx.reduction == "none":
        hidden, weight, bias, targets = ctx.saved_tensors
        gh, gw, gb = _fused_backward_op(
            hidden, weight, targets, bias, grad_loss.float().contiguous(),
            ctx.ignore_index, ctx.num_classes, ctx.use_kernel,
        )  # fmt: skip
        gh, gw = gh.to(hidden_dtype), gw.to(weight_dtype)
        grad_bias = None if bias_dtype is None else gb.to(bias_dtype)
    else:
        gh, gw, gb, targets = ctx.saved_tensors  # (N, d), (V, d) fp32, (V,) fp32 | (0,)
        scale = grad_loss.float()  # () fp32
        if ctx.reduction == "mean":  # nothing counted: the gradients are 0, not 0 / 0
            scale = scale / (targets != ctx.ignore_index).sum().clamp(min=1)
        gh, gw = _scaled(gh, scale, hidden_dtype), _scaled(gw, scale, weight_dtype)
        grad_bias = None if bias_dtype is None else _scaled(gb, scale, bias_dtype)
    return gh, gw, grad_bias, *(None,) * 7


_fused_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --- Public API --------------------------------------------------------------------------


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    reduction: str,
    num_classes: int,
) -> torch.device:
    """TypeError/ValueError naming the bad argument; returns the common device."""
    name = "fused_linear_cross_entropy"
    device = check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    for arg, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        check_float(arg, t)
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(
                f"{name}: {arg} must have hidden's dtype {hidden.dtype}, got {t.dtype} "
                "(cast them to one dtype)"
            )
    if targets.dtype != torch.int64:
        raise TypeError(
            f"{name}: targets must be int64 (torch.long) class ids, got {targets.dtype}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2:
        raise ValueError(
            f"{name}: hidden must be 2-D (N, d), got shape {tuple(hidden.shape)} "
            "(flatten the leading dimensions, e.g. hidden.flatten(0, 1))"
        )
    n, d = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != d or weight.shape[0] == 0:
        raise ValueError(
            f"{name}: weight must have shape (V, {d}) with V >= 1 to match hidden "
            f"{tuple(hidden.shape)}, got {tuple(weight.shape)}"
        )
    v = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(
            f"{name}: bias must have shape ({v},) to match weight {tuple(weight.shape)}, "
            f"got {tuple(bias.shape)}"
        )
    if tuple(targets.shape) != (n,):
        raise ValueError(
            f"{name}: targets must have shape ({n},) to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or not 1 <= num_classes <= v
    ):
        raise ValueError(
            f"{name}: num_classes must be an int in [1, {v}] (weight's rows), got {num_classes!r}"
        )
    return device


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_classes: int | None = None,
    check_targets: bool = True,
    use_kernel: bool = True,
) -> torch.Tensor:
    """Cross-entropy of the logits `hidden @ weight.T + bias` against `targets`, computed in
    chunks of rows so that the (N, V) logits never exist.

    hidden (N, d), weight (V, d), bias (V,) or None: one dtype, fp32/fp16/bf16, one device;
    targets (N,) int64 class ids in [0, num_classes) or `ignore_index`; num_classes (default
    V): the classes are weight's first num_classes rows, the others pad the head (their logits
    get no probability, their gradient rows are 0). Returns fp32: a scalar for "mean" (over
    counted targets; nan when none is) and "sum", (N,) for "none" (0 where ignored).
    Differentiable in hidden, weight and bias; the gradients have their dtypes.

    CUDA: the Triton kernel per chunk. CPU: the kernel through Triton's interpreter when
    TRITON_INTERPRET=1, else the same chunks in PyTorch; use_kernel=False takes PyTorch's
    step everywhere. Raises TypeError/ValueError for bad inputs (see the module docstring)
    before any kernel runs. check_targets=False skips reading the targets' values (a host
    sync) for callers that checked them once: a target outside [0, num_classes) is then
    undefined behaviour."""
    v = weight.shape[0] if weight.dim() == 2 else 0
    num_classes = v if num_classes is None else num_classes
    device = _check_inputs(hidden, weight, targets, bias, reduction, num_classes)
    check_gpu("fused_linear_cross_entropy", hidden, weight, bias)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    loss, _, _, _ = torch.ops.fastgpt.fused_linear_cross_entropy_forward(
        hidden, weight, bias, targets, int(ignore_index), num_classes, reduction, compute_grad,
        use_kernel and use_triton(device), check_targets,
    )  # fmt: skip
    return loss


chunked_linear_cross_entropy_torch = functools.partial(fused_linear_cross_entropy, use_kernel=False)
chunked_linear_cross_entropy_torch.__doc__ = """`fused_linear_cross_entropy` with use_kernel=False
(same arguments): the per-chunk step in PyTorch (never Triton), the same chunks and memory bound
on any device. The CPU benchmarks time this."""
