"""The flash-attention core: the Triton building blocks that `attention`, `attention_varlen` and
`decode_attention` are made of, and the host helpers they share.

    tile loads and stores (TMA included), visibility mask, dropout keep-mask, tile bounds,
    the three inner loops (forward, dk/dv, dq) and what runs around them in one program

Conventions shared by every kernel built from these
- Causal alignment is bottom-right: query i sees key j iff j <= i + (Tk - Tq). With Tq == Tk that
  is the usual lower triangle; with a KV cache (Tq < Tk) the new queries see the whole past. When
  Tq > Tk the first Tq - Tk rows see no key at all: their output is 0 and their gradients are 0.
- Scores are kept in base 2: s = (q·kᵀ) · qk_scale with qk_scale = sm_scale · log2(e), so exp(x)
  becomes exp2(s), one instruction on the GPU. The saved log-sum-exp `lse` and the forward's
  running max are in the same base-2 units. The scale is never applied to a score on its own:
  it enters the exp2 argument as one fused multiply-add, exp2(fma(q·kᵀ, qk_scale, -m)), and
  the forward's row max is taken over the raw q·kᵀ and scaled once per row, which needs
  qk_scale > 0 (the ops refuse sm_scale <= 0).
- Loop bounds skip every tile that lies wholly above the diagonal; only tiles crossing the
  diagonal (or the end of the keys) pay for a mask.
- Dropout on the attention weights is Philox-2x32-7 (Salmon et al., SC'11; Random123's
  constants; why 7 rounds: PHILOX_ROUNDS), one call per group of eight weights
  {i, i+8} × {j, j+8, j+16, j+24} (bit 3 of i, bits 3 and 4 of j clear) of one head's Tq×Tk
  matrix: counter (i·Tk + j, b·H + h), key the seed's low 32 bits. Its two words give eight
  bytes, one per member; a weight is kept iff its byte is >= round(p·256), FlashAttention-2's
  byte threshold: p is drawn at 1/256 resolution (`kernel_dropout_p`), and the kept weights
  are scaled by 1/(1 - that p), so the expectation is exact. Why groups: every kernel's MMA
  accumulator holds four of them, {i, i+8} × {j, j+8}, in one thread (rows r, r+8 and columns
  c, c+8 of a fragment, in S and in Sᵀ), and S's fragment holds columns c+16, c+24 too, so the
  forward and dq compute one Philox per thread for eight weights and the dk/dv (Sᵀ: keys along
  rows, bit 4 of j a warp's) one for four, with no data moved between threads. The counter is
  int32, hence Tq·Tk < 2^31, checked; the head is the second word, so no offset wraps however
  large B·H·Tq·Tk gets. The mask depends on (seed, head, i, j) only, not on tiles: the
  forward, the backward and the dropout-mask kernels compute the same draws, and the backward
  regenerates the forward's mask instead of storing it.
- Offsets of a (batch, head) start are int64 (B·H·T·D can pass 2^31); offsets inside one head
  (i·stride_t + d·stride_d) stay int32, which the ops check. The grid is one flat axis (axis 0
  allows 2^31 - 1 programs, axes 1 and 2 only 65535), so B·H > 65535 works.

The @triton.jit functions here are plain functions that Triton inlines into each kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._dispatch import check_float, triton_interpreter_enabled

# Head dims are padded to a power of two of at least 16 (tl.dot's smallest inner size), masked.
# 8 is here for small test models (the "tiny" preset has 4 heads of 8).
SUPPORTED_HEAD_DIMS = (8, 16, 32, 48, 64, 80, 96, 128)
LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)


# --- reference ---------------------------------------------------------------------------


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    causal: bool = True, sm_scale: float | None = None, dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None, upcast: bool = True,
) -> torch.Tensor:  # fmt: skip
    """The book's attention in plain PyTorch: scores, -inf above the (bottom-right aligned)
    diagonal, softmax, dropout, weighted sum. q: (B, H, Tq, D), k/v: (B, H, Tk, D) -> (B, H, Tq, D).

    upcast: compute in at least fp32 (fp64 inputs stay fp64); False computes in the inputs' own
    dtype (what "PyTorch in the same dtype" means in the tests' tolerance rule).
    dropout_mask: a (B, H, Tq, Tk) keep-mask (e.g. `attention_dropout_mask`) applied with scaling
    1 / (1 - dropout_p); without it dropout_p > 0 draws from PyTorch's generator.
    A query row that sees no key (Tq > Tk, causal) returns zeros and gets zero gradients."""
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = default_scale(sm_scale, d)
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


# --- input checks ------------------------------------------------------------------------

# q, k, v layouts by rank: (layout, q's, k's and v's, the axes q shares with k and v, the token
# axis, where q's length may differ from theirs)
QKV_LAYOUTS = {
    4: ("(B, H, T, D)", "(B, H, Tq, D)", "(B, H, Tk, D)", "B, H and D", 2),  # attention
    3: ("(total, H, D)", "(total_q, H, D)", "(total_k, H, D)", "H and D", 0),  # attention_varlen
}


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int) -> None:
    """Raise ValueError/TypeError naming the problem with an attention op's q, k and v in the
    layout QKV_LAYOUTS[rank]: their rank, k and v of one shape, q of theirs but for its length,
    one float dtype, a supported head dim (the last axis). (`kernel_dropout_p` checks dropout_p
    where the ops round it.)"""
    layout, q_layout, kv_layout, shared, token_axis = QKV_LAYOUTS[rank]
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    without_tokens = [axis for axis in range(rank) if axis != token_axis]
    if [q.shape[a] for a in without_tokens] != [k.shape[a] for a in without_tokens]:
        raise ValueError(
            f"q {q_layout} and k/v {kv_layout} must agree on {shared}, got q "
            f"{tuple(q.shape)} and k {tuple(k.shape)}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head dim {q.shape[-1]} is not supported; supported head dims: {SUPPORTED_HEAD_DIMS}"
        )


# Dropout thresholds are bytes: the kernels drop with a multiple of 1/DROPOUT_LEVELS, so the
# nonzero rates they take are those that round to neither 0 nor 1: DROPOUT_RANGE.
DROPOUT_LEVELS = 256
DROPOUT_RANGE = f"[1/{2 * DROPOUT_LEVELS}, {2 * DROPOUT_LEVELS - 1}/{2 * DROPOUT_LEVELS})"


def kernel_dropout_p(dropout_p: float) -> float:
    """The probability the attention kernels drop a weight with for `dropout_p`: its nearest
    multiple of 1/DROPOUT_LEVELS (their byte threshold), by which the kept weights are scaled,
    1/(1 - it). Raises ValueError for dropout_p outside [0, 1) or a nonzero one outside
    DROPOUT_RANGE (it would round to 0 or 1)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    level = math.floor(dropout_p * DROPOUT_LEVELS + 0.5)
    if dropout_p > 0.0 and not 0 < level < DROPOUT_LEVELS:
        raise ValueError(
            f"dropout_p={dropout_p} rounds to {level}/{DROPOUT_LEVELS}, the attention kernels' "
            f"dropout resolution (a byte threshold): use 0 or a value in {DROPOUT_RANGE}"
        )
    return level / DROPOUT_LEVELS


def default_scale(sm_scale: float | None, head_dim: int) -> float:
    """sm_scale, or attention's default 1/sqrt(head_dim) when it is None."""
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def softmax_scale(sm_scale: float | None, head_dim: int) -> float:
    """The attention ops' score scale: `default_scale`. ValueError unless it is > 0: the
    kernels take each row's max over the unscaled q·kᵀ and scale it once (see the conventions
    above), which a scale <= 0 would turn into the wrong extreme."""
    scale = default_scale(sm_scale, head_dim)
    if not scale > 0.0:
        raise ValueError(f"sm_scale must be > 0, got {sm_scale}")
    return scale


# --- tiles, masks, dropout and bounds ----------------------------------------------------


@triton.jit
def program_tile(T, H, BLOCK: tl.constexpr, HEAVIEST_FIRST: tl.constexpr):
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
def load_tile(base, offs_t, offs_d, stride_t, stride_d, T, D):
    """Rows offs_t (R,) of one head's (T, D) matrix at `base` as an (R, BLOCK_D) tile; rows past
    T and columns past D read as 0."""
    mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    return tl.load(
        base + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d, mask=mask, other=0.0
    )


@triton.jit
def load_tile_transposed(base, offs_t, offs_d, stride_t, stride_d, T, D):
    """The same rows as `load_tile`, transposed: a (BLOCK_D, R) tile (kᵀ for q·kᵀ)."""
    mask = (offs_t < T)[None, :] & (offs_d < D)[:, None]
    return tl.load(
        base + offs_t[None, :] * stride_t + offs_d[:, None] * stride_d, mask=mask, other=0.0
    )


@triton.jit
def store_tile(base, tile, offs_t, offs_d, stride_t, stride_d, T, D):
    """Write an (R, BLOCK_D) fp32 tile, cast to the pointer's dtype, to rows offs_t of one
    head's (T, D) matrix at `base`; rows past T and columns past D are left alone."""
    mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    ptrs = base + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def tma_load_tile(desc, b, h, row, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [row, row + ROWS) of head (b, h) as a (ROWS, BLOCK_D) tile, through a host
    TensorDescriptor over the whole (B, H, T, D) tensor with blocks (1, 1, ROWS, BLOCK_D): one
    TMA copy on sm_90. The hardware fills rows past T and columns past D with zeros (what
    `load_tile`'s masks do)."""
    return desc.load([b.to(tl.int32), h.to(tl.int32), row, 0]).reshape(ROWS, BLOCK_D)


@triton.jit
def is_visible(offs_m, offs_n, Tq, Tk, CAUSAL: tl.constexpr):
    """Whether query offs_m sees key offs_n: the key exists and, causal, j <= i + (Tk - Tq).
    offs_m and offs_n come as a column and a row (either way round) and broadcast to a tile."""
    visible = offs_n < Tk
    if CAUSAL:
        visible = visible & (offs_n <= offs_m + (Tk - Tq))
    return visible


@triton.jit
def load_seed(seed_ptr, DROPOUT: tl.constexpr):
    """The Philox seed; seed_ptr is None without dropout, and the seed then unused."""
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    return seed


# Philox rounds per draw: 7. FlashAttention-2's dropout draws Philox-4x32 at 7 rounds; the
# Random123 paper's TestU01 Crush runs were made on its 7-round Philox variants, 2x32 among them
# (its tests/old_kat_vectors), its default 10 adding margin. A round costs two instructions per
# group of eight weights. Our checks (tests/test_attention.py,
# test_dropout_draws_pass_the_statistical_checks): full avalanche from 5 rounds on; at 4, the
# masks of neighbouring heads correlate.
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def philox_2x32(c0, c1, key):
    """Philox-2x32 with PHILOX_ROUNDS rounds (Salmon et al., SC'11) of the counter (c0, c1)
    under `key`, all uint32: two uint32 words. Each round's 32x32-bit product is one 64-bit
    multiply, whose halves are the round's mulhi and mullo (one IMAD.WIDE on the GPU instead
    of two multiplies)."""
    for _ in tl.static_range(PHILOX_ROUNDS):
        product = c0.to(tl.uint64) * 0xD256D193
        c0, c1 = (product >> 32).to(tl.uint32) ^ key ^ c1, product.to(tl.uint32)
        key = key + 0x9E3779B9
    return c0, c1


@triton.jit
def dropout_keep(
    seed, bh, row_start, row_offsets, col_start, col_offsets, Tk, dropout_p,
    COL_TILE: tl.constexpr,
):  # fmt: skip
    """Keep-mask of head bh's attention weights at within-head query rows row_start +
    row_offsets and key columns col_start + col_offsets, the offsets a column and a row (either
    way round; they broadcast to the tile); row_start a multiple of 16, col_start one of
    COL_TILE (a power of two, at least 16; where it is 16, col_offsets < 16). dropout_p: a
    `kernel_dropout_p`.
    The weights come in groups of eight, {i, i + 8} × {j, j + 8, j + 16, j + 24} with bit 3 of i
    and bits 3 and 4 of j clear: one Philox-2x32 call per group, counter (i·Tk + j, b·H + h),
    key the seed's low word, gives two words; the member at column bit 4 c, row bit 3 a and
    column bit 3 b takes byte 2a + b of word c and is kept iff that byte is >= p·256. A thread
    holds a group's {i, i + 8} × {j, j + 8} in every kernel's accumulator layout, and all eight
    along S's columns (a register's constant bits: 3 and 4 of its column), so the compiler
    computes each group's Philox once per thread, not once per weight."""
    if COL_TILE % 32 == 0:  # col_start is a multiple of 32: bit 4 of a column is its offset's
        col_base = col_start
        high_word = (col_offsets & 16) != 0
    else:  # a 16-column tile: bit 4 is the tile's
        col_base = col_start - (col_start & 16)
        high_word = (col_start & 16) != 0
    # The tile's first counter plus a loop-invariant offset tile, in which the compiler sees
    # that the members of a group share their counter (their bits 3 and 4 are a register's
    # constants).
    group_offsets = (row_offsets & ~8) * Tk + (col_offsets & ~24)  # (R, C)
    group = (row_start * Tk + col_base + group_offsets).to(tl.uint32, bitcast=True)
    word0, word1 = philox_2x32(group, group * 0 + bh.to(tl.uint32), seed.to(tl.uint32))
    word = tl.where(high_word, word1, word0)
    # the member's byte in bits 24-31: byte 2a + b shifted left by 24 - 8·(2a + b)
    row_high, col_high = (row_offsets & 8) != 0, (col_offsets & 8) != 0
    byte_on_top = tl.where(
        row_high, tl.where(col_high, word, word << 8), tl.where(col_high, word << 16, word << 24)
    )
    threshold = tl.minimum(tl.cast(dropout_p * 256.0 + 0.5, tl.uint32), 255) << 24
    return byte_on_top >= threshold


@triton.jit
def dropout_weight_zero(dropout_p):
    """0.0 for a dropped weight, as a value the compiler cannot fold: with a literal 0, LLVM
    moves the select past the fp16 conversion before the P·V dot and zeroes packed halves
    (PRMT + SEL + PRMT, about three instructions per weight instead of one FSEL)."""
    return dropout_p * 0.0


@triton.jit
def dropout_mask_tile(
    keep_ptr, seed_ptr, Tq, Tk, first_bh, dropout_p, BLOCK: tl.constexpr
):  # fmt: skip
    """One program of a dropout-mask kernel: BLOCK elements of one head's Tq·Tk weights in
    row-major order, keep_ptr's heads in a row (int8, 1 = kept), the program's head h drawn as
    Philox head first_bh + h: the mask `dropout_keep` gives the attention kernels."""
    n_per_head = Tq * Tk
    h, _, _, start = program_tile(n_per_head, 1, BLOCK, False)  # each head's weights are a row
    offsets = start + tl.arange(0, BLOCK)
    rows = offsets // Tk
    cols = offsets - rows * Tk
    keep = dropout_keep(tl.load(seed_ptr), first_bh + h, 0, rows, 0, cols, Tk, dropout_p, 32)
    tl.store(keep_ptr + h * n_per_head + offsets, keep.to(tl.int8), mask=offsets < n_per_head)


@triton.jit
def key_tile_bounds(
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


@triton.jit
def query_tile_bounds(
    n_start, Tq, Tk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """For the key tile starting at n_start: (m_lo, m_masked_end, m_end). Query tiles in
    [m_lo, m_masked_end) cross the diagonal (or this key tile runs past Tk) and are masked;
    [max(m_masked_end, m_lo), m_end) see the whole key tile; those before m_lo see none of it."""
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
    return m_lo, m_masked_end, m_end


# --- forward -----------------------------------------------------------------------------
#
# FlashAttention-2 forward, one program per tile of BLOCK_M query rows of one head.
# For each row i it keeps, over the key tiles seen so far,
#   m_i = running max of the base-2 scores s_ij = (q·kᵀ)_ij · qk_scale,
#   l_i = Σ_j exp2(s_ij - m_i)                      (the softmax denominator, rescaled to m_i),
#   acc_i = Σ_j exp2(s_ij - m_i) · keep_ij · v_j    (the numerator, fp32).
# A new tile with max m' rescales the old sums by alpha = exp2(m_i - m') before adding its own
# terms. At the end out_i = acc_i / l_i / (1 - p) and lse_i = m_i + log2(l_i). While a row has
# seen only masked keys, m_i = -inf; the max is then replaced by the most negative finite float
# so that -inf - -inf never happens (masked terms give exp2(-inf) = 0; a clamp rather than a
# select: one register fewer in the 16-bit head-dim-64 forwards, at ptxas's limit on sm_90 and
# sm_86), and a row that never sees a key keeps l_i = 0 and
# gets out = 0 and lse = +inf (so the backward's exp2(s - lse) is 0 for it).
# The key tiles are walked in two loops: first those every row of the tile sees (no mask), then
# those crossing the diagonal or the end of the keys (MASKED); tiles above the diagonal never.


@triton.jit
def forward_inner(
    acc, m_i, l_i,  # (BLOCK_M, BLOCK_D), (BLOCK_M,), (BLOCK_M,) fp32: the running sums above
    q,  # (BLOCK_M, BLOCK_D): this program's query tile
    k_base, v_base,  # (Tk, D) each: this head's keys and values
    stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m,  # (BLOCK_M,) query rows of the tile: m_start + arange
    offs_d,  # (BLOCK_D,) head-dim columns
    bh, b, h, m_start, n_lo, n_hi, Tq, Tk, D, qk_scale, dropout_p, seed,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """Fold key tiles [n_lo, n_hi) into the running (acc, m_i, l_i) of one query tile.
    TMA: k_base and v_base are the whole (B, H, Tk, D) tensors' descriptors (see
    `tma_load_tile`), read at head (b, h); else pointers to this head's keys and values."""
    for n_start in range(n_lo, n_hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        if TMA:
            kt = tl.trans(tma_load_tile(k_base, b, h, n_start, BLOCK_N, BLOCK_D))
        else:
            kt = load_tile_transposed(k_base, offs_n, offs_d, stride_kn, stride_kd, Tk, D)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
        if MASKED:
            visible = is_visible(offs_m[:, None], offs_n[None, :], Tq, Tk, CAUSAL)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)  # qk_scale > 0: the scaled max
        # no -inf - -inf: a row that has seen only masked keys takes the most negative finite
        # float32 (the max of any row that saw a key is at least that)
        m_safe = tl.maximum(m_new, -3.4028234663852886e38)
        # (BLOCK_M, BLOCK_N) unnormalized weights; a masked -inf stays -inf, so its weight is 0
        p = tl.math.exp2(tl.fma(qk, qk_scale, -m_safe[:, None]))
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            keep = dropout_keep(
                seed, bh, m_start, tl.arange(0, offs_m.shape[0])[:, None],
                n_start, tl.arange(0, BLOCK_N)[None, :], Tk, dropout_p, BLOCK_N,
            )  # fmt: skip
            p = tl.where(keep, p, dropout_weight_zero(dropout_p))
        if TMA:
            v = tma_load_tile(v_base, b, h, n_start, BLOCK_N, BLOCK_D)  # (BLOCK_N, BLOCK_D)
        else:
            v = load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, Tk, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def forward_tile(
    q,  # (BLOCK_M, BLOCK_D): this program's query tile
    k_base, v_base,  # (Tk, D) each, or TMA descriptors (see `forward_inner`)
    stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m,  # (BLOCK_M,) query rows of the tile
    offs_d,  # (BLOCK_D,) head-dim columns
    bh, b, h, m_start, Tq, Tk, D, qk_scale, dropout_p, seed,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
    LSE_FIRST: tl.constexpr,
):  # fmt: skip
    """One query tile's forward: (out (BLOCK_M, BLOCK_D) fp32, lse (BLOCK_M,) fp32), the
    unmasked key tiles first, then the masked ones; a row that saw no key gets out = 0 and
    lse = +inf."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = key_tile_bounds(m_start, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = forward_inner(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, bh, b, h, m_start, 0, full_end, Tq, Tk, D, qk_scale, dropout_p, seed,
        CAUSAL, False, DROPOUT, DOT_PRECISION, BLOCK_N, BLOCK_D, TMA,
    )  # fmt: skip
    acc, m_i, l_i = forward_inner(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, bh, b, h, m_start, full_end, hi, Tq, Tk, D, qk_scale, dropout_p, seed,
        CAUSAL, True, DROPOUT, DOT_PRECISION, BLOCK_N, BLOCK_D, TMA,
    )  # fmt: skip

    sees_a_key = l_i > 0.0
    inv_l = tl.where(sees_a_key, 1.0 / tl.where(sees_a_key, l_i, 1.0), 0.0)
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    # Which of the two comes first is each op's former order: ptxas allocates them differently
    # (varlen's fp32 causal dropout forward spilled 8-24 B more in out-first order, Triton 3.6).
    if LSE_FIRST:
        lse = tl.where(sees_a_key, m_i + tl.math.log2(tl.where(sees_a_key, l_i, 1.0)), float("inf"))
        out = acc * inv_l[:, None]
    else:
        out = acc * inv_l[:, None]
        lse = tl.where(sees_a_key, m_i + tl.math.log2(tl.where(sees_a_key, l_i, 1.0)), float("inf"))
    return out, lse


# --- backward ----------------------------------------------------------------------------
#
# With P = softmax(S) (S = sm_scale·q·kᵀ, masked), K the keep-mask and Pd = P∘K/(1-p):
#   out = Pd·v,   dv = Pdᵀ·dout,   dPd = dout·vᵀ,   dP = dPd∘K/(1-p),
#   dS = P∘(dP - delta) with delta_i = Σ_j dP_ij·P_ij = Σ_j dPd_ij·Pd_ij = Σ_d dout_id·out_id,
#   dq = sm_scale·dS·k,   dk = sm_scale·dSᵀ·q.
# P is recomputed tile by tile from the saved lse: P_ij = exp2((q·kᵀ)_ij · qk_scale - lse_i), which
# Triton's fp fusion (its default) contracts to one FFMA, the form the compile check's binaries
# were judged in (an explicit tl.fma here pushed ptxas to 128 registers and a 56 B spill in
# varlen's fp32 dq with Triton 3.6); the forward, whose max needs the unscaled scores, says fma.
# 1. A delta kernel: delta = rowsum(dout ∘ out).
# 2. A dk/dv kernel (`dkdv_tile`): one program per key tile, looping over the query tiles that
#    can see it (causal: from the diagonal down), accumulating dk and dv in registers.
# 3. A dq kernel (`dq_tile`): one program per query tile, looping over the key tiles it sees
#    (the forward's bounds), accumulating dq in registers.
# Every gradient element is written by exactly one program, summed in a fixed order: no atomics,
# so the same inputs give bitwise identical gradients.


@triton.jit
def dkdv_inner(
    dk, dv,  # (BLOCK_N, BLOCK_D) fp32 each: the key tile's gradients so far
    k, v,  # (BLOCK_N, BLOCK_D) each: the key tile and its values
    q_base, do_base,  # (Tq, D) each: this head's queries and upstream gradient
    lse_base, delta_base,  # (Tq,) fp32 each: this head's lse and delta
    stride_qm, stride_qd, stride_dom, stride_dod,
    offs_n,  # (BLOCK_N,) key rows of the tile: n_start + arange
    offs_d,  # (BLOCK_D,) head-dim columns
    n_start, m_lo, m_hi, Tq, Tk, D, qk_scale, dropout_p, seed, bh,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Add the contributions of query tiles [m_lo, m_hi) to one key tile's dk and dv. Works on
    transposed tiles (keys along rows) so that dk and dv come out of plain dots."""
    for m_start in range(m_lo, m_hi, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Tq
        qt = load_tile_transposed(q_base, offs_m, offs_d, stride_qm, stride_qd, Tq, D)
        # Rows past Tq get lse = +inf, hence P = 0: they add nothing.
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))  # (BLOCK_M,)
        kq = tl.dot(k, qt, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M), unscaled
        pt = tl.math.exp2(kq * qk_scale - lse[None, :])  # P transposed; one FFMA (fp fusion)
        if MASKED:
            visible = is_visible(offs_m[None, :], offs_n[:, None], Tq, Tk, CAUSAL)
            pt = tl.where(visible, pt, 0.0)
        dout = load_tile(do_base, offs_m, offs_d, stride_dom, stride_dod, Tq, D)
        dpt = tl.dot(v, tl.trans(dout), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            keep = dropout_keep(
                seed, bh, m_start, tl.arange(0, BLOCK_M)[None, :],
                n_start, tl.arange(0, offs_n.shape[0])[:, None], Tk, dropout_p, offs_n.shape[0],
            )  # fmt: skip
            # The kept weights; dv's 1 / (1 - p) is applied once, in dkdv_tile.
            pdt = tl.where(keep, pt, dropout_weight_zero(dropout_p))
            dpt = tl.where(keep, dpt, 0.0)
            keep_scale = 1.0 / (1.0 - dropout_p)
        else:
            pdt = pt
            keep_scale = 1.0
        dv += tl.dot(pdt.to(dout.dtype), dout, input_precision=DOT_PRECISION)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
        dst = pt * (dpt * keep_scale - delta[None, :])  # (BLOCK_N, BLOCK_M), one FFMA
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def dkdv_tile(
    k, v,  # (BLOCK_N, BLOCK_D) each: the key tile and its values
    q_base, do_base,  # (Tq, D) each: this head's queries and upstream gradient
    lse_base, delta_base,  # (Tq,) fp32 each: this head's lse and delta
    stride_qm, stride_qd, stride_dom, stride_dod,
    offs_n, offs_d,  # (BLOCK_N,) key rows of the tile, (BLOCK_D,) head-dim columns
    n_start, Tq, Tk, D, qk_scale, dropout_p, seed, bh,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CLAMP_ONCE: tl.constexpr,
):  # fmt: skip
    """One key tile's (dk without sm_scale, dv), (BLOCK_N, BLOCK_D) fp32 each: the masked
    query tiles first, then those that see the whole key tile. CLAMP_ONCE: the split between
    the two is clamped to m_lo once, before both loops, else at the second loop's start: the
    same tiles either way, but ptxas allocates registers differently for the two forms, and
    each op keeps the form its binaries were checked with (benchmarks/results/compile/)."""
    m_lo, m_masked_end, m_end = query_tile_bounds(n_start, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    if CLAMP_ONCE:
        m_masked_end = tl.maximum(m_masked_end, m_lo)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd,
        stride_dom, stride_dod, offs_n, offs_d, n_start, m_lo, m_masked_end, Tq, Tk, D, qk_scale,
        dropout_p, seed, bh, CAUSAL, True, DROPOUT, DOT_PRECISION, BLOCK_M,
    )  # fmt: skip
    m_full = m_masked_end if CLAMP_ONCE else tl.maximum(m_masked_end, m_lo)
    dk, dv = dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd,
        stride_dom, stride_dod, offs_n, offs_d, n_start, m_full, m_end, Tq, Tk, D, qk_scale,
        dropout_p, seed, bh, CAUSAL, False, DROPOUT, DOT_PRECISION, BLOCK_M,
    )  # fmt: skip
    if DROPOUT:
        dv = dv / (1.0 - dropout_p)
    return dk, dv


@triton.jit
def store_dkdv(dk_ptr, dv_ptr, start, dk, dv, offs_n, offs_d, stride_n, stride_d, Tk, D, sm_scale):
    """Write one key tile's dk · sm_scale and dv (rows offs_n of Tk, columns offs_d of D) to
    dk_ptr + start and dv_ptr + start, two tensors of one layout: the offsets are computed once
    for both stores."""
    kv_mask = (offs_n < Tk)[:, None] & (offs_d < D)[None, :]
    offsets = start + (offs_n[:, None] * stride_n + offs_d[None, :] * stride_d)
    tl.store(dk_ptr + offsets, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def dq_inner(
    dq,  # (BLOCK_M, BLOCK_D) fp32: the query tile's gradient so far (without sm_scale)
    q, dout,  # (BLOCK_M, BLOCK_D) each: the query tile and its upstream gradient
    lse, delta,  # (BLOCK_M,) fp32 each
    k_base, v_base,  # (Tk, D) each: this head's keys and values
    stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d,  # (BLOCK_M,) query rows of the tile (m_start + arange), (BLOCK_D,) columns
    bh, m_start, n_lo, n_hi, Tq, Tk, D, qk_scale, dropout_p, seed,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Add the contributions of key tiles [n_lo, n_hi) to one query tile's dq (unscaled)."""
    for n_start in range(n_lo, n_hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        kt = load_tile_transposed(k_base, offs_n, offs_d, stride_kn, stride_kd, Tk, D)
        vt = load_tile_transposed(v_base, offs_n, offs_d, stride_vn, stride_vd, Tk, D)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
        p = tl.math.exp2(qk * qk_scale - lse[:, None])  # one FFMA (fp fusion)
        if MASKED:
            visible = is_visible(offs_m[:, None], offs_n[None, :], Tq, Tk, CAUSAL)
            p = tl.where(visible, p, 0.0)
        if DROPOUT:
            keep = dropout_keep(
                seed, bh, m_start, tl.arange(0, offs_m.shape[0])[:, None],
                n_start, tl.arange(0, BLOCK_N)[None, :], Tk, dropout_p, BLOCK_N,
            )  # fmt: skip
            # dp's factor, 1 / (1 - p) or 0: a float, not a predicate held until dp is ready
            dp_factor = tl.where(keep, 1.0 / (1.0 - dropout_p), dropout_weight_zero(dropout_p))
        else:
            dp_factor = 1.0
        dp = tl.dot(dout, vt, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp * dp_factor - delta[:, None])  # one FFMA
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def dq_tile(
    q_base, do_base,  # (Tq, D) each: this head's queries and upstream gradient
    lse_base, delta_base,  # (Tq,) fp32 each: this head's lse and delta
    k_base, v_base,  # (Tk, D) each: this head's keys and values
    seed_ptr,  # (1,) int64 Philox seed, or None without dropout
    stride_qm, stride_qd, stride_dom, stride_dod, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m,  # (BLOCK_M,) query rows of the tile
    offs_d,  # (BLOCK_D,) head-dim columns
    bh, m_start, Tq, Tk, D, qk_scale, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One query tile's dq without sm_scale, (BLOCK_M, BLOCK_D) fp32: the unmasked key tiles
    first (the forward's bounds), then the masked ones."""
    m_ok = offs_m < Tq
    q = load_tile(q_base, offs_m, offs_d, stride_qm, stride_qd, Tq, D)  # (BLOCK_M, BLOCK_D)
    dout = load_tile(do_base, offs_m, offs_d, stride_dom, stride_dod, Tq, D)
    lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))  # (BLOCK_M,)
    delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
    seed = load_seed(seed_ptr, DROPOUT)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = key_tile_bounds(m_start, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    dq = dq_inner(
        dq, q, dout, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, bh, m_start, 0, full_end, Tq, Tk, D, qk_scale, dropout_p, seed,
        CAUSAL, False, DROPOUT, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    dq = dq_inner(
        dq, q, dout, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, bh, m_start, full_end, hi, Tq, Tk, D, qk_scale, dropout_p, seed,
        CAUSAL, True, DROPOUT, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    return dq


# --- host helpers ------------------------------------------------------------------------


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D: the head dim rounded up to a power of two, at least 16 for tl.dot."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots (not tf32); 16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def seed_tensor(seed: int | None, device: torch.device | str) -> torch.Tensor:
    """The Philox seed as a (1,) int64 tensor on `device`; None draws one from torch's generator
    for that device (so torch.manual_seed makes dropout reproducible). Kept as a tensor so that
    torch.compile can trace the draw instead of breaking the graph on .item()."""
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return torch.tensor([seed], dtype=torch.int64, device=device)


def target_arch():
    """The compute capability Triton compiles for (90 for sm_90), from its active driver (a stub
    one in the compile check)."""
    return triton.runtime.driver.active.get_current_target().arch


# --- tile tables -------------------------------------------------------------------------
#
# An op's tiles per kernel ("forward", "dkdv", "dq") as a table keyed by (arch family, "16-bit"
# or "fp32", BLOCK_D), each entry (BLOCK_M, BLOCK_N, num_warps, num_stages) for the three kernels
# in that order. sm_80 stands for mma.sync targets (operands in registers), sm_90 for wgmma ones;
# sm_86 for the mma.sync GPUs with 99 KB of shared memory per block (SM_86_FAMILY): sm_80's
# tiles where its ptxas fits them too.
# Each entry is the tiles that ptxas compiles without register spills for that arch with the
# supported Tritons, in the heaviest variant (causal, with dropout), chosen without a GPU and not
# timed: the per-entry evidence is in benchmarks/results/compile/ (README.md, the reports, and
# budget.json for what still spills and its cost).

TileConfig = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
TileTable = dict[tuple[str, str, int], tuple[TileConfig, TileConfig, TileConfig]]
KERNELS = ("forward", "dkdv", "dq")
# The interpreter's tiles: small (it is slow and runs programs one at a time), query and key
# tiles of different sizes in the GPU tiles' ratios, so that the CPU tests walk the same
# tile-bound arithmetic (several masked tiles per diagonal).
INTERPRETER_TILES = ((32, 16, 1, 1), (16, 32, 1, 1), (32, 16, 1, 1))


# attention's pinned tiles (varlen's start from them)
ATTENTION_TILES: TileTable = {
    # key: (forward, dkdv, dq), each (BLOCK_M, BLOCK_N, num_warps, num_stages)
    ("sm_90", "16-bit", 16): ((128, 64, 8, 2), (32, 128, 8, 2), (128, 32, 8, 2)),
    ("sm_90", "16-bit", 32): ((128, 64, 8, 2), (32, 128, 8, 2), (128, 32, 8, 2)),
    ("sm_90", "16-bit", 64): ((128, 64, 8, 2), (32, 128, 8, 2), (128, 32, 8, 2)),
    # dk/dv: 128 key rows on 8 warps, 16 a warp, so each Sᵀ and dPᵀ product is issued once
    # (32 x 64 on 8 warps issued them twice); 16 queries a tile leave the registers for it.
    ("sm_90", "16-bit", 128): ((128, 32, 8, 2), (16, 128, 8, 2), (128, 32, 8, 2)),
    ("sm_90", "fp32", 16): ((16, 32, 4, 2), (32, 16, 4, 2), (32, 16, 4, 2)),
    ("sm_90", "fp32", 32): ((16, 32, 4, 2), (32, 16, 4, 2), (32, 32, 4, 2)),
    ("sm_90", "fp32", 64): ((16, 32, 4, 2), (32, 16, 4, 2), (32, 32, 4, 2)),
    # fp32 dq at head dim 128 on 8 warps: 4 spilled 8 B at 128 registers (causal, dropout,
    # Triton 3.9); 78 registers on 8.
    ("sm_90", "fp32", 128): ((16, 32, 8, 2), (16, 32, 8, 2), (32, 16, 8, 2)),
    ("sm_80", "16-bit", 16): ((64, 64, 8, 2), (16, 128, 8, 2), (128, 16, 8, 2)),
    ("sm_80", "16-bit", 32): ((128, 64, 8, 2), (32, 128, 8, 2), (128, 32, 8, 2)),
    ("sm_80", "16-bit", 64): ((128, 64, 8, 2), (32, 128, 8, 2), (128, 32, 8, 2)),
    # dk/dv and dq at head dim 128: 128 rows of the accumulators (keys, queries) on 8 warps,
    # so that Triton splits the warps along rows (it gives a chain of dots whose accumulator
    # has fewer rows than BLOCK_D warps along columns: 32 x 64 and 64 x 32 made each warp own
    # 8 columns of S, computed every S product twice and drew the dropout mask once per weight,
    # 1.54-1.65x the loop without it). The dq on 3 stages: on 2 it spilled 8-16 B without the
    # mask (Triton 3.9).
    ("sm_80", "16-bit", 128): ((128, 32, 8, 2), (16, 128, 8, 2), (128, 16, 8, 3)),
    ("sm_80", "fp32", 16): ((16, 32, 4, 2), (16, 32, 4, 2), (32, 16, 4, 2)),
    ("sm_80", "fp32", 32): ((16, 32, 4, 2), (16, 32, 4, 2), (32, 32, 4, 2)),
    ("sm_80", "fp32", 64): ((16, 32, 4, 2), (16, 32, 4, 2), (32, 32, 4, 2)),
    ("sm_80", "fp32", 128): ((16, 32, 8, 2), (16, 32, 8, 2), (32, 16, 4, 2)),
}


def copy_family(table: TileTable, source: str, family: str) -> TileTable:
    """`table`'s entries of arch family `source` keyed by `family` instead."""
    return {(family, p, d): tiles for (f, p, d), tiles in table.items() if f == source}


ATTENTION_TILES |= {
    **copy_family(ATTENTION_TILES, "sm_80", "sm_86"),
    # sm_80's 128 x 64 forward needs 255 registers and spills 8 B on sm_86/89 (causal,
    # dropout): half the key tile, as at head dim 128.
    ("sm_86", "16-bit", 64): ((128, 32, 8, 2), (32, 128, 8, 2), (128, 32, 8, 2)),
    # sm_80's dk/dv on 2 stages spilled 16 B on sm_86 (dropout without the mask, Triton 3.9), on
    # 3 and 4 stages 8-16 B with 3.6: 1 stage; its dq on 3 stages spilled 16 B (3.9): 4 stages.
    ("sm_86", "16-bit", 128): ((128, 32, 8, 2), (16, 128, 8, 1), (128, 16, 8, 4)),
}
ATTENTION_TILES |= {
    **copy_family(ATTENTION_TILES, "sm_86", "sm_120"),
    # sm_120's ptxas spills the 32-query dk/dv at head dim 64 (causal, dropout; Triton 3.9):
    # 16 queries a tile.
    ("sm_120", "16-bit", 64): ((128, 32, 8, 2), (16, 128, 8, 2), (128, 32, 8, 2)),
    # and sm_86's 128-row dk/dv and dq at head dim 128 (16-56 B with Triton 3.9, 8-16 B with
    # 3.6): the 32 x 64 dk/dv and 64 x 32 dq, which issue S's products twice.
    ("sm_120", "16-bit", 128): ((128, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2)),
}
ATTENTION_TILES |= {
    **copy_family(ATTENTION_TILES, "sm_90", "sm_100"),
    # sm_100's ptxas gave sm_90's 128 x 32 forward (its TMA candidate, Triton 3.9) and dq
    # (Triton 3.6) 128 registers and 32 B of spills at head dim 128 (causal, dropout): 64 x 64
    # on 4 warps (244-255 registers, 0 spills with both), whose loop the cycle model bounds at
    # 0.30-0.36 issue cycles per score, against 0.44-0.49 for 64 x 32 on 8 warps (100-133
    # registers) and 0.28-0.33 for sm_90's tiles where they do not spill.
    # The dk/dv is sm_90's 16 x 128: 32 x 64 spilled 24 B at 128 registers (causal, dropout at
    # a byte threshold, Triton 3.6).
    ("sm_100", "16-bit", 128): ((64, 64, 4, 2), (16, 128, 8, 2), (64, 64, 4, 2)),
    # At head dim 64 too, its ptxas spilled 8-48 B at 128 registers: the dq (causal, dropout,
    # 3.9), the forward without dropout (3.9, 3.6) and the dk/dv without the mask (dropout,
    # 3.6): the forward and dq 64 x 64 on 4 warps, the dk/dv 16 x 128 on 8 warps (sm_120's).
    ("sm_100", "16-bit", 64): ((64, 64, 4, 2), (16, 128, 8, 2), (64, 64, 4, 2)),
}


# Compute capabilities of the mma.sync GPUs with 99 KB of shared memory per block: sm_86/sm_87
# (RTX 30xx, A10, Orin), sm_89 (RTX 40xx, L4); sm_120/sm_121 (RTX 50xx, DGX Spark) are the
# same limits with a ptxas of their own (SM_120_FAMILY: sm_86's tiles but where it spills).
# SM_100_FAMILY: the Blackwell datacenter GPUs (tcgen05, 227 KB per block), sm_100 (B200,
# GB200) and sm_103 (B300, GB300), which Triton 3.6 and 3.9 both compile for (sm_101/sm_110,
# Jetson Thor, renamed in CUDA 13: each Triton's ptxas refuses one of the two names).
SM_86_FAMILY = (86, 87, 89)
SM_100_FAMILY = (100, 103)
SM_120_FAMILY = (120, 121)


def arch_family(arch: object) -> str:
    """The tile tables' arch key for a compute capability (90 for sm_90): "sm_86" for
    SM_86_FAMILY, "sm_100" for SM_100_FAMILY, "sm_120" for SM_120_FAMILY, else "sm_90" from 90
    on, "sm_75" below 80 (the row-wise kernels' tiles; the attention ops refuse such a GPU
    before asking), else "sm_80"."""
    if arch in SM_86_FAMILY:
        return "sm_86"
    if arch in SM_100_FAMILY:
        return "sm_100"
    if arch in SM_120_FAMILY:
        return "sm_120"
    if isinstance(arch, int) and arch < 80:
        return "sm_75"
    return "sm_90" if isinstance(arch, int) and arch >= 90 else "sm_80"


def block_config(
    table: TileTable, dtype: torch.dtype, head_dim: int, arch: Callable[[], object]
) -> dict[str, dict[str, int]]:
    """{kernel: {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}} for `dtype` and `head_dim`
    from `table` on the arch that `arch()` names; the interpreter's small tiles under
    TRITON_INTERPRET=1 (arch() is then not asked)."""
    if triton_interpreter_enabled():
        tiles = INTERPRETER_TILES
    else:
        precision = "fp32" if dtype == torch.float32 else "16-bit"
        tiles = table[(arch_family(arch()), precision, padded_head_dim(head_dim))]
    names = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    pairs = zip(KERNELS, tiles, strict=True)
    return {kernel: dict(zip(names, tile, strict=True)) for kernel, tile in pairs}
