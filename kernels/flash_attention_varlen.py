"""Variable-length flash attention: many sequences packed along one token axis, no padding.

    out = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    # q (total_q, H, D), k/v (total_k, H, D) -> (total_q, H, D)

Sequence i is rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and rows
cu_seqlens_k[i]:cu_seqlens_k[i+1] of k and v; its queries attend only to its own keys, with the
conventions of `attention` (kernels/flash_core.py, whose tile loops both run): causal
alignment bottom-right per sequence, base-2 scores and log-sum-exp, a row that sees no key gives
0 and zero gradients, dropout regenerated from Philox in the backward pass.

How the work is laid out, and why
- A program owns one tile of one sequence of one head, and tiles never cross sequences: a tile
  of sequence i holds up to BLOCK rows of sequence i only (its last tile may be partial). The
  grid is one flat axis of H * num_slots programs, heads outermost; slot s of a head is looked
  up in a small (2, num_slots) int32 table (sequence id, first row of the tile within the
  sequence) built from cu_seqlens by a few torch ops on the device (`_tile_lookup`: no host
  sync, shapes fixed by the inputs' shapes, so it traces under torch.compile).
  num_slots = min(cdiv(total, BLOCK) + batch, batch * cdiv(max_seqlen, BLOCK)) bounds the real
  tile count (each sequence adds at most one partial tile); spare slots are idle programs that
  see Tq = Tk = 0 and loop zero times.
- Inside its sequence a program runs `attention`'s inner loops (kernels/flash_core.py) on base
  pointers moved to the sequence's first row, with Tq, Tk the sequence's lengths: a query tile
  visits only its sequence's keys, up to its diagonal when causal. The cost is
  sum_i Tq_i * Tk_i (about half that causal), not (sum_i T_i)^2 as attention over the whole
  packed axis with a block-diagonal mask would be, and no padding to the longest sequence is
  computed or stored.
- Forward and dq: slots are query tiles; dk/dv: slots are key tiles (looping over the query
  tiles of the same sequence that see them). Each gradient element is written by one program in
  a fixed order: no atomics, bitwise deterministic. Within a sequence the query tiles are
  numbered from the last and the key tiles from the first: under a causal mask those are the
  longest programs of the sequence, and they start first.
- Dropout's draw is attention's (flash_core's header) with sequence i in place of the batch
  index: head i * H + h, rows and columns counted within sequence i's (Tq_i, Tk_i) weights, so
  the mask of a sequence does not depend on the others; `attention_varlen_dropout_mask` draws the
  same masks. Tq_i * Tk_i < 2^31 is checked.
- lse and delta are (H, total_q) fp32 (attention's (B*H, Tq) with B = 1), as in attention.
- Offsets: a sequence's first row times the row stride is int64; offsets inside one sequence
  are int32 (max_seqlen * row stride < 2^31 is checked), as inside one head in `attention`.

Input checks copy cu_seqlens to the host (a synchronization per call; skipped under
torch.compile and with check_cu_seqlens=False, where only their types and shapes are checked).
Where it runs: as `attention` (kernels/_dispatch.py): CUDA runs the kernels, CPU runs them
through Triton's interpreter when TRITON_INTERPRET=1, else `attention_varlen_reference` (whose
dropout then comes from PyTorch's generator).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from . import flash_core as fc
from ._dispatch import (
    bf16_in_fp32_under_interpreter,
    check_gpu,
    check_same_device,
    define_op,
    use_triton,
)
from ._dispatch import empty_output as _empty  # tests swap in a nan-filled allocator
from .flash_core import SUPPORTED_HEAD_DIMS as SUPPORTED_HEAD_DIMS  # the op's API
from .flash_core import attention_reference, seed_tensor

# --- reference ---------------------------------------------------------------------------


def _sequence_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of each sequence from a (batch + 1,) prefix sum (one host sync)."""
    cu = cu_seqlens.tolist()
    return list(itertools.pairwise(cu))


