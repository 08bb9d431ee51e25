"""Flash attention (FlashAttention-2) in Triton: fused causal mask, forward and backward, dropout.

    out = attention(q, k, v, causal=True)  # q (B, H, Tq, D), k/v (B, H, Tk, D) -> (B, H, Tq, D)

The T×T score matrix is never materialized: each program holds one tile of queries and streams
tiles of keys and values through fast memory, keeping a running (online) softmax. What is saved
for the backward pass is the output and one number per query row, the log-sum-exp of its scores.

The conventions every kernel here follows (causal alignment, base-2 scores, tile bounds, the
Philox counter of dropout, int32/int64 offsets) are written down in `kernels/flash_core.py`,
which holds the building blocks these kernels are made of.

Where it runs (see `kernels/_dispatch.py`): CUDA tensors run the Triton kernels; CPU tensors run
them through Triton's interpreter when TRITON_INTERPRET=1, else `attention_reference` (whose
dropout then comes from PyTorch's generator, not from `seed`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

try:  # host tensor descriptors (TMA on sm_90), in Triton since 3.4; without them: no TMA candidate
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

from . import _autotune
from . import flash_core as fc
from ._dispatch import (
    bf16_in_fp32_under_interpreter,
    check_gpu,
    check_same_device,
    define_op,
    triton_interpreter_enabled,
    use_triton,
)
from ._dispatch import empty_output as _empty  # tests swap in a nan-filled allocator
from .flash_core import ATTENTION_TILES, attention_reference, seed_tensor
from .flash_core import SUPPORTED_HEAD_DIMS as SUPPORTED_HEAD_DIMS  # the op's API
from .flash_core import target_arch as _target_arch  # tests pin the arch through this name

# --- forward -----------------------------------------------------------------------------


@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,  # (B, H, T, D) each (Tq rows: q, out; Tk: k, v), any strides
    lse_ptr,  # (B·H, Tq) fp32 contiguous, base-2 log-sum-exp of each row's scores
    seed_ptr,  # (1,) int64 Philox seed, or None without dropout
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
    H, Tq, Tk, D, qk_scale, dropout_p,  # qk_scale = sm_scale · log2(e)
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TMA: tl.constexpr = False,  # q, k, v, out are host TensorDescriptors (sm_90+, see below)
):  # fmt: skip
    bh, b, h, m_start = fc.program_tile(Tq, H, BLOCK_M, True)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if TMA:  # whole tensors' descriptors, indexed by head inside the loads
        q = fc.tma_load_tile(q_ptr, b, h, m_start, BLOCK_M, BLOCK_D)  # (BLOCK_M, BLOCK_D)
        k_base = k_ptr
        v_base = v_ptr
    else:
        q = fc.load_tile(  # (BLOCK_M, BLOCK_D)
            q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Tq, D
        )
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
    seed = fc.load_seed(seed_ptr, DROPOUT)
    out, lse = fc.forward_tile(
        q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d,
        bh, b, h, m_start, Tq, Tk, D, qk_scale, dropout_p, seed,
        CAUSAL, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, TMA, False,
    )  # fmt: skip
    tl.store(lse_ptr + bh * Tq + offs_m, lse, mask=offs_m < Tq)
    if TMA:  # rows past Tq and columns past D are clipped; out has q's dtype (the launcher's)
        tile = out.to(q.dtype).reshape(1, 1, BLOCK_M, BLOCK_D)
        out_ptr.store([b.to(tl.int32), h.to(tl.int32), m_start, 0], tile)
    else:
        out_base = out_ptr + b * stride_ob + h * stride_oh
        fc.store_tile(out_base, out, offs_m, offs_d, stride_om, stride_od, Tq, D)


# --- backward ----------------------------------------------------------------------------
#
# Three kernels (the math and the work split: kernels/flash_core.py): delta = rowsum(dout ∘ out),
# then dk/dv per key tile, then dq per query tile. The two gradient kernels take the same
# inputs, then their outputs: q, k, v, dout (B, H, T, D) any strides (Tq rows: q, dout; Tk: k,
# v), lse and delta (B·H, Tq) fp32 contiguous, the (1,) int64 Philox seed or None without
# dropout; qk_scale is sm_scale · log2(e).


@triton.jit
def _attention_backward_preprocess_kernel(
    out_ptr,  # (B, H, Tq, D), any strides
    dout_ptr,  # (B, H, Tq, D), any strides
    delta_ptr,  # (B·H, Tq) fp32 contiguous
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, Tq, D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh, b, h, m_start = fc.program_tile(Tq, H, BLOCK_M, False)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    out_base = out_ptr + b * stride_ob + h * stride_oh
    out = fc.load_tile(out_base, offs_m, offs_d, stride_om, stride_od, Tq, D).to(tl.float32)
    do_base = dout_ptr + b * stride_dob + h * stride_doh
    dout = fc.load_tile(do_base, offs_m, offs_d, stride_dom, stride_dod, Tq, D).to(tl.float32)
    tl.store(delta_ptr + bh * Tq + offs_m, tl.sum(out * dout, axis=1), mask=offs_m < Tq)


@triton.jit
def _attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, seed_ptr,  # the inputs (see above)
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
    dk_ptr, dv_ptr, stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # (B, H, Tk, D) each
    H, Tq, Tk, D, sm_scale, qk_scale, dropout_p,  # dk is stored times sm_scale
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh, b, h, n_start = fc.program_tile(Tk, H, BLOCK_N, False)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = fc.load_tile(  # (BLOCK_N, BLOCK_D)
        k_ptr + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kn, stride_kd, Tk, D
    )
    v = fc.load_tile(  # (BLOCK_N, BLOCK_D)
        v_ptr + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vn, stride_vd, Tk, D
    )
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = dout_ptr + b * stride_dob + h * stride_doh
    seed = fc.load_seed(seed_ptr, DROPOUT)
    dk, dv = fc.dkdv_tile(  # CLAMP_ONCE False
        k, v, q_base, do_base, lse_ptr + bh * Tq, delta_ptr + bh * Tq, stride_qm, stride_qd,
        stride_dom, stride_dod, offs_n, offs_d, n_start, Tq, Tk, D, qk_scale, dropout_p, seed, bh,
        CAUSAL, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, False,
    )  # fmt: skip
    start = b * stride_dkb + h * stride_dkh  # dv has dk's strides (the launcher's)
    fc.store_dkdv(dk_ptr, dv_ptr, start, dk, dv, offs_n, offs_d, stride_dkn, stride_dkd, Tk, D,
                  sm_scale)  # fmt: skip


@triton.jit
def _attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, seed_ptr,  # the inputs (see above)
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
    dq_ptr, stride_dqb, stride_dqh, stride_dqm, stride_dqd,  # (B, H, Tq, D)
    H, Tq, Tk, D, sm_scale, qk_scale, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh, b, h, m_start = fc.program_tile(Tq, H, BLOCK_M, True)  # the heaviest query tiles first
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dq = fc.dq_tile(
        q_ptr + b * stride_qb + h * stride_qh, dout_ptr + b * stride_dob + h * stride_doh,
        lse_ptr + bh * Tq, delta_ptr + bh * Tq,
        k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh,  # head (b, h)
        seed_ptr, stride_qm, stride_qd, stride_dom, stride_dod, stride_kn, stride_kd, stride_vn,
        stride_vd, offs_m, offs_d, bh, m_start, Tq, Tk, D, qk_scale, dropout_p,
        CAUSAL, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    dq_base = dq_ptr + b * stride_dqb + h * stride_dqh  # dq has its own strides
    fc.store_tile(dq_base, dq * sm_scale, offs_m, offs_d, stride_dqm, stride_dqd, Tq, D)


# --- dropout mask ------------------------------------------------------------------------


@triton.jit
def _attention_dropout_mask_kernel(
    keep_ptr,  # (B, H, Tq, Tk) int8 contiguous: 1 where the attention weight is kept
    seed_ptr,  # (1,) int64 Philox seed
    Tq,
    Tk,  # one head's weights: (Tq, Tk)
    dropout_p,
    BLOCK: tl.constexpr,
):
    # The B·H heads in a row: head bh = b·H + h is Philox's head bh.
    fc.dropout_mask_tile(keep_ptr, seed_ptr, Tq, Tk, 0, dropout_p, BLOCK)


# --- launchers ---------------------------------------------------------------------------


# The pinned tiles: `flash_core.ATTENTION_TILES`.


def _block_config(dtype: torch.dtype, head_dim: int) -> dict[str, dict[str, int]]:
    """Tile sizes and launch settings per kernel ("forward", "dkdv", "dq"): the pinned entry
    of ATTENTION_TILES for the target's arch (the interpreter's small tiles under it)."""
    return fc.block_config(ATTENTION_TILES, dtype, head_dim, _target_arch)


def _config_candidates(
    dtype: torch.dtype, head_dim: int, kernel: str, dropout: bool, tma: bool = False
) -> list[dict[str, int]]:
    """The configs a GPU may tune `kernel` ("forward", "dkdv", "dq") among, `_block_config`'s
    first (the pinned one: the interpreter and CPU run only it). 16-bit only: fp32's exact dots
    leave no register room. Without dropout: 3 pipeline stages where the pinned tile has
    fewer (shared memory, not registers; not on sm_100, whose ptxas spilled them); the
    program's own tile halved over half the warps (as many elements per thread; sm_90 only,
    kept at 64 rows or more so that its dots still lower to wgmma); the forward's key tile
    widened to 64 where the pinned one is narrower (head dim 128); and (sm_90 only) the
    pinned tile on as few warps as its rows need, where it has more. Triton lays a chain of
    dots' warps (S = q·kᵀ feeds P·v, Sᵀ feeds Pᵀ·dout) along the rows, 16 rows a warp
    (wgmma's m64 per 4 warps; mma.sync's m16 too, but there the operands sit in registers,
    which 4 warps do not have), where the chain's last accumulator has at least as many rows
    as columns (on mma.sync targets; else along the columns): more warps than rows / 16 issue
    every product of the chain more than once (sm_90's pinned tiles have rows = 16 x warps).
    sm_100's tcgen05 issues each product once per block, from one thread, whatever the warps
    (its SASS), so neither sm_90-only candidate has its reason there. Last, on sm_90 and
    sm_100 for the forward when `tma` (the launcher found its tensors legal for TMA,
    `_tma_legal`): the pinned tiles with q, k, v and out moved by TMA (config key "TMA": 1).
    With dropout (whose Philox leaves few registers) only that TMA twin and, where the key
    tile is narrower than 64 (sm_90's head dim 128), the widened key tile's TMA twin, since
    TMA leaves the addresses to the copy engine and its cp.async twin spills (128 x 64, sm_90,
    fp16, causal: 158 registers with TMA, 32 B of spills with cp.async, Triton 3.9). Each is
    compiled by the compile check."""
    pinned = _block_config(dtype, head_dim)[kernel]
    if triton_interpreter_enabled() or dtype == torch.float32:
        return [pinned]
    family = fc.arch_family(_target_arch())
    hopper = family == "sm_90"
    offer_tma = tma and family in ("sm_90", "sm_100") and kernel == "forward"
    offer_tma = offer_tma and TensorDescriptor is not None
    with_tma = [{**pinned, "TMA": 1}] if offer_tma else []
    widen = kernel == "forward" and pinned["BLOCK_N"] < 64  # the forward's key tile to 64
    if dropout:
        wider_tma = [{**pinned, "BLOCK_N": 64, "TMA": 1}] if offer_tma and widen else []
        return [pinned, *with_tma, *wider_tma]
    candidates = [pinned]
    # (not on sm_100: there ptxas spilled every 3-stage tile it was given, 8-32 B)
    if family != "sm_100" and pinned["num_stages"] < 3:
        candidates.append({**pinned, "num_stages": 3})
    own = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"  # the tile a program owns
    # The halved tile on sm_90 only: on sm_80 mma.sync keeps the operands in registers.
    if hopper and pinned[own] // 2 >= 64 and pinned["num_warps"] >= 8:
        candidates.append({**pinned, own: pinned[own] // 2, "num_warps": pinned["num_warps"] // 2})
    if widen:
        candidates.append({**pinned, "BLOCK_N": 64})
    warps_needed = max(4, pinned[own] // 16)
    if hopper and warps_needed < pinned["num_warps"]:
        candidates.append({**pinned, "num_warps": warps_needed})
    return candidates + with_tma


def _tma_legal(*tensors: torch.Tensor) -> bool:
    """Whether TMA may read or write these (B, H, T, D) tensors through host tensor
    descriptors: each has a unit last stride, a 16-byte aligned base, every other stride a
    multiple of 16 bytes and no empty dimension (what the hardware's tensor maps require). The
    model's q/k/v views of one (B, T, 3, H, D) projection are legal when D·2 bytes (16-bit) is a
    multiple of 16. Fake tensors (torch.compile tracing) have no address: not legal, so a
    compiled graph launches the pointer kernel. Decided once per layout (`_tma_legal_layout`):
    every forward call asks."""
    if torch.compiler.is_compiling() or any(is_fake(t) for t in tensors):
        return False
    return _tma_legal_layout(
        tuple((t.shape, t.stride(), t.element_size(), t.data_ptr() % 16) for t in tensors)
    )


@functools.lru_cache(maxsize=1024)
def _tma_legal_layout(layouts: tuple[tuple[torch.Size, tuple[int, ...], int, int], ...]) -> bool:
    """`_tma_legal` of tensors given as (shape, strides, element size, base address mod 16)."""
    return all(
        strides[-1] == 1
        and misalignment == 0
        and all(stride * size % 16 == 0 for stride in strides[:-1])
        and all(shape)
        for shape, strides, size, misalignment in layouts
    )


def _tuned_config(
    kernel: str, q: torch.Tensor, tk: int, causal: bool, dropout: bool, launch, tma: bool = False
) -> dict[str, int]:
    """The config to launch `kernel` with for q (B, H, Tq, D) against tk keys: tuned once per
    bucket on a GPU (kernels/_autotune.py; `launch(config)` runs the kernel), pinned
    elsewhere. The bucket names the dtype, head dim, causal/dropout and the longer length.
    tma: the tensors are legal for TMA (`_config_candidates`); a stored TMA choice is then
    launched only for tensors where it is a candidate, else the bucket is tuned again."""
    head_dim = q.shape[-1]
    # TMA-legal tensors tune in a bucket of their own (their candidates differ), so that a
    # stored TMA choice is never re-tuned away by a call whose tensors cannot take it.
    flags = [name for name, on in (("causal", causal), ("dropout", dropout), ("tma", tma)) if on]
    variant = ",".join([f"D={head_dim}", *flags])
    key = _autotune.bucket_key(
        f"attention.{kernel}", q.dtype, variant, max(q.shape[2], tk),
        _autotune.arch_name(q.device),
    )  # fmt: skip
    device_key = _autotune.tuning_device_key(q.device)
    candidates = _config_candidates(q.dtype, head_dim, kernel, dropout, tma)
    return _autotune.choose(key, candidates, launch, device_key, no_timing=_autotune.tracing(q))


@define_op("fastgpt::flash_attention_forward")
def _flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    sm_scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: (out (B, H, Tq, D) in q's dtype, lse (B, H, Tq) fp32)."""
    batch, heads, tq, head_dim = q.shape
    tk = k.shape[2]
    out = _empty((batch, heads, tq, head_dim), q.dtype, q.device)
    lse = _empty((batch, heads, tq), torch.float32, q.device)

    block_d = fc.padded_head_dim(head_dim)

    def launch(cfg: dict[str, int]) -> None:
        cfg = dict(cfg)
        tma = bool(cfg.pop("TMA", 0))
        grid = (triton.cdiv(tq, cfg["BLOCK_M"]) * batch * heads,)
        tensors = (q, k, v, out)
        if tma:  # descriptors over the whole (B, H, T, D) tensors, blocks of one head's rows
            rows = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_N"], cfg["BLOCK_M"])
            tensors = tuple(
                TensorDescriptor.from_tensor(t, [1, 1, n, block_d])
                for t, n in zip(tensors, rows, strict=True)
            )
        torch.library.wrap_triton(_attention_forward_kernel)[grid](
            *tensors, lse, seed,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, tq, tk, head_dim, sm_scale * fc.LOG2E, dropout_p,
            CAUSAL=causal, DROPOUT=dropout_p > 0.0, DOT_PRECISION=fc.dot_precision(q.dtype),
            BLOCK_D=block_d, TMA=tma, **cfg,
        )  # fmt: skip

    tma_legal = _tma_legal(q, k, v, out)
    launch(_tuned_config("forward", q, tk, causal, dropout_p > 0.0, launch, tma_legal))
    return out, lse


@define_op("fastgpt::flash_attention_backward")
def _flash_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    sm_scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three backward kernels: (dq, dk, dv) shaped and typed like q, k, v."""
    batch, heads, tq, head_dim = q.shape
    tk = k.shape[2]
    block_d = fc.padded_head_dim(head_dim)
    configs = _block_config(q.dtype, head_dim)
    precision = fc.dot_precision(q.dtype)
    dropout = dropout_p > 0.0
    delta = _empty((batch, heads, tq), torch.float32, q.device)
    dq = _empty((batch, heads, tq, head_dim), q.dtype, q.device)
    dk = _empty((batch, heads, tk, head_dim), k.dtype, k.device)
    dv = _empty((batch, heads, tk, head_dim), v.dtype, v.device)

    pre_block_m = configs["dq"]["BLOCK_M"]
    torch.library.wrap_triton(_attention_backward_preprocess_kernel)[
        (triton.cdiv(tq, pre_block_m) * batch * heads,)
    ](
        out, dout, delta, *out.stride(), *dout.stride(), heads, tq, head_dim,
        BLOCK_M=pre_block_m, BLOCK_D=block_d,
    )  # fmt: skip

    # The two gradient kernels take the same inputs, then their outputs, then the same scalars.
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    inputs = (q, k, v, dout, lse, delta, seed, *strides)
    scalars = (heads, tq, tk, head_dim, sm_scale, sm_scale * fc.LOG2E, dropout_p)
    flags = {"CAUSAL": causal, "DROPOUT": dropout, "DOT_PRECISION": precision, "BLOCK_D": block_d}

    def launch_dkdv(cfg: dict[str, int]) -> None:
        grid = (triton.cdiv(tk, cfg["BLOCK_N"]) * batch * heads,)
        torch.library.wrap_triton(_attention_backward_dkdv_kernel)[grid](
            *inputs, dk, dv, *dk.stride(), *scalars, **flags, **cfg
        )

    def launch_dq(cfg: dict[str, int]) -> None:
        grid = (triton.cdiv(tq, cfg["BLOCK_M"]) * batch * heads,)
        torch.library.wrap_triton(_attention_backward_dq_kernel)[grid](
            *inputs, dq, *dq.stride(), *scalars, **flags, **cfg
        )

    launch_dkdv(_tuned_config("dkdv", q, tk, causal, dropout, launch_dkdv))
    launch_dq(_tuned_config("dq", q, tk, causal, dropout, launch_dq))
    return dq, dk, dv


# Shapes for tracing (torch.compile, fake tensors). triton_op derives these by running the
# launchers with fake tensors, but under TRITON_INTERPRET=1 the kernels are plain Python that
# would touch the fake tensors' data, so the shapes are spelled out.
@_flash_attention_forward.register_fake
def _(q, k, v, causal, sm_scale, dropout_p, seed):
    batch, heads, tq, head_dim = q.shape
    out = q.new_empty((batch, heads, tq, head_dim))
    return out, q.new_empty((batch, heads, tq), dtype=torch.float32)


@_flash_attention_backward.register_fake
def _(dout, q, k, v, out, lse, causal, sm_scale, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, sm_scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.causal, ctx.sm_scale, ctx.dropout_p = causal, sm_scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor | None):
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = _flash_attention_backward(
        dout, q, k, v, out, lse, ctx.causal, ctx.sm_scale, ctx.dropout_p, seed
    )
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd(
    "fastgpt::flash_attention_forward", _backward, setup_context=_setup_context
)


# --- public API --------------------------------------------------------------------------


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError/TypeError naming the problem with attention's inputs."""
    fc.check_qkv(q, k, v, 4)
    check_same_device(q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        within_head = t.shape[2] * abs(t.stride(2)) + t.shape[3] * abs(t.stride(3))
        if within_head >= 2**31:
            raise ValueError(
                f"{name}: offsets inside one head reach {within_head} (T·stride_t + D·stride_d), "
                "past the kernels' int32 range 2^31"
            )


def _check_dropout_offsets(tq: int, tk: int) -> None:
    """Dropout's within-head Philox counter (i & ~8)·Tk + (j & ~24) is int32: Tq·Tk must stay
    below 2^31."""
    if tq * tk >= 2**31:
        raise ValueError(
            f"dropout needs Tq·Tk < 2^31 (one head's attention matrix), got Tq={tq}, Tk={tk}"
        )


@bf16_in_fp32_under_interpreter
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    sm_scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, FlashAttention-2 style, differentiable in q, k and v.

    q: (B, H, Tq, D), k and v: (B, H, Tk, D), any strides, fp32/fp16/bf16, D one of
    SUPPORTED_HEAD_DIMS -> (B, H, Tq, D) in q's dtype.
    causal: query i sees keys j <= i + (Tk - Tq) (bottom-right aligned; rows that see no key
    give 0). sm_scale: score scale (> 0), default 1/sqrt(D). dropout_p: probability of zeroing an
    attention weight, drawn as its nearest multiple of 1/256 (`kernel_dropout_p`; the kept
    weights are scaled by 1/(1 - that)). seed: Philox seed of the dropout
    mask; None draws one from torch's generator. The same seed gives the same mask, which
    `attention_dropout_mask` reproduces.

    CUDA: Triton kernels. CPU: the same kernels through Triton's interpreter when
    TRITON_INTERPRET=1, else `attention_reference` (its dropout then comes from PyTorch's
    generator, not from `seed`). Empty inputs go to the reference too. Raises ValueError for
    shapes that do not fit (B, H, T, D), an unsupported head dim (naming the supported ones),
    mixed devices, sm_scale <= 0, dropout_p outside [0, 1) (or rounding to 0 or 1), offsets
    past the kernels' int32 range, or a GPU below sm_80 (`check_gpu`: use PyTorch's attention
    there); TypeError for non-float or mixed dtypes."""
    _validate(q, k, v)
    dropout_p = fc.kernel_dropout_p(dropout_p)  # raises for one the kernels cannot draw
    check_gpu("attention", q, dots=True)
    scale = fc.softmax_scale(sm_scale, q.shape[3])
    empty = q.shape[0] * q.shape[1] * q.shape[2] == 0 or k.shape[2] == 0
    if empty or not use_triton(q.device):
        return attention_reference(q, k, v, causal, scale, dropout_p)
    seed_t = None
    if dropout_p > 0.0:
        _check_dropout_offsets(q.shape[2], k.shape[2])
        seed_t = seed_tensor(seed, q.device)
    out, _ = _flash_attention_forward(q, k, v, bool(causal), scale, float(dropout_p), seed_t)
    return out


def attention_dropout_mask(
    seed: int,
    batch: int,
    heads: int,
    tq: int,
    tk: int,
    dropout_p: float,
    device: torch.device | str,
) -> torch.Tensor:
    """The keep-mask (B, H, Tq, Tk) bool that `attention(..., dropout_p, seed=seed)` applies to
    its attention weights (True = kept), for checking it against `attention_reference` (with
    `kernel_dropout_p(dropout_p)`, the probability it was drawn with)."""
    dropout_p = fc.kernel_dropout_p(dropout_p)
    device = torch.device(device)
    if not use_triton(device):
        raise RuntimeError(f"attention_dropout_mask needs the Triton kernel on {device}")
    _check_dropout_offsets(tq, tk)
    keep = torch.empty((batch, heads, tq, tk), dtype=torch.int8, device=device)
    if keep.numel():
        block = 1024
        grid = (triton.cdiv(tq * tk, block) * batch * heads,)
        _attention_dropout_mask_kernel[grid](
            keep, seed_tensor(seed, device), tq, tk, dropout_p, BLOCK=block
        )
    return keep.bool()
