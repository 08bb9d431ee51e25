"""Split-KV ("flash-decoding") attention: one new query per row against a long KV cache.

    out = decode_attention(q, k_cache, v_cache, cache_seqlens)
    # q (B, H, D), k/v (B, H, capacity, D), cache_seqlens (B,) int32 -> (B, H, D)

Row b's query sees keys 0 .. cache_seqlens[b] - 1 of its cache (the rest of the buffer, stale or
unwritten, is never read). With one query per (row, head) a flash-attention program has a single
row of work and B·H programs leave most of a GPU idle, so the keys are split into chunks handled
by separate programs (grid B·H × splits). Each writes a partial result for its chunk: the running
max `m` of its base-2 scores, the sum `l` of exp2(s - m) and the unnormalized weighted sum `acc`
(D,), all fp32. A second kernel merges the splits of each (row, head):
M = max_s m_s, out = Σ_s 2^(m_s - M)·acc_s / Σ_s 2^(m_s - M)·l_s.

A row with cache_seqlens 0 sees no key: its output is zeros (as `attention` gives a causal row
that sees no key). Lengths live on the device and are never read by the host, so a decode step
stays free of host syncs (and capturable in a CUDA graph); lengths beyond the cache's capacity
are clamped to it by the kernel, and the caller keeps them in range.

Where it runs (see `kernels/_dispatch.py`): CUDA tensors run the Triton kernels; CPU tensors run
them through Triton's interpreter when TRITON_INTERPRET=1, else `decode_attention_reference`.
Forward only (generation needs no gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import check_float, check_gpu, check_same_device, define_op, use_triton
from ._dispatch import empty_output as _empty  # tests swap in a nan-filled allocator
from .flash_core import LOG2E, default_scale, load_tile, padded_head_dim

MAX_SPLITS = 64


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch: q (B, H, D) against keys 0 .. cache_seqlens[b] - 1 of k/v (B, H, C, D),
    softmax in fp32 (fp64 stays fp64) -> (B, H, D) in q's dtype; zeros for a zero-length row."""
    d, capacity = q.shape[-1], k_cache.shape[2]
    scale = default_scale(sm_scale, d)
    compute = torch.promote_types(q.dtype, torch.float32)
    qc, kc, vc = q.to(compute), k_cache.to(compute), v_cache.to(compute)
    scores = torch.einsum("bhd,bhcd->bhc", qc, kc) * scale  # (B, H, C)
    j = torch.arange(capacity, device=q.device)
    visible = j[None, :] < cache_seqlens.to(q.device).long()[:, None]  # (B, C)
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    # A zero-length row softmaxes all -inf (nan): zero its weights instead.
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (B, H, C)
    return torch.einsum("bhc,bhcd->bhd", weights, vc).to(q.dtype)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, seqlens_ptr, m_ptr, l_ptr, acc_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    H, C, D, chunk, num_splits, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program: (row b, head h) and split s, keys [s·chunk, (s+1)·chunk) ∩ [0, length_b).
    Writes m, l (fp32 scalars) and acc (D,) fp32 for the split; an empty split m = -inf."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    length = tl.minimum(tl.load(seqlens_ptr + b), C)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + offs_d * stride_qd,
                mask=mask_d, other=0.0).to(tl.float32)  # fmt: skip
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        k = load_tile(k_base, offs_n, offs_d, stride_kt, stride_kd, end, D).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * qk_scale  # (BLOCK_N,) base-2 scores
        s = tl.where(mask_n, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))  # finite: the tile has a visible key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)  # (BLOCK_N,), 0 where masked
        # (BLOCK_N, BLOCK_D) each: keys and values past `end` and columns past D read as 0
        v = load_tile(v_base, offs_n, offs_d, stride_vt, stride_vd, end, D).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    part = bh * num_splits + split
    tl.store(m_ptr + part, m_i)
    tl.store(l_ptr + part, l_i)
    tl.store(acc_ptr + part.to(tl.int64) * BLOCK_D + offs_d, acc)


@triton.jit
def _decode_reduce_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,
    stride_ob, stride_oh, stride_od,
    H, D, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (row, head): merge its splits' partials into out (D,) in out's dtype."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    base = bh * num_splits
    m = tl.load(m_ptr + base + offs_s, mask=mask_s, other=float("-inf"))  # (BLOCK_S,)
    l_s = tl.load(l_ptr + base + offs_s, mask=mask_s, other=0.0)
    acc = tl.load(
        acc_ptr + (base + offs_s).to(tl.int64)[:, None] * BLOCK_D + offs_d[None, :],
        mask=mask_s[:, None],
        other=0.0,
    )  # fmt: skip (BLOCK_S, BLOCK_D)
    m_max = tl.max(m, axis=0)
    # All splits empty (a zero-length row): m_max = -inf; weigh nothing, output zeros.
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_safe))  # (BLOCK_S,)
    denom = tl.sum(w * l_s, axis=0)
    num = tl.sum(w[:, None] * acc, axis=0)  # (BLOCK_D,)
    out = num / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < D)  # fmt: skip