def attention_varlen_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    causal: bool = True, sm_scale: float | None = None, dropout_p: float = 0.0,
    seed: int | None = None, dropout_masks: list[torch.Tensor] | None = None, upcast: bool = True,
) -> torch.Tensor:  # fmt: skip
    """`attention_reference` looped over the packed sequences. q (total_q, H, D), k and v
    (total_k, H, D), cu_seqlens_* (batch + 1,) int32 -> (total_q, H, D) in q's dtype.

    dropout_masks: one (H, Tq_i, Tk_i) keep-mask per sequence (`attention_varlen_dropout_mask`)
    applied with scaling 1 / (1 - dropout_p). Without them dropout_p > 0 draws its masks from
    torch's generator, or from a torch.Generator seeded with `seed` when one is given (the same
    seed then gives the same output here, though not the kernels' Philox mask).
    upcast: compute in at least fp32; False computes in the inputs' dtype (the tests' "PyTorch
    in the same dtype"). max_seqlen_* are accepted for the signature and not used."""
    scale = fc.default_scale(sm_scale, q.shape[-1])
    generator = None
    if dropout_masks is None and dropout_p > 0.0 and seed is not None:
        generator = torch.Generator(device=q.device).manual_seed(seed)
    pieces = []
    bounds = zip(_sequence_bounds(cu_seqlens_q), _sequence_bounds(cu_seqlens_k), strict=True)
    for i, ((q0, q1), (k0, k1)) in enumerate(bounds):
        if q1 == q0:
            continue
        # (T, H, D) rows of one sequence -> (1, H, T, D), attention's layout
        qi, ki, vi = (
            t[a:b].transpose(0, 1)[None] for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1))
        )
        mask = None
        if dropout_masks is not None:
            mask = dropout_masks[i][None]
        elif generator is not None:
            shape = (1, q.shape[1], q1 - q0, k1 - k0)
            mask = torch.rand(shape, generator=generator, device=q.device) >= dropout_p
        out = attention_reference(qi, ki, vi, causal, scale, dropout_p, mask, upcast)
        pieces.append(out[0].transpose(0, 1))  # (Tq_i, H, D)
    if not pieces:
        return q * 0.0  # total_q == 0: an empty output that still carries q's graph
    return torch.cat(pieces, dim=0)


# --- input checks ------------------------------------------------------------------------


def _validate_cu_seqlens(
    name: str, cu: torch.Tensor, total: int, max_seqlen: int, check_values: bool
) -> None:
    """Raise TypeError/ValueError naming `name` unless it is a valid (batch + 1,) int32 prefix
    sum of sequence lengths over `total` rows, none longer than max_seqlen. The value checks
    need the numbers on the host: one device-to-host copy (skipped under torch.compile)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D (batch + 1,), got shape {tuple(cu.shape)}")
    if not check_values:
        return
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in itertools.pairwise(values)]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] = {values[-1]} must equal the total rows {total}")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen for {name} is {max_seqlen}, below a real length {longest}")


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    check_values: bool = True,
) -> None:
    """Raise ValueError/TypeError naming the problem with attention_varlen's inputs."""
    fc.check_qkv(q, k, v, 3)
    cu_checks = (
        ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
        ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k),
    )
    for name, cu, total, max_seqlen in cu_checks:  # types and shapes first
        _validate_cu_seqlens(name, cu, total, max_seqlen, check_values=False)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
            f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
        )
    check_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if check_values:  # the values: one host copy of each
        for name, cu, total, max_seqlen in cu_checks:
            _validate_cu_seqlens(name, cu, total, max_seqlen, check_values=True)


# --- the tile lookup ---------------------------------------------------------------------


