"""Flash attention (FlashAttention-2) in Triton: fused causal mask, forward and backward, dropout.

    out = attention(q, k, v, causal=True)  # q (B, H, Tq, D), k/v (B, H, Tk, D) -> (B, H, Tq, D)

The T×T score matrix is never materialized: each program holds one tile of queries and streams
tiles of keys and values through fast memory, keeping a running (online) softmax. What is saved
for the backward pass is the output and one number per query row, the log-sum-exp of its scores.

Conventions shared by every kernel below
- Causal alignment is bottom-right: query i sees key j iff j <= i + (Tk - Tq). With Tq == Tk that
  is the usual lower triangle; with a KV cache (Tq < Tk) the new queries see the whole past. When
  Tq > Tk the first Tq - Tk rows see no key at all: their output is 0 and their gradients are 0.
- Scores are kept in base 2: s = (q·kᵀ) · sm_scale · log2(e), so exp(x) becomes exp2(s), one
  instruction on the GPU. The saved log-sum-exp `lse` is in the same base-2 units.
- Loop bounds skip every tile that lies wholly above the diagonal; only tiles crossing the
  diagonal (or the end of the keys) pay for a mask.
- Dropout on the attention weights draws one uniform per weight from Philox (`tl.philox`, the
  generator behind `tl.rand`), keyed by `seed`, with the 4-word counter (i·Tk + j, b·H + h, 0, 0):
  the position inside the head's Tq×Tk matrix in the first word (int32, hence Tq·Tk < 2^31),
  the head in the second. So no offset ever wraps however large B·H·Tq·Tk gets (the flat index
  ((b·H + h)·Tq + i)·Tk + j would pass 2^31 easily), and per tile only an int32 offset tile is
  built. The weight is kept iff its uniform >= p. The forward, the backward and
  `attention_dropout_mask` compute the same counters, so the backward regenerates the forward's
  mask instead of storing it.
- Offsets of a (batch, head) start are int64 (B·H·T·D can pass 2^31); offsets inside one head
  (i·stride_t + d·stride_d) stay int32, which `attention` checks. The grid is one flat axis
  (axis 0 allows 2^31 - 1 programs, axes 1 and 2 only 65535), so B·H > 65535 works.

Where it runs (see `kernels/_dispatch.py`): CUDA tensors run the Triton kernels; CPU tensors run
them through Triton's interpreter when TRITON_INTERPRET=1, else `attention_reference` (whose
dropout then comes from PyTorch's generator, not from `seed`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

try:  # host tensor descriptors (TMA on sm_90), in Triton since 3.4; without them: no TMA candidate
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

from . import _autotune
from ._dispatch import check_float, check_same_device, triton_interpreter_enabled, use_triton
from ._dispatch import empty_output as _empty  # tests swap in a nan-filled allocator

# Head dims are padded to a power of two of at least 16 (tl.dot's smallest inner size), masked.
# 8 is here for small test models (the "tiny" preset has 4 heads of 8).
SUPPORTED_HEAD_DIMS = (8, 16, 32, 48, 64, 80, 96, 128)
LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)


# --- reference ---------------------------------------------------------------------------


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    sm_scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """The book's attention in plain PyTorch: scores, -inf above the (bottom-right aligned)
    diagonal, softmax, dropout, weighted sum. q: (B, H, Tq, D), k/v: (B, H, Tk, D) -> (B, H, Tq, D).

    upcast: compute in at least fp32 (fp64 inputs stay fp64); False computes in the inputs' own
    dtype (what "PyTorch in the same dtype" means in the tests' tolerance rule).
    dropout_mask: a (B, H, Tq, Tk) keep-mask (e.g. `attention_dropout_mask`) applied with scaling
    1 / (1 - dropout_p); without it dropout_p > 0 draws from PyTorch's generator.
    A query row that sees no key (Tq > Tk, causal) returns zeros and gets zero gradients."""
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    compute_dtype = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    qc, kc, vc = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    scores = (qc @ kc.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal and tq > 1:  # one query (a decoding step) sees every key: nothing to mask
        i = torch.arange(tq, device=q.device)[:, None]
        j = torch.arange(tk, device=q.device)[None, :]
        hidden = j > i + (tk - tq)  # (Tq, Tk)
        sees_nothing = hidden.all(dim=-1, keepdim=True)  # (Tq, 1): rows before the first key
        # -inf above the diagonal; an all-hidden row is softmaxed as zeros and then zeroed, so
        # neither its output nor any gradient becomes nan (softmax of all -inf is 0/0).
        scores = scores.masked_fill(hidden & ~sees_nothing, float("-inf"))
        weights = torch.softmax(scores, dim=-1).masked_fill(sees_nothing, 0.0)
    else:
        weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
    if dropout_mask is not None:
        weights = weights * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, dropout_p)
    return (weights @ vc).to(q.dtype)  # (B, H, Tq, D)


# --- helpers shared by the kernels (plain @triton.jit functions: Triton inlines them) -------


@triton.jit
def _program_tile(T, H, BLOCK: tl.constexpr, HEAVIEST_FIRST: tl.constexpr):
    """This program's place on a flat grid of B·H·cdiv(T, BLOCK) programs, a head's tiles
    side by side: (bh, b, h, start) with bh = b·H + h (int64) and `start` the first of its BLOCK
    rows of T. HEAVIEST_FIRST numbers a head's tiles from the last: under a causal mask the last
    query rows see the most keys, so the longest programs are scheduled first."""
    num_tiles = (T + BLOCK - 1) // BLOCK
    pid = tl.program_id(0)
    bh = (pid // num_tiles).to(tl.int64)
    tile = pid % num_tiles
    if HEAVIEST_FIRST:
        tile = num_tiles - 1 - tile
    return bh, bh // H, bh % H, tile * BLOCK


@triton.jit
def _load_tile(base, offs_t, offs_d, stride_t, stride_d, T, D):
    """Rows offs_t (R,) of one head's (T, D) matrix at `base` as an (R, BLOCK_D) tile; rows past
    T and columns past D read as 0."""
    mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    return tl.load(
        base + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d, mask=mask, other=0.0
    )


@triton.jit
def _load_tile_transposed(base, offs_t, offs_d, stride_t, stride_d, T, D):
    """The same rows as `_load_tile`, transposed: a (BLOCK_D, R) tile (kᵀ for q·kᵀ)."""
    mask = (offs_t < T)[None, :] & (offs_d < D)[:, None]
    return tl.load(
        base + offs_t[None, :] * stride_t + offs_d[:, None] * stride_d, mask=mask, other=0.0
    )


@triton.jit
def _store_tile(base, tile, offs_t, offs_d, stride_t, stride_d, T, D):
    """Write an (R, BLOCK_D) fp32 tile, cast to the pointer's dtype, to rows offs_t of one
    head's (T, D) matrix at `base`; rows past T and columns past D are left alone."""
    mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    ptrs = base + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _tma_load_tile(desc, b, h, row, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [row, row + ROWS) of head (b, h) as a (ROWS, BLOCK_D) tile, through a host
    TensorDescriptor over the whole (B, H, T, D) tensor with blocks (1, 1, ROWS, BLOCK_D): one
    TMA copy on sm_90. The hardware fills rows past T and columns past D with zeros (what
    `_load_tile`'s masks do)."""
    return desc.load([b.to(tl.int32), h.to(tl.int32), row, 0]).reshape(ROWS, BLOCK_D)


@triton.jit
def _visible(offs_m, offs_n, Tq, Tk, CAUSAL: tl.constexpr):
    """Whether query offs_m sees key offs_n: the key exists and, causal, j <= i + (Tk - Tq).
    offs_m and offs_n come as a column and a row (either way round) and broadcast to a tile."""
    visible = offs_n < Tk
    if CAUSAL:
        visible = visible & (offs_n <= offs_m + (Tk - Tq))
    return visible


@triton.jit
def _load_seed(seed_ptr, DROPOUT: tl.constexpr):
    """The Philox seed; seed_ptr is None without dropout, and the seed then unused."""
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    return seed


@triton.jit
def _dropout_keep(seed, bh, offsets, dropout_p):
    """Keep-mask of the attention weights at within-head offsets i·Tk + j of head bh = b·H + h:
    Philox(key = seed, counter = (i·Tk + j, b·H + h, 0, 0)), uniform in [0, 1), kept iff >= p."""
    c0 = offsets.to(tl.uint32, bitcast=True)
    zero = c0 * 0
    r, _, _, _ = tl.philox(seed, c0, zero + bh.to(tl.uint32), zero, zero)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _attention_tile_bounds(
    m_start, Tq, Tk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """For the query tile starting at m_start: (full_end, hi). Key tiles in [0, full_end) are
    wholly visible to every row of the tile (no mask); [full_end, hi) cross the diagonal or the
    end of the keys (masked); keys >= hi are never visited."""
    if CAUSAL:
        last_row = tl.minimum(m_start + BLOCK_M, Tq) - 1
        hi = tl.minimum(tl.maximum(last_row + (Tk - Tq) + 1, 0), Tk)
        visible_to_all = tl.minimum(tl.maximum(m_start + (Tk - Tq) + 1, 0), hi)
    else:
        hi = Tk
        visible_to_all = Tk
    full_end = (visible_to_all // BLOCK_N) * BLOCK_N
    return full_end, hi


# --- forward -----------------------------------------------------------------------------
#
# FlashAttention-2 forward, one program per (batch·head, tile of BLOCK_M query rows).
# For each row i it keeps, over the key tiles seen so far,
#   m_i = running max of the base-2 scores s_ij,
#   l_i = Σ_j exp2(s_ij - m_i)                      (the softmax denominator, rescaled to m_i),
#   acc_i = Σ_j exp2(s_ij - m_i) · keep_ij · v_j    (the numerator, fp32).
# A new tile with max m' rescales the old sums by alpha = exp2(m_i - m') before adding its own
# terms. At the end out_i = acc_i / l_i / (1 - p) and lse_i = m_i + log2(l_i). While a row has
# seen only masked keys, m_i = -inf; the max is then replaced by 0 so that -inf - -inf never
# happens (masked terms give exp2(-inf) = 0), and a row that never sees a key keeps l_i = 0 and
# gets out = 0 and lse = +inf (so the backward's exp2(s - lse) is 0 for it).
# The key tiles are walked in two loops: first those every row of the tile sees (no mask), then
# those crossing the diagonal or the end of the keys (MASKED); tiles above the diagonal never.


@triton.jit
def _attention_forward_inner(
    acc, m_i, l_i,  # (BLOCK_M, BLOCK_D), (BLOCK_M,), (BLOCK_M,) fp32: the running sums above
    q,  # (BLOCK_M, BLOCK_D): this program's query tile
    k_base, v_base,  # (Tk, D) each: this head's keys and values
    stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m,  # (BLOCK_M,) query rows of the tile
    offs_d,  # (BLOCK_D,) head-dim columns
    bh, b, h, n_lo, n_hi, Tq, Tk, D, qk_scale, dropout_p, seed,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """Fold key tiles [n_lo, n_hi) into the running (acc, m_i, l_i) of one query tile.
    TMA: k_base and v_base are the whole (B, H, Tk, D) tensors' descriptors (see
    `_tma_load_tile`), read at head (b, h); else pointers to this head's keys and values."""
    for n_start in range(n_lo, n_hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        if TMA:
            kt = tl.trans(_tma_load_tile(k_base, b, h, n_start, BLOCK_N, BLOCK_D))
        else:
            kt = _load_tile_transposed(k_base, offs_n, offs_d, stride_kn, stride_kd, Tk, D)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            visible = _visible(offs_m[:, None], offs_n[None, :], Tq, Tk, CAUSAL)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
        p = tl.math.exp2(s - m_safe[:, None])  # (BLOCK_M, BLOCK_N), unnormalized weights
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None] * Tk + offs_n[None, :], dropout_p)
            p = tl.where(keep, p, 0.0)
        if TMA:
            v = _tma_load_tile(v_base, b, h, n_start, BLOCK_N, BLOCK_D)  # (BLOCK_N, BLOCK_D)
        else:
            v = _load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, Tk, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attention_forward_kernel(
    q_ptr,  # (B, H, Tq, D), any strides
    k_ptr,  # (B, H, Tk, D), any strides
    v_ptr,  # (B, H, Tk, D), any strides
    out_ptr,  # (B, H, Tq, D), any strides
    lse_ptr,  # (B·H, Tq) fp32 contiguous, base-2 log-sum-exp of each row's scores
    seed_ptr,  # (1,) int64 Philox seed, or None without dropout
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Tq, Tk, D,
    qk_scale,  # sm_scale · log2(e)
    dropout_p,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TMA: tl.constexpr = False,  # q, k, v, out are host TensorDescriptors (sm_90+, see below)
):  # fmt: skip
    bh, b, h, m_start = _program_tile(Tq, H, BLOCK_M, True)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if TMA:  # whole tensors' descriptors, indexed by head inside the loads
        q = _tma_load_tile(q_ptr, b, h, m_start, BLOCK_M, BLOCK_D)  # (BLOCK_M, BLOCK_D)
        k_base = k_ptr
        v_base = v_ptr
    else:
        q = _load_tile(  # (BLOCK_M, BLOCK_D)
            q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Tq, D
        )
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
    seed = _load_seed(seed_ptr, DROPOUT)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = _attention_tile_bounds(m_start, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _attention_forward_inner(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, bh, b, h, 0, full_end, Tq, Tk, D, qk_scale, dropout_p, seed,
        CAUSAL, False, DROPOUT, DOT_PRECISION, BLOCK_N, BLOCK_D, TMA,
    )  # fmt: skip
    acc, m_i, l_i = _attention_forward_inner(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, bh, b, h, full_end, hi, Tq, Tk, D, qk_scale, dropout_p, seed,
        CAUSAL, True, DROPOUT, DOT_PRECISION, BLOCK_N, BLOCK_D, TMA,
    )  # fmt: skip

    sees_a_key = l_i > 0.0
    inv_l = tl.where(sees_a_key, 1.0 / tl.where(sees_a_key, l_i, 1.0), 0.0)
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = tl.where(sees_a_key, m_i + tl.math.log2(tl.where(sees_a_key, l_i, 1.0)), float("inf"))
    tl.store(lse_ptr + bh * Tq + offs_m, lse, mask=offs_m < Tq)
    if TMA:  # rows past Tq and columns past D are clipped; out has q's dtype (the launcher's)
        tile = out.to(q.dtype).reshape(1, 1, BLOCK_M, BLOCK_D)
        out_ptr.store([b.to(tl.int32), h.to(tl.int32), m_start, 0], tile)
    else:
        out_base = out_ptr + b * stride_ob + h * stride_oh
        _store_tile(out_base, out, offs_m, offs_d, stride_om, stride_od, Tq, D)


# --- backward ----------------------------------------------------------------------------
#
# With P = softmax(S) (S = sm_scale·q·kᵀ, masked), K the keep-mask and Pd = P∘K/(1-p):
#   out = Pd·v,   dv = Pdᵀ·dout,   dPd = dout·vᵀ,   dP = dPd∘K/(1-p),
#   dS = P∘(dP - delta) with delta_i = Σ_j dP_ij·P_ij = Σ_j dPd_ij·Pd_ij = Σ_d dout_id·out_id,
#   dq = sm_scale·dS·k,   dk = sm_scale·dSᵀ·q.
# P is recomputed tile by tile from the saved lse: P_ij = exp2(s_ij - lse_i).
# 1. `_attention_backward_preprocess_kernel`: delta = rowsum(dout ∘ out).
# 2. `_attention_backward_dkdv_kernel`: one program per key tile, looping over the query tiles
#    that can see it (causal: from the diagonal down), accumulating dk and dv in registers.
# 3. `_attention_backward_dq_kernel`: one program per query tile, looping over the key tiles it
#    sees (the forward's bounds), accumulating dq in registers.
# Every gradient element is written by exactly one program, summed in a fixed order: no atomics,
# so the same inputs give bitwise identical gradients.


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
    bh, b, h, m_start = _program_tile(Tq, H, BLOCK_M, False)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    out = _load_tile(  # (BLOCK_M, BLOCK_D)
        out_ptr + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od, Tq, D
    ).to(tl.float32)
    dout = _load_tile(  # (BLOCK_M, BLOCK_D)
        dout_ptr + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, Tq, D
    ).to(tl.float32)
    tl.store(delta_ptr + bh * Tq + offs_m, tl.sum(out * dout, axis=1), mask=offs_m < Tq)


@triton.jit
def _attention_backward_dkdv_inner(
    dk, dv,  # (BLOCK_N, BLOCK_D) fp32 each: the key tile's gradients so far
    k, v,  # (BLOCK_N, BLOCK_D) each: the key tile and its values
    q_base, do_base,  # (Tq, D) each: this head's queries and upstream gradient
    lse_base, delta_base,  # (Tq,) fp32 each: this head's lse and delta
    stride_qm, stride_qd, stride_dom, stride_dod,
    offs_n,  # (BLOCK_N,) key rows of the tile
    offs_d,  # (BLOCK_D,) head-dim columns
    m_lo, m_hi, Tq, Tk, D, qk_scale, dropout_p, seed, bh,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Add the contributions of query tiles [m_lo, m_hi) to one key tile's dk and dv. Works on
    transposed tiles (keys along rows) so that dk and dv come out of plain dots."""
    for m_start in range(m_lo, m_hi, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Tq
        qt = _load_tile_transposed(q_base, offs_m, offs_d, stride_qm, stride_qd, Tq, D)
        # Rows past Tq get lse = +inf, hence P = 0: they add nothing.
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))  # (BLOCK_M,)
        st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        pt = tl.math.exp2(st - lse[None, :])  # P transposed
        if MASKED:
            visible = _visible(offs_m[None, :], offs_n[:, None], Tq, Tk, CAUSAL)
            pt = tl.where(visible, pt, 0.0)
        dout = _load_tile(do_base, offs_m, offs_d, stride_dom, stride_dod, Tq, D)
        dpt = tl.dot(v, tl.trans(dout), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[None, :] * Tk + offs_n[:, None], dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            pdt = tl.where(keep, pt * inv_keep, 0.0)
            dpt = tl.where(keep, dpt * inv_keep, 0.0)
        else:
            pdt = pt
        dv += tl.dot(pdt.to(dout.dtype), dout, input_precision=DOT_PRECISION)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
        dst = pt * (dpt - delta[None, :])  # (BLOCK_N, BLOCK_M)
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attention_backward_dkdv_kernel(
    q_ptr,  # (B, H, Tq, D), any strides
    k_ptr,  # (B, H, Tk, D), any strides
    v_ptr,  # (B, H, Tk, D), any strides
    dout_ptr,  # (B, H, Tq, D), any strides
    lse_ptr,  # (B·H, Tq) fp32 contiguous
    delta_ptr,  # (B·H, Tq) fp32 contiguous
    dk_ptr,  # (B, H, Tk, D), any strides
    dv_ptr,  # (B, H, Tk, D), any strides (the same as dk's)
    seed_ptr,  # (1,) int64 Philox seed, or None without dropout
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    H, Tq, Tk, D,
    sm_scale,
    qk_scale,  # sm_scale · log2(e)
    dropout_p,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh, b, h, n_start = _program_tile(Tk, H, BLOCK_N, False)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(  # (BLOCK_N, BLOCK_D)
        k_ptr + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kn, stride_kd, Tk, D
    )
    v = _load_tile(  # (BLOCK_N, BLOCK_D)
        v_ptr + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vn, stride_vd, Tk, D
    )
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = dout_ptr + b * stride_dob + h * stride_doh
    lse_base = lse_ptr + bh * Tq
    delta_base = delta_ptr + bh * Tq
    seed = _load_seed(seed_ptr, DROPOUT)

    # Query tiles [m_lo, m_masked_end) cross the diagonal (or this key tile runs past Tk) and
    # are masked; [m_masked_end, m_end) see the whole key tile; tiles above m_lo see none of it.
    m_end = ((Tq + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if CAUSAL:
        first_row = tl.maximum(n_start - (Tk - Tq), 0)  # first query that sees key n_start
        m_lo = tl.minimum((first_row // BLOCK_M) * BLOCK_M, m_end)
        # first query that sees the last key of the tile, rounded up to a tile start
        all_rows = tl.maximum(n_start + BLOCK_N - 1 - (Tk - Tq), 0)
        m_masked_end = tl.minimum(((all_rows + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, m_end)
    else:
        m_lo = 0
        m_masked_end = 0
    # The last key tile, when it runs past Tk, is masked against every query tile.
    m_masked_end = tl.where(n_start + BLOCK_N > Tk, m_end, m_masked_end)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _attention_backward_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd,
        stride_dom, stride_dod, offs_n, offs_d, m_lo, m_masked_end, Tq, Tk, D, qk_scale,
        dropout_p, seed, bh, CAUSAL, True, DROPOUT, DOT_PRECISION, BLOCK_M,
    )  # fmt: skip
    dk, dv = _attention_backward_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd,
        stride_dom, stride_dod, offs_n, offs_d, tl.maximum(m_masked_end, m_lo), m_end, Tq, Tk,
        D, qk_scale, dropout_p, seed, bh, CAUSAL, False, DROPOUT, DOT_PRECISION, BLOCK_M,
    )  # fmt: skip

    # dk and dv share one layout: the offsets are computed once for both stores.
    kv_mask = (offs_n < Tk)[:, None] & (offs_d < D)[None, :]
    dk_offsets = b * stride_dkb + h * stride_dkh
    dk_offsets += offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(dk_ptr + dk_offsets, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + dk_offsets, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_backward_dq_inner(
    dq,  # (BLOCK_M, BLOCK_D) fp32: the query tile's gradient so far (without sm_scale)
    q, dout,  # (BLOCK_M, BLOCK_D) each: the query tile and its upstream gradient
    lse, delta,  # (BLOCK_M,) fp32 each
    k_base, v_base,  # (Tk, D) each: this head's keys and values
    stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m,  # (BLOCK_M,) query rows of the tile
    offs_d,  # (BLOCK_D,) head-dim columns
    bh, n_lo, n_hi, Tq, Tk, D, qk_scale, dropout_p, seed,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Add the contributions of key tiles [n_lo, n_hi) to one query tile's dq (unscaled)."""
    for n_start in range(n_lo, n_hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        kt = _load_tile_transposed(k_base, offs_n, offs_d, stride_kn, stride_kd, Tk, D)
        vt = _load_tile_transposed(v_base, offs_n, offs_d, stride_vn, stride_vd, Tk, D)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            visible = _visible(offs_m[:, None], offs_n[None, :], Tq, Tk, CAUSAL)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(dout, vt, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None] * Tk + offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attention_backward_dq_kernel(
    q_ptr,  # (B, H, Tq, D), any strides
    k_ptr,  # (B, H, Tk, D), any strides
    v_ptr,  # (B, H, Tk, D), any strides
    dout_ptr,  # (B, H, Tq, D), any strides
    lse_ptr,  # (B·H, Tq) fp32 contiguous
    delta_ptr,  # (B·H, Tq) fp32 contiguous
    dq_ptr,  # (B, H, Tq, D), any strides
    seed_ptr,  # (1,) int64 Philox seed, or None without dropout
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, Tq, Tk, D,
    sm_scale,
    qk_scale,  # sm_scale · log2(e)
    dropout_p,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh, b, h, m_start = _program_tile(Tq, H, BLOCK_M, True)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    q = _load_tile(  # (BLOCK_M, BLOCK_D)
        q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Tq, D
    )
    dout = _load_tile(  # (BLOCK_M, BLOCK_D)
        dout_ptr + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, Tq, D
    )
    lse = tl.load(lse_ptr + bh * Tq + offs_m, mask=m_ok, other=float("inf"))  # (BLOCK_M,)
    delta = tl.load(delta_ptr + bh * Tq + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    seed = _load_seed(seed_ptr, DROPOUT)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = _attention_tile_bounds(m_start, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attention_backward_dq_inner(
        dq, q, dout, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, bh, 0, full_end, Tq, Tk, D, qk_scale, dropout_p, seed,
        CAUSAL, False, DROPOUT, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    dq = _attention_backward_dq_inner(
        dq, q, dout, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, bh, full_end, hi, Tq, Tk, D, qk_scale, dropout_p, seed,
        CAUSAL, True, DROPOUT, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    dq_base = dq_ptr + b * stride_dqb + h * stride_dqh
    _store_tile(dq_base, dq * sm_scale, offs_m, offs_d, stride_dqm, stride_dqd, Tq, D)


# --- dropout mask ------------------------------------------------------------------------


@triton.jit
def _attention_dropout_mask_kernel(
    keep_ptr,  # (B, H, Tq, Tk) int8 contiguous: 1 where the attention weight is kept
    seed_ptr,  # (1,) int64 Philox seed
    n_per_head,  # Tq·Tk
    dropout_p,
    BLOCK: tl.constexpr,
):
    # One program per BLOCK elements of one head; within a head the flat index of (i, j) in a
    # contiguous (Tq, Tk) slice is the attention kernels' offset i·Tk + j. Each head's Tq·Tk
    # weights are the "rows" tiled here (H = 1: only bh = b·H + h is needed, not b and h).
    bh, _, _, start = _program_tile(n_per_head, 1, BLOCK, False)
    offsets = start + tl.arange(0, BLOCK)
    keep = _dropout_keep(tl.load(seed_ptr), bh, offsets, dropout_p)
    tl.store(keep_ptr + bh * n_per_head + offsets, keep.to(tl.int8), mask=offsets < n_per_head)


# --- launchers ---------------------------------------------------------------------------


def _target_arch():
    """The compute capability Triton compiles for (90 for sm_90), from its active driver."""
    return triton.runtime.driver.active.get_current_target().arch


def _block_config(dtype: torch.dtype, head_dim: int) -> dict[str, dict[str, int]]:
    """Tile sizes and launch settings per kernel. The interpreter gets small pinned tiles (it is
    slow and runs programs one at a time); on a GPU, 16-bit inputs take larger tiles than fp32,
    whose exact (ieee) dots need more registers."""
    if triton_interpreter_enabled():
        # Query and key tiles of different sizes, in the GPU configs' ratios, so that the CPU
        # tests walk the same tile-bound arithmetic (several masked tiles per diagonal).
        small = {"num_warps": 1, "num_stages": 1}
        return {
            "forward": {"BLOCK_M": 32, "BLOCK_N": 16, **small},
            "dkdv": {"BLOCK_M": 16, "BLOCK_N": 32, **small},
            "dq": {"BLOCK_M": 32, "BLOCK_N": 16, **small},
        }
    # Chosen without a GPU at hand: tiles that ptxas compiles without register spills for
    # sm_90 and sm_80 with Triton 3.6 and 3.9, checked in the heaviest variant (causal, with
    # dropout) at head dims 64 and 128, whose binaries 48 and 80/96 share (`fastgpt selftest
    # --compile-only`; reports in benchmarks/results/compile/; what still spills is in
    # budget.json there, with its cost). Not timed: see benchmarks/.
    # The target's arch is asked of Triton's driver (a stub one in the compile check).
    arch = _target_arch()
    ampere = not isinstance(arch, int) or arch < 90  # mma.sync: operands live in registers
    wide = head_dim > 64  # BLOCK_D = 128
    narrow = head_dim <= 16  # BLOCK_D = 16
    if dtype == torch.float32:  # exact fp32 dots run on FMA units: small tiles
        # 16 query rows a tile in the forward and dkdv: with 32 the forward at BLOCK_D = 128
        # took 255 registers and spilled 860-1012 B on sm_90, dkdv up to 1400 B. Below
        # BLOCK_D = 128 dkdv runs 4 warps (8 spilled 16-48 B at 64-80 registers); on sm_90 with
        # 32 query rows over 16-key tiles, which compile clean there with both Tritons.
        dkdv = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 8}
        if not wide:
            dkdv = {"BLOCK_M": 16, "BLOCK_N": 32} if ampere else {"BLOCK_M": 32, "BLOCK_N": 16}
            dkdv["num_warps"] = 4
        configs = {
            "forward": {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 8 if wide else 4},
            "dkdv": dkdv,
            # 16-key tiles at BLOCK_D = 16 (32 spilled 8-60 B with dropout) and 128.
            "dq": {"BLOCK_M": 32, "BLOCK_N": 16 if wide or narrow else 32, "num_warps": 4},
        }
    else:
        configs = {
            # At BLOCK_D = 128 a 64-key tile with dropout's Philox took 255 registers and
            # spilled (sm_90, Triton 3.9): 32 keys a tile leave ~200.
            # At BLOCK_D = 16 on sm_80 (mma.sync) 128 query rows with dropout spilled 48-80 B.
            "forward": {
                "BLOCK_M": 64 if narrow and ampere else 128,
                "BLOCK_N": 32 if wide else 64,
                "num_warps": 8,
            },
            # At BLOCK_D = 16 on sm_80, 32 query rows a tile spilled 16-64 B (Triton 3.6).
            "dkdv": {
                "BLOCK_M": 16 if narrow and ampere else 32,
                "BLOCK_N": 64 if wide else 128,
                "num_warps": 8,
            },
            # On sm_80 q, dout and the dq sum of 128 rows outgrow the registers at BLOCK_D = 128
            # (76-116 B spilled with dropout): 64 rows a tile, over the same 8 warps. At
            # BLOCK_D = 16 there, 32-key tiles spilled 16-48 B with dropout: 16 keys a tile.
            "dq": {
                "BLOCK_M": 64 if wide and ampere else 128,
                "BLOCK_N": 16 if narrow and ampere else 32,
                "num_warps": 8,
            },
        }
    return {name: {**cfg, "num_stages": 2} for name, cfg in configs.items()}


def _config_candidates(
    dtype: torch.dtype, head_dim: int, kernel: str, dropout: bool, tma: bool = False
) -> list[dict[str, int]]:
    """The configs a GPU may tune `kernel` ("forward", "dkdv", "dq") among, `_block_config`'s
    first (the pinned one: the interpreter and CPU run only it). 16-bit only: fp32's exact dots
    leave no register room. Without dropout (whose Philox leaves none either: the compile check
    found the two below spilling 8-16 B in the forward with dropout at head dim 64): one more
    pipeline stage (shared memory, not registers), and the program's own tile halved over half
    the warps (as many elements per thread; sm_90 only, kept at 64 rows or more so that its
    dots still lower to wgmma). Last, on sm_90+ for the forward when `tma` (the launcher found its
    tensors legal for TMA, `_tma_legal`), with or without dropout: the pinned tiles with q, k,
    v and out moved by TMA (config key "TMA": 1; compiled with 0 spills by Triton 3.6 and 3.9,
    dropout included). Each is compiled by the compile check."""
    pinned = _block_config(dtype, head_dim)[kernel]
    if triton_interpreter_enabled() or dtype == torch.float32:
        return [pinned]
    arch = _target_arch()
    hopper = isinstance(arch, int) and arch >= 90
    offer_tma = tma and hopper and kernel == "forward" and TensorDescriptor is not None
    with_tma = [{**pinned, "TMA": 1}] if offer_tma else []
    if dropout:
        return [pinned, *with_tma]
    candidates = [pinned, {**pinned, "num_stages": 3}]
    own = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"  # the tile a program owns
    # The halved tile on sm_90 only: on sm_80 mma.sync keeps the operands in registers and
    # half the warps spilled 8 B there (forward at head dims >= 80, dk/dv at 32; Triton 3.6).
    if hopper and pinned[own] // 2 >= 64 and pinned["num_warps"] >= 8:
        candidates.append({**pinned, own: pinned[own] // 2, "num_warps": pinned["num_warps"] // 2})
    return candidates + with_tma


def _tma_legal(*tensors: torch.Tensor) -> bool:
    """Whether TMA may read or write these (B, H, T, D) tensors through host tensor
    descriptors: each has a unit last stride, a 16-byte aligned base, every other stride a
    multiple of 16 bytes and no empty dimension (what the hardware's tensor maps require). The
    model's q/k/v views of one (B, T, 3, H, D) projection are legal when D·2 bytes (16-bit) is a
    multiple of 16. Fake tensors (torch.compile tracing) have no address: not legal, so a
    compiled graph launches the pointer kernel."""
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling() or any(is_fake(t) for t in tensors):
        return False
    return all(
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(stride * t.element_size() % 16 == 0 for stride in t.stride()[:-1])
        and t.numel() > 0
        for t in tensors
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


def _padded_head_dim(head_dim: int) -> int:
    """BLOCK_D: the head dim rounded up to a power of two, at least 16 for tl.dot."""
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots (not tf32); 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


# The launchers are torch.library ops so that torch.compile(fullgraph=True) traces through
# attention. On a GPU they are `triton_op`s, which Inductor can see into (it schedules the Triton
# kernels itself). Under TRITON_INTERPRET=1 the kernels are plain Python that cannot run on
# tracing tensors, so there they are opaque `custom_op`s (traced through their fake impls below).
_define_op = torch.library.custom_op if triton_interpreter_enabled() else torch.library.triton_op


@_define_op("fastgpt::flash_attention_forward", mutates_args=())
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

    block_d = _padded_head_dim(head_dim)

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
            heads, tq, tk, head_dim, sm_scale * LOG2E, dropout_p,
            CAUSAL=causal, DROPOUT=dropout_p > 0.0, DOT_PRECISION=_dot_precision(q.dtype),
            BLOCK_D=block_d, TMA=tma, **cfg,
        )  # fmt: skip

    tma_legal = _tma_legal(q, k, v, out)
    launch(_tuned_config("forward", q, tk, causal, dropout_p > 0.0, launch, tma_legal))
    return out, lse


@_define_op("fastgpt::flash_attention_backward", mutates_args=())
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
    block_d = _padded_head_dim(head_dim)
    configs = _block_config(q.dtype, head_dim)
    precision = _dot_precision(q.dtype)
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

    def launch_dkdv(cfg: dict[str, int]) -> None:
        torch.library.wrap_triton(_attention_backward_dkdv_kernel)[
            (triton.cdiv(tk, cfg["BLOCK_N"]) * batch * heads,)
        ](
            q, k, v, dout, lse, delta, dk, dv, seed,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(),
            heads, tq, tk, head_dim, sm_scale, sm_scale * LOG2E, dropout_p,
            CAUSAL=causal, DROPOUT=dropout, DOT_PRECISION=precision, BLOCK_D=block_d, **cfg,
        )  # fmt: skip

    def launch_dq(cfg: dict[str, int]) -> None:
        torch.library.wrap_triton(_attention_backward_dq_kernel)[
            (triton.cdiv(tq, cfg["BLOCK_M"]) * batch * heads,)
        ](
            q, k, v, dout, lse, delta, dq, seed,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
            heads, tq, tk, head_dim, sm_scale, sm_scale * LOG2E, dropout_p,
            CAUSAL=causal, DROPOUT=dropout, DOT_PRECISION=precision, BLOCK_D=block_d, **cfg,
        )  # fmt: skip

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


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> None:
    """Raise ValueError/TypeError naming the problem with attention's inputs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q (B, H, Tq, D) and k/v (B, H, Tk, D) must agree on B, H and D, got q "
            f"{tuple(q.shape)} and k {tuple(k.shape)}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head dim {q.shape[3]} is not supported; supported head dims: {SUPPORTED_HEAD_DIMS}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        within_head = t.shape[2] * abs(t.stride(2)) + t.shape[3] * abs(t.stride(3))
        if within_head >= 2**31:
            raise ValueError(
                f"{name}: offsets inside one head reach {within_head} (T·stride_t + D·stride_d), "
                "past the kernels' int32 range 2^31"
            )


def _check_dropout_offsets(tq: int, tk: int) -> None:
    """Dropout's within-head Philox counter i·Tk + j is int32: Tq·Tk must stay below 2^31."""
    if tq * tk >= 2**31:
        raise ValueError(
            f"dropout needs Tq·Tk < 2^31 (one head's attention matrix), got Tq={tq}, Tk={tk}"
        )


def _seed_tensor(seed: int | None, device: torch.device) -> torch.Tensor:
    """The Philox seed as a (1,) int64 tensor on `device`; None draws one from torch's generator
    for that device (so torch.manual_seed makes dropout reproducible). Kept as a tensor so that
    torch.compile can trace the draw instead of breaking the graph on .item()."""
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return torch.tensor([seed], dtype=torch.int64, device=device)


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
    give 0). sm_scale: score scale, default 1/sqrt(D). dropout_p: probability of zeroing an
    attention weight (the kept ones are scaled by 1/(1 - p)). seed: Philox seed of the dropout
    mask; None draws one from torch's generator. The same seed gives the same mask, which
    `attention_dropout_mask` reproduces.

    CUDA: Triton kernels. CPU: the same kernels through Triton's interpreter when
    TRITON_INTERPRET=1, else `attention_reference` (its dropout then comes from PyTorch's
    generator, not from `seed`). Empty inputs go to the reference too. Raises ValueError for
    shapes that do not fit (B, H, T, D), an unsupported head dim (naming the supported ones),
    mixed devices, dropout_p outside [0, 1) or offsets past the kernels' int32 range; TypeError
    for non-float or mixed dtypes."""
    _validate(q, k, v, dropout_p)
    scale = 1.0 / math.sqrt(q.shape[3]) if sm_scale is None else float(sm_scale)
    empty = q.shape[0] * q.shape[1] * q.shape[2] == 0 or k.shape[2] == 0
    if empty or not use_triton(q.device):
        return attention_reference(q, k, v, causal, scale, dropout_p)
    seed_t = None
    if dropout_p > 0.0:
        _check_dropout_offsets(q.shape[2], k.shape[2])
        seed_t = _seed_tensor(seed, q.device)
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
    its attention weights (True = kept), for checking it against `attention_reference`."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    device = torch.device(device)
    if not use_triton(device):
        raise RuntimeError(f"attention_dropout_mask needs the Triton kernel on {device}")
    _check_dropout_offsets(tq, tk)
    keep = torch.empty((batch, heads, tq, tk), dtype=torch.int8, device=device)
    if keep.numel():
        block = 1024
        grid = (triton.cdiv(tq * tk, block) * batch * heads,)
        _attention_dropout_mask_kernel[grid](
            keep, _seed_tensor(seed, device), tq * tk, dropout_p, BLOCK=block
        )
    return keep.bool()
