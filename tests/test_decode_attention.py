"""kernels.decode_attention: the split-KV decode kernel against its float64 reference (one query
per row, per-row cache lengths, strided caches, one split and many), zero-length rows, bad input,
and the op under torch.compile.

Without a GPU the Triton kernels run through the interpreter on CPU (tests/conftest.py sets
TRITON_INTERPRET=1); bf16 only on a GPU. Comparisons use tests/tolerance.py's rule.
"""

import importlib

import pytest
import torch
from fastgpt.kernels import decode_attention, decode_attention_reference

from tests.tolerance import assert_close_to_reference

pytestmark = pytest.mark.usefixtures("nan_outputs")  # tests/conftest.py

decode_module = importlib.import_module("fastgpt.kernels.flash_decoding")

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _inputs(lengths, heads, capacity, d, dtype, device, strided=False):
    """q (B, H, D) a view of a (B, 3, H, D) projection; k/v (B, H, capacity, D), as the model's
    static cache (contiguous) or, strided, views of one (B, capacity, 2, H, D) buffer."""
    gen = torch.Generator().manual_seed(len(lengths) * 1000 + capacity + d)
    b = len(lengths)
    q = torch.randn(b, 3, heads, d, generator=gen)[:, 1].to(dtype)
    if strided:
        kv = torch.randn(b, capacity, 2, heads, d, generator=gen).to(dtype)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    else:
        k = torch.randn(b, heads, capacity, d, generator=gen).to(dtype)
        v = torch.randn(b, heads, capacity, d, generator=gen).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    return [t.to(device) for t in (q, k, v, seqlens)]


def _check(q, k, v, seqlens, num_splits=None):
    out = decode_attention(q, k, v, seqlens, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref64 = decode_attention_reference(q.double(), k.double(), v.double(), seqlens)
    same = _same_dtype_reference(q, k, v, seqlens)
    assert_close_to_reference(out, same, ref64, dtype=q.dtype)


def _same_dtype_reference(q, k, v, seqlens):
    """The reference's math in the inputs' own dtype (the tolerance rule's "PyTorch in the same
    dtype")."""
    scores = torch.einsum("bhd,bhcd->bhc", q, k) * q.shape[-1] ** -0.5
    j = torch.arange(k.shape[2], device=q.device)
    hidden = j[None, :] >= seqlens.long()[:, None]
    weights = torch.softmax(scores.masked_fill(hidden[:, None], float("-inf")), dim=-1)
    return torch.einsum("bhc,bhcd->bhd", weights.nan_to_num(0.0), v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lengths, capacity, num_splits",
    [
        ([1], 1, None),  # one key, one split
        ([17, 1], 17, None),
        ([97, 40, 3], 97, 1),  # one split covering the whole cache
        ([97, 40, 3], 97, 3),  # many splits, some past a short row's end (empty)
        ([1023, 500], 1024, None),  # the default plan: 4 splits of 256
    ],
)
def test_matches_reference(lengths, capacity, num_splits, dtype, device):
    q, k, v, seqlens = _inputs(lengths, 2, capacity, 8, dtype, device)
    _check(q, k, v, seqlens, num_splits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_cache_and_odd_head_dim(dtype, device):
    q, k, v, seqlens = _inputs([33, 7], 3, 50, 24, dtype, device, strided=True)
    assert not k.is_contiguous()
    _check(q, k, v, seqlens, num_splits=2)


def test_zero_length_row_gives_zeros(device):
    q, k, v, seqlens = _inputs([0, 5], 2, 19, 8, torch.float32, device)
    out = decode_attention(q, k, v, seqlens, num_splits=2)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    _check(q, k, v, seqlens, num_splits=2)


def test_stale_keys_past_the_length_are_not_read(device):
    q, k, v, seqlens = _inputs([5, 9], 2, 40, 8, torch.float32, device)
    before = decode_attention(q, k, v, seqlens, num_splits=3)
    k[:, :, 9:] = float("nan")
    v[:, :, 9:] = float("inf")
    torch.testing.assert_close(decode_attention(q, k, v, seqlens, num_splits=3), before)


def test_bad_inputs():
    q, k, v, seqlens = _inputs([3, 2], 2, 8, 8, torch.float32, "cpu")
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        decode_attention(q, k, v, seqlens.long())
    with pytest.raises(TypeError, match="share a dtype"):
        decode_attention(q.half(), k, v, seqlens)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        decode_attention(q.int(), k, v, seqlens)
    with pytest.raises(ValueError, match=r"q must be \(B, H, D\)"):
        decode_attention(q[:, :, None], k, v, seqlens)
    with pytest.raises(ValueError, match="k_cache and v_cache"):
        decode_attention(q, k[:, :1], v[:, :1], seqlens)
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \(B,\)"):
        decode_attention(q, k, v, seqlens[:1])
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q, k, v, seqlens, num_splits=0)


def test_split_plan_covers_the_cache():
    for capacity in (1, 17, 97, 1024, 4096):
        for requested in (None, 1, 3, 1000):
            splits, chunk, block_n = decode_module.split_plan(capacity, requested)
            assert chunk % block_n == 0 and splits * chunk >= capacity > (splits - 1) * chunk


def test_torch_compile_traces_the_op(device):
    q, k, v, seqlens = _inputs([9, 4], 2, 16, 8, torch.float32, device)
    compiled = torch.compile(decode_attention, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, seqlens), decode_attention(q, k, v, seqlens))
