"""Variable-length flash attention (kernels/flash_attention_varlen.py) against its reference.

The reference is `attention_reference` looped over the packed sequences; it is itself checked
against SDPA with a block-diagonal mask over the whole packed axis. Every comparison uses the
tolerance rule of tests/tolerance.py, every kernel output starts as nan (the `nan_outputs`
fixture). On CPU the kernels run through Triton's interpreter: small head dims, few heads.
"""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch
from fastgpt.kernels import attention_varlen as attention_varlen_export
from fastgpt.kernels.flash_attention_varlen import (
    attention_varlen,
    attention_varlen_dropout_mask,
    attention_varlen_reference,
)
from fastgpt.kernels.flash_core import kernel_dropout_p

from tests.autograd_runs import outputs_and_grads
from tests.tolerance import assert_close_to_reference

pytestmark = pytest.mark.usefixtures("nan_outputs")  # tests/conftest.py

varlen_module = importlib.import_module("fastgpt.kernels.flash_attention_varlen")


def _cu(lengths, device):
    """(batch + 1,) int32 prefix sums of `lengths`."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _packed(lengths_q, lengths_k, heads, head_dim, dtype, device, seed=0):
    """Leaf-free q (total_q, H, D), k, v (total_k, H, D), dout like q, and the two cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(lengths_q), sum(lengths_k)
    shapes = ((tq, heads, head_dim), (tk, heads, head_dim), (tk, heads, head_dim))
    q, k, v, dout = (
        torch.randn(*shape, generator=gen).to(device, dtype) for shape in (*shapes, shapes[0])
    )
    return q, k, v, dout, _cu(lengths_q, device), _cu(lengths_k, device)


def _max_lengths(cu_q, cu_k):
    return int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())


def _check(q, k, v, dout, cu_q, cu_k, causal, dropout_p=0.0, seed=None):
    """Kernel vs PyTorch-in-q's-dtype vs the float64 reference: out, dq, dk, dv."""
    mq, mk = _max_lengths(cu_q, cu_k)
    masks = None
    if dropout_p > 0.0:
        masks = attention_varlen_dropout_mask(seed, cu_q, cu_k, q.shape[1], dropout_p)

    def kernel(q, k, v):
        return attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal, None, dropout_p, seed)

    def reference(upcast):  # scaled by the probability the masks were drawn at
        return lambda q, k, v: attention_varlen_reference(
            q, k, v, cu_q, cu_k, mq, mk, causal, None, kernel_dropout_p(dropout_p), None, masks,
            upcast,
        )  # fmt: skip

    got = outputs_and_grads(kernel, (q, k, v), dout)
    same = outputs_and_grads(reference(False), (q, k, v), dout)
    ref64 = outputs_and_grads(reference(True), (q.double(), k.double(), v.double()), dout.double())
    for name, a, b, c, backward in zip(
        ("out", "dq", "dk", "dv"), got, same, ref64, (False, True, True, True), strict=True
    ):
        assert a.dtype == q.dtype and a.shape == c.shape
        assert_close_to_reference(a, b, c, dtype=q.dtype, backward=backward, name=name)
    return got


# --- the reference -----------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_reference_is_block_diagonal_attention(causal):
    # Equal query and key lengths: the packed sequences are one SDPA call over the whole axis
    # with a block-diagonal mask (lower-triangular blocks when causal).
    lengths = [3, 1, 6, 4]
    q, k, v, _, cu, _ = _packed(lengths, lengths, 2, 8, torch.float64, "cpu")
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = seq[:, None] == seq[None, :]
    if causal:
        allowed &= torch.ones_like(allowed).tril()
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed
    ).transpose(0, 1)
    got = attention_varlen_reference(q, k, v, cu, cu, 6, 6, causal)
    torch.testing.assert_close(got, sdpa)


def test_public_export_is_the_function():
    assert attention_varlen_export is attention_varlen