def _tile_lookup(
    cu_seqlens: torch.Tensor, total: int, max_seqlen: int, block: int, last_first: bool = True
) -> torch.Tensor:
    """(2, num_slots) int32 on cu_seqlens' device: row 0 the sequence of each slot, row 1 the
    first row of its tile within the sequence (-1: an idle slot past the last tile). A
    sequence's tiles come last tile first (last_first; causal query tiles: the heaviest first)
    or in order (key tiles: under a causal mask the first see the most queries).
    num_slots depends on shapes and max_seqlen only."""
    batch = cu_seqlens.numel() - 1
    num_slots = min(triton.cdiv(total, block) + batch, batch * triton.cdiv(max_seqlen, block))
    tiles = (cu_seqlens[1:] - cu_seqlens[:-1] + block - 1).long() // block  # (batch,)
    tile_ends = torch.cumsum(tiles, 0)  # (batch,) one past each sequence's last slot
    slot = torch.arange(num_slots, dtype=torch.int64, device=cu_seqlens.device)
    seq = torch.searchsorted(tile_ends, slot, right=True)  # (num_slots,), batch when idle
    idle = seq >= batch
    seq = seq.clamp(max=max(batch - 1, 0))
    tile = tile_ends[seq] - 1 - slot  # the sequence's first slot takes its last tile
    if not last_first:
        tile = tiles[seq] - 1 - tile
    start = torch.where(idle, -1, tile * block)
    return torch.stack((seq, start)).to(torch.int32)


# --- kernels -----------------------------------------------------------------------------