def split_plan(capacity: int, num_splits: int | None = None) -> tuple[int, int, int]:
    """(num_splits, chunk, BLOCK_N) for a cache of `capacity` keys: chunks of whole BLOCK_N
    tiles, about 256 keys each by default (at most MAX_SPLITS). From the capacity, not the
    lengths, so that planning needs no device-to-host copy."""
    block_n = 32 if capacity > 16 else 16
    if num_splits is None:
        num_splits = min(MAX_SPLITS, max(1, triton.cdiv(capacity, 256)))
    num_splits = max(1, min(num_splits, triton.cdiv(capacity, block_n)))
    chunk = triton.cdiv(triton.cdiv(capacity, num_splits), block_n) * block_n
    return triton.cdiv(capacity, chunk), chunk, block_n


@define_op("fastgpt::decode_attention")
def _decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    sm_scale: float,
    num_splits: int,
) -> torch.Tensor:
    """Launch the split and reduce kernels -> (B, H, D) in q's dtype."""
    batch, heads, head_dim = q.shape
    capacity = k_cache.shape[2]
    splits, chunk, block_n = split_plan(capacity, num_splits if num_splits > 0 else None)
    block_d = padded_head_dim(head_dim)
    parts = batch * heads * splits
    m = _empty((parts,), torch.float32, q.device)
    l_s = _empty((parts,), torch.float32, q.device)
    acc = _empty((parts, block_d), torch.float32, q.device)
    out = _empty((batch, heads, head_dim), q.dtype, q.device)
    torch.library.wrap_triton(_decode_split_kernel)[(batch * heads, splits)](
        q, k_cache, v_cache, cache_seqlens, m, l_s, acc,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        heads, capacity, head_dim, chunk, splits, sm_scale * LOG2E,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4 if block_d >= 64 else 2,
    )  # fmt: skip
    torch.library.wrap_triton(_decode_reduce_kernel)[(batch * heads,)](
        m, l_s, acc, out, *out.stride(), heads, head_dim, splits,
        BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d, num_warps=1,
    )  # fmt: skip
    return out


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, sm_scale, num_splits):
    return q.new_empty(q.shape)


def _validate(q, k_cache, v_cache, cache_seqlens) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_float(name, t)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise TypeError(
            f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, "
            f"{v_cache.dtype}"
        )
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            f"q must be (B, H, D) and k_cache (B, H, capacity, D), got q {tuple(q.shape)}, "
            f"k_cache {tuple(k_cache.shape)}"
        )
    b, h, d = q.shape
    if k_cache.shape != v_cache.shape or (k_cache.shape[0], k_cache.shape[1], k_cache.shape[3]) != (
        b,
        h,
        d,
    ):
        raise ValueError(
            f"k_cache and v_cache must be (B, H, capacity, D) = ({b}, {h}, capacity, {d}) like "
            f"q, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if cache_seqlens.shape != (b,):
        raise ValueError(
            f"cache_seqlens must have shape (B,) = ({b},), got {tuple(cache_seqlens.shape)}"
        )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    sm_scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one query per (row, head) over that row's cached keys.

    q: (B, H, D); k_cache, v_cache: (B, H, capacity, D), any strides; cache_seqlens: (B,)
    int32, row b sees keys 0 .. cache_seqlens[b] - 1 (0: output zeros; lengths past capacity
    count as capacity) -> (B, H, D) in q's dtype. sm_scale: default 1/sqrt(D). num_splits: how
    many chunks the keys are split into (default from the capacity, `split_plan`). No
    gradient. Raises TypeError for non-float or mixed dtypes or non-int32 lengths, ValueError
    for shapes that do not fit or mixed devices."""
    _validate(q, k_cache, v_cache, cache_seqlens)
    check_gpu("decode_attention", q, dots=True)
    scale = default_scale(sm_scale, q.shape[2])
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    empty = q.numel() == 0 or k_cache.shape[2] == 0
    if empty or not use_triton(q.device):
        return decode_attention_reference(q, k_cache, v_cache, cache_seqlens, scale)
    return _decode_attention_op(q, k_cache, v_cache, cache_seqlens, scale, num_splits or 0)