# --- accuracy ----------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("lengths_q", "lengths_k"),
    [
        ([17], [17]),
        ([1, 97, 0, 17], [1, 97, 0, 17]),
        ([129, 5], [129, 5]),
        ([5, 17, 0, 40, 3], [33, 17, 9, 0, 3]),  # Tq != Tk, a sequence without keys/queries
    ],
    ids=["one", "mix", "long", "tq_ne_tk"],
)
def test_matches_reference_fp32(device, lengths_q, lengths_k, causal):
    q, k, v, dout, cu_q, cu_k = _packed(lengths_q, lengths_k, 2, 16, torch.float32, device)
    _check(q, k, v, dout, cu_q, cu_k, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_fp16(device, causal):
    lengths_q, lengths_k = [17, 1, 40, 0], [17, 30, 9, 5]
    q, k, v, dout, cu_q, cu_k = _packed(lengths_q, lengths_k, 2, 32, torch.float16, device, 1)
    _check(q, k, v, dout, cu_q, cu_k, causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_views_of_a_fused_projection(device, dtype):
    # q/k/v as (total, 3, H, D).unbind(1): row stride 3·H·D, none contiguous; dout transposed.
    lengths = [17, 33, 1]
    total, heads, head_dim = sum(lengths), 2, 16
    gen = torch.Generator().manual_seed(3)
    fused = torch.randn(total, 3, heads, head_dim, generator=gen).to(device, dtype)
    dout = torch.randn(heads, total, head_dim, generator=gen).to(device, dtype).transpose(0, 1)
    cu = _cu(lengths, device)

    def run(fn, fused_input):
        fused_input = fused_input.detach().clone().requires_grad_()
        q, k, v = fused_input.unbind(1)  # each (total, H, D)
        out = fn(q, k, v)
        out.backward(dout.to(out.dtype))
        return out.detach(), fused_input.grad

    assert not fused.unbind(1)[0].is_contiguous() and not dout.is_contiguous()
    got = run(lambda q, k, v: attention_varlen(q, k, v, cu, cu, 33, 33), fused)
    same = run(
        lambda q, k, v: attention_varlen_reference(q, k, v, cu, cu, 33, 33, upcast=False), fused
    )
    ref64 = run(lambda q, k, v: attention_varlen_reference(q, k, v, cu, cu, 33, 33), fused.double())
    assert_close_to_reference(got[0], same[0], ref64[0], dtype=dtype, name="out")
    assert_close_to_reference(got[1], same[1], ref64[1], dtype=dtype, backward=True, name="dqkv")


def test_empty_sequences_give_zero_rows_and_zero_gradients(device):
    # sequence 0 has queries but no keys, sequence 1 keys but no queries
    q, k, v, dout, cu_q, cu_k = _packed([5, 0, 3], [0, 4, 3], 1, 16, torch.float32, device)
    out, dq, dk, dv = outputs_and_grads(
        lambda q, k, v: attention_varlen(q, k, v, cu_q, cu_k, 5, 4, causal=False), (q, k, v), dout
    )
    assert torch.all(out[:5] == 0) and torch.all(dq[:5] == 0)
    assert torch.all(dk[:4] == 0) and torch.all(dv[:4] == 0)
    assert out[5:].abs().sum() > 0 and dk[4:].abs().sum() > 0


# --- properties --------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's max over nan rows
def test_sequences_never_read_each_other(device):
    # The cost bound: a tile of sequence i visits only sequence i's keys (and, backward, only
    # its queries). A nan planted in every other sequence's k/v (forward) or q/dout (dk/dv)
    # would reach sequence i through 0·nan if a tile crossed a sequence boundary. The lengths
    # put boundaries inside every kernel's tiles (16 and 32 rows).
    lengths_q, lengths_k = [20, 45, 7], [20, 50, 3]
    q, k, v, dout, cu_q, cu_k = _packed(lengths_q, lengths_k, 1, 16, torch.float32, device)

    def fn(q, k, v):
        return attention_varlen(q, k, v, cu_q, cu_k, 45, 50, causal=False)

    clean = outputs_and_grads(fn, (q, k, v), dout)
    mid_q, mid_k = slice(20, 65), slice(20, 70)  # sequence 1
    poisoned = [t.clone() for t in (q, k, v, dout)]
    for t, keep in zip(poisoned, (mid_q, mid_k, mid_k, mid_q), strict=True):
        saved = t[keep].clone()
        t.fill_(float("nan"))
        t[keep] = saved
    got = outputs_and_grads(fn, poisoned[:3], poisoned[3])
    for a, b, rows in zip(got, clean, (mid_q, mid_q, mid_k, mid_k), strict=True):
        assert torch.equal(a[rows], b[rows])


def test_launches_one_program_per_tile_and_head(device, monkeypatch):
    # The grid is H * num_slots programs with num_slots <= cdiv(total, BLOCK) + batch, not
    # batch * cdiv(max_seqlen, BLOCK); and each slot names a real tile or is idle.
    lengths = [1, 97, 3, 2, 0, 5]
    cu = _cu(lengths, device)
    lookup = varlen_module._tile_lookup(cu, sum(lengths), 97, 16)
    assert lookup.shape[1] <= math.ceil(108 / 16) + 6
    seq, start = lookup.tolist()
    tiles = sorted((s, t) for s, t in zip(seq, start, strict=True) if t >= 0)
    expected = sorted((i, b) for i, n in enumerate(lengths) for b in range(0, n, 16))
    assert tiles == expected
    # query tiles: the last (under a causal mask the heaviest) first; key tiles in order
    assert [t for s, t in zip(seq, start, strict=True) if s == 1] == list(range(96, -1, -16))
    seq, start = varlen_module._tile_lookup(cu, sum(lengths), 97, 16, False).tolist()
    assert [t for s, t in zip(seq, start, strict=True) if s == 1] == list(range(0, 97, 16))


def test_backward_is_deterministic(device):
    q, k, v, dout, cu_q, cu_k = _packed([33, 17], [33, 17], 2, 16, torch.float32, device)

    def fn(q, k, v):
        return attention_varlen(q, k, v, cu_q, cu_k, 33, 33)

    first, second = outputs_and_grads(fn, (q, k, v), dout), outputs_and_grads(fn, (q, k, v), dout)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_cpu_without_interpreter_falls_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, _, cu_q, cu_k = _packed([3, 17], [3, 17], 2, 16, torch.float32, "cpu")
    got = attention_varlen(q, k, v, cu_q, cu_k, 17, 17)
    assert torch.equal(got, attention_varlen_reference(q, k, v, cu_q, cu_k, 17, 17))


# --- dropout -----------------------------------------------------------------------------


def test_dropout_matches_reference_with_the_same_masks(device):
    q, k, v, dout, cu_q, cu_k = _packed([17, 0, 9], [17, 4, 33], 2, 16, torch.float32, device)
    _check(q, k, v, dout, cu_q, cu_k, causal=True, dropout_p=0.3, seed=2024)  # drawn at 77/256


def test_dropout_same_seed_same_output_different_seed_different(device):
    q, k, v, dout, cu_q, cu_k = _packed([17, 9], [17, 9], 1, 16, torch.float32, device)

    def fn(seed):
        return lambda q, k, v: attention_varlen(
            q, k, v, cu_q, cu_k, 17, 17, dropout_p=0.3, seed=seed
        )

    first, second = (
        outputs_and_grads(fn(5), (q, k, v), dout),
        outputs_and_grads(fn(5), (q, k, v), dout),
    )
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], fn(6)(q, k, v))