@triton.jit
def _varlen_tile(lookup_ptr, num_slots, cu_q_ptr, cu_k_ptr):
    """This program's (h, seq, tile_start, q_start, Tq, k_start, Tk) on the flat grid of
    H * num_slots programs: its head, its sequence, the first row of its tile within the
    sequence, the sequence's first rows of q and k (int64) and its lengths (0 if idle)."""
    pid = tl.program_id(0)
    h = (pid // num_slots).to(tl.int64)
    slot = pid % num_slots
    seq = tl.load(lookup_ptr + slot)
    tile_start = tl.load(lookup_ptr + num_slots + slot)
    idle = tile_start < 0
    q_start = tl.load(cu_q_ptr + seq)
    k_start = tl.load(cu_k_ptr + seq)
    tq = tl.where(idle, 0, tl.load(cu_q_ptr + seq + 1) - q_start)
    tk = tl.where(idle, 0, tl.load(cu_k_ptr + seq + 1) - k_start)
    start = tl.maximum(tile_start, 0)
    return h, seq, start, q_start.to(tl.int64), tq, k_start.to(tl.int64), tk


@triton.jit
def _varlen_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,  # (total, H, D) each (total_q rows: q, out; total_k: k, v)
    lse_ptr,  # (H, total_q) fp32 contiguous, base-2 log-sum-exp of each row's scores
    seed_ptr,  # (1,) int64 Philox seed, or None without dropout
    cu_q_ptr, cu_k_ptr, lookup_ptr,  # (batch + 1,) int32 each; query tiles (`_tile_lookup`)
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd, stride_ot, stride_oh, stride_od,
    H, total_q, num_slots, D, qk_scale, dropout_p,  # qk_scale = sm_scale · log2(e)
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    h, seq, m_start, q0, Tq, k0, Tk = _varlen_tile(lookup_ptr, num_slots, cu_q_ptr, cu_k_ptr)
    bh = seq * H + h  # dropout's head index: sequence i plays attention's batch index b
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + q0 * stride_qt + h * stride_qh
    q = fc.load_tile(q_base, offs_m, offs_d, stride_qt, stride_qd, Tq, D)  # (BLOCK_M, BLOCK_D)
    k_base = k_ptr + k0 * stride_kt + h * stride_kh
    v_base = v_ptr + k0 * stride_vt + h * stride_vh
    seed = fc.load_seed(seed_ptr, DROPOUT)
    out, lse = fc.forward_tile(  # (b, h) are TMA's only: 0, 0 here
        q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d,
        bh, 0, 0, m_start, Tq, Tk, D, qk_scale, dropout_p, seed,
        CAUSAL, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, False, True,
    )  # fmt: skip
    tl.store(lse_ptr + h * total_q + q0 + offs_m, lse, mask=offs_m < Tq)
    out_base = out_ptr + q0 * stride_ot + h * stride_oh
    fc.store_tile(out_base, out, offs_m, offs_d, stride_ot, stride_od, Tq, D)


@triton.jit
def _varlen_delta_kernel(
    out_ptr,  # (total_q, H, D), any strides
    dout_ptr,  # (total_q, H, D), any strides
    delta_ptr,  # (H, total_q) fp32 contiguous: rowsum(dout ∘ out)
    stride_ot, stride_oh, stride_od,
    stride_dot, stride_doh, stride_dod,
    H, total_q, D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Rows are independent here, so tiles run over the packed axis regardless of sequences;
    # row offsets are int64 (total_q · stride can pass 2^31).
    h, _, _, m_start = fc.program_tile(total_q, H, BLOCK_M, False)  # (h, 0, h, start) at B = 1
    offs_m = (m_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < total_q)[:, None] & (offs_d < D)[None, :]
    o_ptrs = out_ptr + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    do_ptrs = dout_ptr + h * stride_doh + offs_m[:, None] * stride_dot
    do_ptrs += offs_d[None, :] * stride_dod
    out = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    dout = tl.load(do_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    delta = tl.sum(out * dout, axis=1)
    tl.store(delta_ptr + h * total_q + offs_m, delta, mask=offs_m < total_q)


# The two gradient kernels take the same inputs, then their outputs: q, k, v, dout
# (total, H, D) any strides (total_q rows: q, dout; total_k: k, v), lse and delta (H, total_q)
# fp32 contiguous, the (1,) int64 Philox seed or None without dropout, cu_seqlens_q/k
# (batch + 1,) int32 and the (2, num_slots) int32 tile lookup (`_tile_lookup`: key tiles for
# dk/dv, query tiles for dq); qk_scale is sm_scale · log2(e).


@triton.jit
def _varlen_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, seed_ptr, cu_q_ptr, cu_k_ptr, lookup_ptr,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd, stride_dot, stride_doh, stride_dod,
    dk_ptr, dv_ptr, stride_dkt, stride_dkh, stride_dkd,  # (total_k, H, D) each, one layout
    H, total_q, num_slots, D, sm_scale, qk_scale, dropout_p,  # dk is stored times sm_scale
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    h, seq, n_start, q0, Tq, k0, Tk = _varlen_tile(lookup_ptr, num_slots, cu_q_ptr, cu_k_ptr)
    bh = seq * H + h
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = k_ptr + k0 * stride_kt + h * stride_kh
    k = fc.load_tile(k_base, offs_n, offs_d, stride_kt, stride_kd, Tk, D)  # (BLOCK_N, BLOCK_D)
    v_base = v_ptr + k0 * stride_vt + h * stride_vh
    v = fc.load_tile(v_base, offs_n, offs_d, stride_vt, stride_vd, Tk, D)  # (BLOCK_N, BLOCK_D)
    q_base = q_ptr + q0 * stride_qt + h * stride_qh
    do_base = dout_ptr + q0 * stride_dot + h * stride_doh
    lse_base = lse_ptr + h * total_q + q0  # this sequence's rows of this head, (Tq,)
    delta_base = delta_ptr + h * total_q + q0
    seed = fc.load_seed(seed_ptr, DROPOUT)
    dk, dv = fc.dkdv_tile(
        k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd, stride_dot, stride_dod,
        offs_n, offs_d, n_start, Tq, Tk, D, qk_scale, dropout_p, seed, bh,
        CAUSAL, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, True,  # CLAMP_ONCE
    )  # fmt: skip
    start = k0 * stride_dkt + h * stride_dkh  # dv has dk's strides (the launcher's)
    fc.store_dkdv(
        dk_ptr, dv_ptr, start, dk, dv, offs_n, offs_d, stride_dkt, stride_dkd, Tk, D, sm_scale
    )


@triton.jit
def _varlen_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, seed_ptr, cu_q_ptr, cu_k_ptr, lookup_ptr,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd, stride_dot, stride_doh, stride_dod,
    dq_ptr, stride_dqt, stride_dqh, stride_dqd,  # (total_q, H, D)
    H, total_q, num_slots, D, sm_scale, qk_scale, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    h, seq, m_start, q0, Tq, k0, Tk = _varlen_tile(lookup_ptr, num_slots, cu_q_ptr, cu_k_ptr)
    bh = seq * H + h  # Philox's head index (see the forward)
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dq = fc.dq_tile(
        q_ptr + q0 * stride_qt + h * stride_qh, dout_ptr + q0 * stride_dot + h * stride_doh,
        lse_ptr + h * total_q + q0, delta_ptr + h * total_q + q0,  # the sequence's rows, (Tq,)
        k_ptr + k0 * stride_kt + h * stride_kh, v_ptr + k0 * stride_vt + h * stride_vh,
        seed_ptr, stride_qt, stride_qd, stride_dot, stride_dod, stride_kt, stride_kd, stride_vt,
        stride_vd, offs_m, offs_d, bh, m_start, Tq, Tk, D, qk_scale, dropout_p,
        CAUSAL, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    dq_base = dq_ptr + q0 * stride_dqt + h * stride_dqh
    fc.store_tile(dq_base, dq * sm_scale, offs_m, offs_d, stride_dqt, stride_dqd, Tq, D)


@triton.jit
def _varlen_dropout_mask_kernel(
    keep_ptr,  # (H, Tq_i, Tk_i) int8 contiguous: 1 where the attention weight is kept
    seed_ptr,  # (1,) int64 Philox seed
    Tq,
    Tk,  # the sequence's lengths
    first_bh,  # i·H: the Philox head index of this sequence's head 0
    dropout_p,
    BLOCK: tl.constexpr,
):
    fc.dropout_mask_tile(keep_ptr, seed_ptr, Tq, Tk, first_bh, dropout_p, BLOCK)


# --- launchers ---------------------------------------------------------------------------


# The pinned tiles: attention's (`flash_core.ATTENTION_TILES`) but where the varlen kernels, which
# hold a few more values (the sequence's row starts and lengths), need others; the layout, and
# where each entry's reasons are: "tile tables" in kernels/flash_core.py.
VARLEN_TILES: fc.TileTable = {
    **fc.ATTENTION_TILES,
    ("sm_90", "fp32", 16): ((32, 32, 4, 2), (32, 32, 8, 2), (32, 32, 4, 2)),
    ("sm_90", "fp32", 32): ((32, 32, 4, 2), (32, 32, 8, 2), (32, 32, 4, 2)),
    ("sm_90", "fp32", 64): ((32, 32, 4, 2), (32, 32, 8, 2), (32, 32, 4, 2)),
    # fp32 at head dim 128: the forward on 1 stage (2 spilled 8 B at 64 registers, dropout
    # without the mask, Triton 3.9; 4 warps spilled over 1 KB), the dq on 4 warps (attention's
    # 8 spilled 24 B at 80 registers, causal with dropout, Triton 3.6)
    ("sm_90", "fp32", 128): ((16, 32, 8, 1), (16, 32, 8, 2), (32, 16, 4, 2)),
    ("sm_80", "16-bit", 16): ((64, 64, 8, 2), (32, 64, 8, 2), (128, 16, 8, 2)),
    # dk/dv at head dim 64 on 16 queries a tile: attention's 32 spilled 32 B at 255 registers
    # (causal, dropout, Triton 3.6; sm_86 8 B)
    ("sm_80", "16-bit", 64): ((128, 64, 8, 2), (16, 128, 8, 2), (128, 32, 8, 2)),
    # head dim 128: 128 rows of each kernel's accumulator on 8 warps, the chain's warps then
    # along its rows (see ATTENTION_TILES' sm_80 entry). The 16 x 128 dk/dv spills 8-68 B
    # (budget.json), every spill outside its loops; 16 x 64 issued each Sᵀ product 4 times.
    # Attention's 128 x 32 forward spilled 32 B (causal, Triton 3.9), its dq on 2 or 3 stages
    # 8 B (sm_86; sm_80 with 3.9): 16 keys a forward tile, the dq on 1 stage.
    ("sm_80", "16-bit", 128): ((128, 16, 8, 2), (16, 128, 8, 2), (128, 16, 8, 1)),
    ("sm_80", "fp32", 16): ((32, 32, 4, 2), (16, 32, 8, 2), (32, 32, 4, 2)),
    ("sm_80", "fp32", 32): ((32, 32, 4, 2), (16, 32, 8, 2), (32, 32, 4, 2)),
    ("sm_80", "fp32", 64): ((32, 32, 4, 2), (16, 32, 8, 2), (32, 32, 4, 2)),
    ("sm_80", "fp32", 128): ((32, 32, 8, 1), (16, 32, 8, 2), (32, 16, 4, 2)),
}
VARLEN_TILES |= {
    **fc.copy_family(VARLEN_TILES, "sm_80", "sm_86"),
    # sm_86's tiles with the 16 x 128 dk/dv (as sm_80's above), which are sm_120's
    ("sm_86", "16-bit", 64): fc.ATTENTION_TILES[("sm_120", "16-bit", 64)],
}
VARLEN_TILES |= {
    **fc.copy_family(VARLEN_TILES, "sm_90", "sm_100"),
    # attention's own sm_100 tiles at head dim 64 (sm_90's spill there); at 128 the forward
    # 64 x 32 on 4 warps (sm_90's 128 x 32 spilled 8 B at 128 registers, causal without
    # dropout, Triton 3.9; attention's 64 x 64 16 B with 3.6): 139-167 registers, 0 spills;
    # the dq 128 x 16 (sm_90's 128 x 32 spilled 8 B at 128 registers, causal dropout, 3.9;
    # attention's 64 x 64 leaves the delta kernel 64 rows, which spilled 8 B with 3.6)
    ("sm_100", "16-bit", 64): fc.ATTENTION_TILES[("sm_100", "16-bit", 64)],
    ("sm_100", "16-bit", 128): ((64, 32, 4, 2), (16, 128, 8, 2), (128, 16, 8, 2)),
}
VARLEN_TILES |= {
    **fc.copy_family(VARLEN_TILES, "sm_86", "sm_120"),
    ("sm_120", "16-bit", 64): fc.ATTENTION_TILES[("sm_120", "16-bit", 64)],
    # at head dim 128 the tiles sm_80's had before its 128-row ones, as attention's sm_120 entry
    # (its ptxas spilled attention's 128-row dk/dv and dq; varlen's were not compiled there)
    ("sm_120", "16-bit", 128): ((64, 32, 4, 2), (16, 64, 8, 2), (64, 32, 8, 2)),
}


def _varlen_block_config(dtype: torch.dtype, head_dim: int) -> dict[str, dict[str, int]]:
    """Tile sizes and launch settings per kernel ("forward", "dkdv", "dq"): the entry of
    VARLEN_TILES for the target's arch (the interpreter's small tiles under it). Not tuned."""
    return fc.block_config(VARLEN_TILES, dtype, head_dim, fc.target_arch)


@define_op("fastgpt::flash_attention_varlen_forward")
def _flash_attention_varlen_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    causal: bool, sm_scale: float, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the forward kernel: (out (total_q, H, D) in q's dtype, lse (H, total_q) fp32)."""
    total_q, heads, head_dim = q.shape
    out = _empty((total_q, heads, head_dim), q.dtype, q.device)
    lse = _empty((heads, total_q), torch.float32, q.device)
    cfg = _varlen_block_config(q.dtype, head_dim)["forward"]
    lookup = _tile_lookup(cu_seqlens_q, total_q, max_seqlen_q, cfg["BLOCK_M"])
    num_slots = lookup.shape[1]
    torch.library.wrap_triton(_varlen_forward_kernel)[(num_slots * heads,)](
        q, k, v, out, lse, seed, cu_seqlens_q, cu_seqlens_k, lookup,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, total_q, num_slots, head_dim, sm_scale * fc.LOG2E, dropout_p,
        CAUSAL=causal, DROPOUT=dropout_p > 0.0, DOT_PRECISION=fc.dot_precision(q.dtype),
        BLOCK_D=fc.padded_head_dim(head_dim), **cfg,
    )  # fmt: skip
    return out, lse


@define_op("fastgpt::flash_attention_varlen_backward")
def _flash_attention_varlen_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    causal: bool, sm_scale: float, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the three backward kernels: (dq, dk, dv) shaped and typed like q, k, v."""
    total_q, heads, head_dim = q.shape
    configs = _varlen_block_config(q.dtype, head_dim)
    delta = _empty((heads, total_q), torch.float32, q.device)
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    flags = {
        "CAUSAL": causal, "DROPOUT": dropout_p > 0.0, "DOT_PRECISION": fc.dot_precision(q.dtype),
        "BLOCK_D": fc.padded_head_dim(head_dim),
    }  # fmt: skip
    pre_block_m = configs["dq"]["BLOCK_M"]
    torch.library.wrap_triton(_varlen_delta_kernel)[(triton.cdiv(total_q, pre_block_m) * heads,)](
        out, dout, delta, *out.stride(), *dout.stride(), heads, total_q, head_dim,
        BLOCK_M=pre_block_m, BLOCK_D=flags["BLOCK_D"],
    )  # fmt: skip
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())

    def launch(kernel, cfg: dict[str, int], lookup: torch.Tensor, *outputs) -> None:
        """One gradient kernel over the tiles of `lookup`: the inputs both kernels take, then
        its `outputs` (tensors and their strides), then the scalars."""
        slots = lookup.shape[1]
        torch.library.wrap_triton(kernel)[(slots * heads,)](
            q, k, v, dout, lse, delta, seed, cu_seqlens_q, cu_seqlens_k, lookup, *strides,
            *outputs, heads, total_q, slots, head_dim, sm_scale, sm_scale * fc.LOG2E, dropout_p,
            **flags, **cfg,
        )  # fmt: skip

    cfg = configs["dkdv"]
    lookup = _tile_lookup(cu_seqlens_k, k.shape[0], max_seqlen_k, cfg["BLOCK_N"], False)
    launch(_varlen_backward_dkdv_kernel, cfg, lookup, dk, dv, *dk.stride())
    cfg = configs["dq"]
    lookup = _tile_lookup(cu_seqlens_q, total_q, max_seqlen_q, cfg["BLOCK_M"])
    launch(_varlen_backward_dq_kernel, cfg, lookup, dq, *dq.stride())
    return dq, dk, dv


# Shapes for tracing (torch.compile, fake tensors), spelled out as in attention.
@_flash_attention_varlen_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, sm_scale,
      dropout_p, seed):  # fmt: skip
    total_q, heads, head_dim = q.shape
    out = q.new_empty((total_q, heads, head_dim))
    return out, q.new_empty((heads, total_q), dtype=torch.float32)


@_flash_attention_varlen_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
      sm_scale, dropout_p, seed):  # fmt: skip
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, causal, sm_scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed)
    ctx.max_seqlens, ctx.causal = (max_q, max_k), causal
    ctx.sm_scale, ctx.dropout_p = sm_scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor | None):
    q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
    dq, dk, dv = _flash_attention_varlen_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, *ctx.max_seqlens, ctx.causal, ctx.sm_scale,
        ctx.dropout_p, seed,
    )  # fmt: skip
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "fastgpt::flash_attention_varlen_forward", _backward, setup_context=_setup_context
)


# --- public API --------------------------------------------------------------------------


def _check_varlen_offsets(q, k, v, max_seqlen_q: int, max_seqlen_k: int) -> None:
    """Offsets inside one sequence (row · stride_t + d · stride_d) are int32 in the kernels."""
    for name, t, longest in (
        ("q", q, max_seqlen_q),
        ("k", k, max_seqlen_k),
        ("v", v, max_seqlen_k),
    ):
        within = min(longest, t.shape[0]) * abs(t.stride(0)) + t.shape[2] * abs(t.stride(2))
        if within >= 2**31:
            raise ValueError(
                f"{name}: offsets inside one sequence reach {within} (max_seqlen·stride_t + "
                "D·stride_d), past the kernels' int32 range 2^31"
            )


def _check_dropout_offsets(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> None:
    """Dropout's Philox counter (r & ~8)·Tk_i + (c & ~24) is int32: Tq_i·Tk_i < 2^31 for every
    sequence."""
    lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    for i, (tq, tk) in enumerate(zip(lengths_q, lengths_k, strict=True)):
        if tq * tk >= 2**31:
            raise ValueError(
                f"dropout needs Tq·Tk < 2^31 per sequence, got Tq={tq}, Tk={tk} in sequence {i}"
            )


@bf16_in_fp32_under_interpreter
def attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    causal: bool = True, sm_scale: float | None = None, dropout_p: float = 0.0,
    seed: int | None = None, check_cu_seqlens: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Attention over packed sequences, FlashAttention-2 style, differentiable in q, k and v.

    q: (total_q, H, D), k and v: (total_k, H, D), any strides (views of a fused qkv projection
    work without copies), fp32/fp16/bf16, D one of SUPPORTED_HEAD_DIMS; cu_seqlens_q/k:
    (batch + 1,) int32 prefix sums of the sequence lengths, starting at 0, ending at total_q
    (total_k), on q's device; max_seqlen_q/k: at least the longest query (key) sequence
    -> (total_q, H, D) in q's dtype. A sequence may have no queries or no keys (its rows give 0,
    its gradients are 0). causal, sm_scale, dropout_p, seed: as in `attention`, per sequence; the
    same seed gives the same masks, which `attention_varlen_dropout_mask` reproduces.

    Raises ValueError/TypeError naming the problem: cu_seqlens not int32, not 1-D, not starting
    at 0, decreasing, not ending at the total rows, of different batch sizes; a max_seqlen below
    a real length; shapes, dtypes or devices that do not match; an unsupported head dim;
    sm_scale <= 0; dropout_p outside [0, 1) or rounding to 0 or 1. The checks of cu_seqlens'
    values read it on the host (one sync per call); under torch.compile, or with
    check_cu_seqlens=False (cu_seqlens checked once where they were built, as
    `fastgpt.segments.packed_rows` builds them valid), they are skipped and max_seqlen_q/k are
    trusted."""
    compiling = torch.compiler.is_compiling()
    check_values = check_cu_seqlens and not compiling
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, check_values)
    dropout_p = fc.kernel_dropout_p(dropout_p)  # raises for one the kernels cannot draw
    _check_varlen_offsets(q, k, v, max_seqlen_q, max_seqlen_k)
    check_gpu("attention_varlen", q, dots=True)
    scale = fc.softmax_scale(sm_scale, q.shape[2])
    args = (cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal), scale)
    empty = q.shape[0] * q.shape[1] == 0 or k.shape[0] == 0
    if empty or not use_triton(q.device):
        return attention_varlen_reference(q, k, v, *args, float(dropout_p), seed)
    seed_t = None
    if dropout_p > 0.0:
        # max_seqlen bounds every length (checked above or trusted): no sync when it suffices.
        if not compiling and int(max_seqlen_q) * int(max_seqlen_k) >= 2**31:
            _check_dropout_offsets(cu_seqlens_q, cu_seqlens_k)
        seed_t = seed_tensor(seed, q.device)
    out, _ = _flash_attention_varlen_forward(q, k, v, *args, float(dropout_p), seed_t)
    return out


def attention_varlen_dropout_mask(
    seed: int,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    heads: int,
    dropout_p: float,
) -> list[torch.Tensor]:
    """The keep-masks that `attention_varlen(..., dropout_p=dropout_p, seed=seed)` applies to
    its attention weights: one (H, Tq_i, Tk_i) bool tensor per sequence (True = kept), on
    cu_seqlens' device, for `attention_varlen_reference(..., dropout_masks=...)` with
    `kernel_dropout_p(dropout_p)`, the probability they were drawn with."""
    dropout_p = fc.kernel_dropout_p(dropout_p)
    device = cu_seqlens_q.device
    if not use_triton(device):
        raise RuntimeError(f"attention_varlen_dropout_mask needs the Triton kernel on {device}")
    _check_dropout_offsets(cu_seqlens_q, cu_seqlens_k)
    seed_t = seed_tensor(seed, device)
    masks = []
    bounds = zip(_sequence_bounds(cu_seqlens_q), _sequence_bounds(cu_seqlens_k), strict=True)
    for i, ((q0, q1), (k0, k1)) in enumerate(bounds):
        keep = torch.empty((heads, q1 - q0, k1 - k0), dtype=torch.int8, device=device)
        if keep.numel():
            block = 1024
            grid = (triton.cdiv(keep[0].numel(), block) * heads,)
            _varlen_dropout_mask_kernel[grid](
                keep, seed_t, q1 - q0, k1 - k0, i * heads, dropout_p, BLOCK=block
            )
        masks.append(keep.bool())
    return masks