def test_dropout_without_seed_follows_torch_manual_seed(device):
    q, k, v, _, cu_q, cu_k = _packed([9, 5], [9, 5], 1, 16, torch.float32, device)

    def fn():
        return attention_varlen(q, k, v, cu_q, cu_k, 9, 9, dropout_p=0.5)

    torch.manual_seed(7)
    first = fn()
    torch.manual_seed(7)
    second, third = fn(), fn()
    assert torch.equal(first, second) and not torch.equal(first, third)


def test_dropout_masks_are_per_sequence(device):
    # Sequence i's mask depends on i, H and its own lengths only: changing sequence 0's length
    # leaves sequence 1's mask alone; heads differ; the kept fraction is about 1 - p.
    a = attention_varlen_dropout_mask(9, _cu([5, 40], device), _cu([7, 50], device), 3, 0.5)
    b = attention_varlen_dropout_mask(9, _cu([6, 40], device), _cu([2, 50], device), 3, 0.5)
    assert a[1].shape == (3, 40, 50) and a[1].dtype == torch.bool
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1][0], a[1][1])
    sigma = math.sqrt(0.25 / a[1].numel())
    assert abs(a[1].float().mean().item() - 0.5) < 5 * sigma


# --- torch.compile -----------------------------------------------------------------------


def test_torch_compile_fullgraph_traces_the_op(device):
    q, k, v, dout, cu_q, cu_k = _packed([9, 17], [9, 17], 2, 16, torch.float32, device)

    def fn(q, k, v):
        return attention_varlen(q, k, v, cu_q, cu_k, 17, 17)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(
        outputs_and_grads(compiled, (q, k, v), dout),
        outputs_and_grads(fn, (q, k, v), dout),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- bad input ---------------------------------------------------------------------------


def _call(q=None, k=None, v=None, cu_q=None, cu_k=None, mq=4, mk=4, **kwargs):
    base_q, base_k, base_v, _, base_cu_q, base_cu_k = _packed(
        [3, 4], [2, 4], 2, 16, torch.float32, "cpu"
    )
    return attention_varlen(
        base_q if q is None else q, base_k if k is None else k, base_v if v is None else v,
        base_cu_q if cu_q is None else cu_q, base_cu_k if cu_k is None else cu_k, mq, mk, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cu_q": torch.tensor([0, 3, 7])}, TypeError, "cu_seqlens_q must be int32"),
        (
            {"cu_k": torch.tensor([[0, 2, 6]], dtype=torch.int32)},
            ValueError,
            "cu_seqlens_k must be 1-D",
        ),
        ({"cu_q": torch.tensor([1, 3, 7], dtype=torch.int32)}, ValueError, "must start at 0"),
        ({"cu_q": torch.tensor([0, 8, 7], dtype=torch.int32)}, ValueError, "non-decreasing"),
        ({"cu_k": torch.tensor([0, 2, 5], dtype=torch.int32)}, ValueError, r"cu_seqlens_k\[-1\]"),
        ({"cu_k": torch.tensor([0, 6], dtype=torch.int32)}, ValueError, "same number of sequences"),
        ({"mq": 3}, ValueError, "below a real length 4"),
        ({"mk": 2}, ValueError, "max_seqlen for cu_seqlens_k"),
        ({"k": torch.randn(6, 3, 16), "v": torch.randn(6, 3, 16)}, ValueError, "agree on H and D"),
        ({"v": torch.randn(6, 2, 8)}, ValueError, "k and v must have the same shape"),
        ({"q": torch.randn(7, 16)}, ValueError, "q must be 3-D"),
        ({"q": torch.randn(7, 2, 16, dtype=torch.float64)}, TypeError, "q must be float32"),
        ({"v": torch.randn(6, 2, 16).half()}, TypeError, "share one dtype"),
        (
            {"q": torch.randn(7, 2, 12), "k": torch.randn(6, 2, 12), "v": torch.randn(6, 2, 12)},
            ValueError,
            "head dim 12",
        ),
        ({"dropout_p": 1.0}, ValueError, "dropout_p"),
        ({"dropout_p": -0.1}, ValueError, "dropout_p"),
        ({"sm_scale": 0.0}, ValueError, "sm_scale must be > 0"),
        ({"sm_scale": -0.25}, ValueError, "sm_scale must be > 0"),
        (
            {"cu_q": torch.tensor([0, 3, 7], dtype=torch.int32, device="meta")},
            ValueError,
            "one device",
        ),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_input_raises_naming_it(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)


# --- GPU only ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_gpu(head_dim, causal):
    lengths_q, lengths_k = [1, 300, 0, 129, 1000], [1, 300, 17, 200, 1000]
    q, k, v, dout, cu_q, cu_k = _packed(lengths_q, lengths_k, 4, head_dim, torch.bfloat16, "cuda")
    _check(q, k, v, dout, cu_q, cu_k, causal)
    _check(q, k, v, dout, cu_q, cu_k, causal, dropout_p=0.1, seed=3)
