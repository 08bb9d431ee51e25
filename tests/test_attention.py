"""Flash attention (kernels/flash_attention.py): forward and every gradient against the reference.

Every numerical comparison uses the tolerance rule of tests/tolerance.py: the kernel's error
against a float64 reference may be at most 2x (outputs) or 3x (gradients) PyTorch's own error in
the same dtype, plus a few ulps. Every kernel output starts as nan (the `nan_outputs` fixture),
so an unwritten element fails. On CPU the kernels run through Triton's interpreter, so the
shapes here are tiny; long sequences, bf16 and the large-index cases run on a GPU only.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re

import numpy as np
import pytest
import torch
from fastgpt.kernels.flash_attention import (
    SUPPORTED_HEAD_DIMS,
    attention,
    attention_dropout_mask,
    attention_reference,
)
from fastgpt.kernels.flash_core import kernel_dropout_p
from triton.tools.tensor_descriptor import TensorDescriptor

from fastgpt.backends import BACKENDS
from fastgpt.model import MultiHeadAttention
from tests.autograd_runs import outputs_and_grads
from tests.tolerance import assert_close_to_reference

pytestmark = pytest.mark.usefixtures("nan_outputs")  # tests/conftest.py

attention_module = importlib.import_module("fastgpt.kernels.flash_attention")


class LaunchRecorder:
    """Stands in for torch.library.wrap_triton: records each launch (kernel name, grid, args)
    and runs it only while `run` is True."""

    def __init__(self, wrap_triton):
        self.calls: list[tuple[str, tuple, tuple]] = []
        self.run = True
        self._wrap_triton = wrap_triton

    def __call__(self, kernel):
        recorder = self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.calls.append((kernel.__name__, tuple(grid), args))
                    if recorder.run:
                        recorder._wrap_triton(kernel)[grid](*args, **kwargs)

                return launch

        return Launcher()


@pytest.fixture
def launches(monkeypatch):
    """The attention launchers' kernel launches, recorded (they all go through wrap_triton)."""
    recorder = LaunchRecorder(torch.library.wrap_triton)
    monkeypatch.setattr(torch.library, "wrap_triton", recorder)
    return recorder


def _inputs(batch, heads, tq, tk, head_dim, dtype, device, seed=0):
    """Leaf q (B, H, Tq, D), k and v (B, H, Tk, D) and an upstream gradient like the output."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = ((tq, head_dim), (tk, head_dim), (tk, head_dim), (tq, head_dim))
    return [
        torch.randn(batch, heads, *shape, generator=gen, device=device).to(dtype)
        for shape in shapes
    ]


def _check_against_reference(
    q, k, v, dout, causal, sm_scale=None, dropout_p=0.0, seed=None, names=("out", "dq", "dk", "dv"),
    heads=(),
):  # fmt: skip
    """Kernel vs PyTorch-in-q's-dtype vs the float64 reference: out, dq, dk, dv (those in names).
    heads: an index into (B, H) choosing the heads compared (all by default); the kernel always
    runs on every head, the references only on those. Returns the kernel's (out, dq, dk, dv)."""
    mask = None
    if dropout_p > 0.0:
        b, h, tq, tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        mask = attention_dropout_mask(seed, b, h, tq, tk, dropout_p, q.device)[heads]
    kernel = outputs_and_grads(
        lambda q, k, v: attention(q, k, v, causal, sm_scale, dropout_p, seed), (q, k, v), dout
    )
    dropout_p = kernel_dropout_p(dropout_p)  # the references scale by what the mask was drawn at
    q, k, v, dout = (t[heads] for t in (q, k, v, dout))
    same_dtype = outputs_and_grads(
        lambda q, k, v: attention_reference(
            q, k, v, causal, sm_scale, dropout_p, mask, upcast=False
        ),
        (q, k, v), dout,
    )  # fmt: skip
    ref64 = outputs_and_grads(
        lambda q, k, v: attention_reference(q, k, v, causal, sm_scale, dropout_p, mask),
        (q.double(), k.double(), v.double()), dout.double(),
    )  # fmt: skip
    for name, got, same, ref, backward in zip(
        ("out", "dq", "dk", "dv"), kernel, same_dtype, ref64, (False, True, True, True), strict=True
    ):
        got = got[heads]
        assert got.dtype == q.dtype and got.shape == ref.shape
        if name not in names:
            continue
        assert_close_to_reference(got, same, ref, dtype=q.dtype, backward=backward, name=name)
    return kernel


# --- accuracy ----------------------------------------------------------------------------


def test_reference_is_the_books_causal_attention():
    # The tolerance rule measures PyTorch's own error against the reference, so the reference
    # itself must be right: here against the book's formulation in float64.
    q, k, v, _ = _inputs(2, 3, 17, 17, 16, torch.float64, "cpu")
    hidden = torch.triu(torch.ones(17, 17, dtype=torch.bool), diagonal=1)  # above the diagonal
    scores = (q @ k.transpose(-2, -1)).masked_fill(hidden, -torch.inf)
    book = torch.softmax(scores / 16**0.5, dim=-1) @ v
    torch.testing.assert_close(attention_reference(q, k, v), book)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention_reference(q, k, v, causal=False), full)
    # Tq < Tk, bottom-right: 5 new queries against a KV cache of 17 are the last 5 rows.
    torch.testing.assert_close(attention_reference(q[:, :, -5:], k, v), book[:, :, -5:])
    # Tq > Tk: query i sees keys j <= i - 12; the first 12 rows see none and give 0.
    k5, v5 = k[:, :, :5], v[:, :, :5]
    out = attention_reference(q, k5, v5)
    torch.testing.assert_close(out[:, :, 12:], attention_reference(q[:, :, 12:], k5, v5))
    assert torch.all(out[:, :, :12] == 0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq_len", [1, 17, 33, 97])
def test_matches_reference_square(device, seq_len, causal):
    q, k, v, dout = _inputs(1, 2, seq_len, seq_len, 16, torch.float32, device)
    if seq_len > 1:
        _check_against_reference(q, k, v, dout, causal)
        return
    _, dq, dk, _ = _check_against_reference(q, k, v, dout, causal, names=("out", "dv"))
    # One key per query: the softmax is exactly 1 and the true dq and dk are exactly 0, which
    # PyTorch reproduces exactly, so the rule's bound shrinks to its floor. The kernel
    # (FlashAttention-2) forms dS = dP - delta with dP = dout·v (a dot) and delta = Σ dout∘out (a
    # row sum): equal numbers rounded in different orders. So dq = sm_scale·dS·k and
    # dk = sm_scale·dSᵀ·q are that cancellation's noise: a few ulps of |dout·v|, times
    # sm_scale·|k| (resp. |q|).
    eps = torch.finfo(torch.float32).eps
    cancelling = (dout * v).abs().sum(-1).max() * 0.25  # sm_scale = 1/sqrt(16)
    assert dq.abs().max() <= 8 * eps * cancelling * k.abs().max()
    assert dk.abs().max() <= 8 * eps * cancelling * q.abs().max()


@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
def test_head_dims_fp32(device, head_dim):
    q, k, v, dout = _inputs(1, 1, 33, 33, head_dim, torch.float32, device, seed=head_dim)
    _check_against_reference(q, k, v, dout, causal=True)


@pytest.mark.parametrize(
    ("head_dim", "tq", "tk", "causal"),
    [
        (64, 33, 33, True),
        (48, 17, 17, False),
        (16, 40, 40, True),
        (16, 1, 129, True),
        (16, 64, 17, True),
    ],
)
def test_fp16(device, head_dim, tq, tk, causal):
    q, k, v, dout = _inputs(2, 1, tq, tk, head_dim, torch.float16, device)
    _check_against_reference(q, k, v, dout, causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("tq", "tk"), [(1, 129), (17, 64), (64, 17)])
def test_different_query_and_key_lengths(device, tq, tk, causal):
    q, k, v, dout = _inputs(1, 1, tq, tk, 16, torch.float32, device)
    _check_against_reference(q, k, v, dout, causal)


def test_one_query_over_1025_keys(device):
    # A decoding step against a KV cache of 1025 keys: 1025 is no multiple of any tile size.
    q, k, v, dout = _inputs(1, 1, 1, 1025, 16, torch.float32, device)
    _check_against_reference(q, k, v, dout, causal=True)


def test_rows_that_see_no_key_give_zero_output_and_zero_grads(device):
    # Tq > Tk, causal, bottom-right aligned: query i sees keys j <= i - (64 - 17), so the first
    # 47 queries see nothing.
    tq, tk = 64, 17
    q, k, v, dout = _inputs(1, 2, tq, tk, 16, torch.float32, device)
    out, dq, dk, dv = _check_against_reference(q, k, v, dout, causal=True)
    blind = tq - tk
    assert torch.all(out[:, :, :blind] == 0)
    assert torch.all(dq[:, :, :blind] == 0)
    for grad in (out, dq, dk, dv):
        assert torch.isfinite(grad).all()
    assert out[:, :, blind:].abs().sum() > 0  # the other rows do attend


@pytest.mark.parametrize(("batch", "heads"), [(1, 9), (3, 3)])
def test_odd_batch_and_head_counts(device, batch, heads):
    q, k, v, dout = _inputs(batch, heads, 17, 17, 16, torch.float32, device)
    _check_against_reference(q, k, v, dout, causal=True)


def test_custom_scale(device):
    q, k, v, dout = _inputs(1, 1, 17, 17, 32, torch.float32, device)
    _check_against_reference(q, k, v, dout, causal=True, sm_scale=0.3)


def test_signature_and_default_scale(device):
    parameters = inspect.signature(attention).parameters
    assert [(p.name, p.default) for p in parameters.values()][3:] == [
        ("causal", True),
        ("sm_scale", None),
        ("dropout_p", 0.0),
        ("seed", None),
    ]
    assert list(parameters)[:3] == ["q", "k", "v"]
    q, k, v, _ = _inputs(1, 1, 17, 17, 48, torch.float32, device)
    default = attention(q, k, v)
    assert torch.equal(default, attention(q, k, v, sm_scale=1 / math.sqrt(48)))
    assert not torch.equal(default, attention(q, k, v, sm_scale=1 / math.sqrt(64)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_views_of_a_fused_qkv_projection(device, dtype):
    # q/k/v as the model's MultiHeadAttention makes them: (B, T, 3, H, D).permute(2, 0, 3, 1, 4),
    # neither contiguous nor with unit head stride; gradients flow back to the fused tensor.
    batch, seq_len, heads, head_dim = 2, 33, 3, 16
    gen = torch.Generator().manual_seed(1)
    fused = torch.randn(batch, seq_len, 3, heads, head_dim, generator=gen).to(device, dtype)
    dout = torch.randn(batch, heads, seq_len, head_dim, generator=gen).to(device, dtype)

    def run(fn, fused_input):
        fused_input = fused_input.detach().clone().requires_grad_()
        q, k, v = fused_input.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
        out = fn(q, k, v)
        out.backward(dout.to(out.dtype))
        return out.detach(), fused_input.grad

    q_view = fused.permute(2, 0, 3, 1, 4)[0]
    assert not q_view.is_contiguous()
    kernel = run(attention, fused)
    same = run(lambda q, k, v: attention_reference(q, k, v, upcast=False), fused)
    ref64 = run(attention_reference, fused.double())
    assert_close_to_reference(kernel[0], same[0], ref64[0], dtype=dtype, name="out")
    assert_close_to_reference(
        kernel[1], same[1], ref64[1], dtype=dtype, backward=True, name="d(qkv)"
    )


def test_strided_views_reach_the_kernels_without_copies(device, launches):
    # The model's q, k, v are views of one (B, T, 3·d_out) projection: the kernels must receive
    # those views (one storage, q/k/v d_out elements apart, row stride 3·d_out).
    module = MultiHeadAttention(24, 48, num_heads=3, ops=BACKENDS["triton"]).to(device)
    module(torch.randn(2, 17, 24, device=device)).sum().backward()
    kernels = [name for name, _, _ in launches.calls]
    assert kernels[0] == "_attention_forward_kernel" and len(kernels) == 4  # + 3 backward
    for name, _, args in launches.calls:
        if name == "_attention_backward_preprocess_kernel":
            continue
        # the TMA forward (sm_90) gets descriptors over the same views
        q, k, v = (a.base if isinstance(a, TensorDescriptor) else a for a in args[:3])
        assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr(), name
        assert k.data_ptr() - q.data_ptr() == v.data_ptr() - k.data_ptr() == 48 * 4, name
        assert q.shape == (2, 3, 17, 16) and q.stride() == (17 * 144, 16, 144, 1), name


def _force_tma_forward(monkeypatch):
    """Make the forward launch its TMA config (the pinned tiles plus "TMA": 1) whatever the
    autotuner would pick; the backward keeps its own choice."""
    tuned = attention_module._tuned_config

    def forced(kernel, q, tk, causal, dropout, launch, tma=False):
        if kernel != "forward":
            return tuned(kernel, q, tk, causal, dropout, launch, tma)
        return {**attention_module._block_config(q.dtype, q.shape[-1])["forward"], "TMA": 1}

    monkeypatch.setattr(attention_module, "_tuned_config", forced)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq_len", [1, 17, 97])
def test_tma_forward_matches_reference(device, launches, monkeypatch, seq_len, causal):
    # The sm_90 TMA candidate, forced through the launcher: q/k/v as strided views of one fused
    # (B, T, 3, H, D) projection (TMA-legal: 16-byte aligned, row stride 3·H·D·2 = 576 B), a
    # head dim below its padded BLOCK_D (48 of 64: columns past D come in as zeros and are not
    # stored), odd lengths (rows past T likewise). The backward (pointer kernels) runs on the
    # TMA forward's out and lse, so the gradients check its lse too.
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90 or later")
    _force_tma_forward(monkeypatch)
    batch, heads, head_dim = 1, 2, 48
    gen = torch.Generator().manual_seed(seq_len)
    fused = torch.randn(batch, seq_len, 3, heads, head_dim, generator=gen)
    fused = fused.to(device, torch.float16)
    dout = torch.randn(batch, heads, seq_len, head_dim, generator=gen).to(device, torch.float16)

    def run(fn, fused_input):
        fused_input = fused_input.detach().clone().requires_grad_()
        q, k, v = fused_input.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D), strided
        out = fn(q, k, v)
        out.backward(dout.to(out.dtype))
        return out.detach(), fused_input.grad

    kernel = run(lambda q, k, v: attention(q, k, v, causal), fused)
    name, _, args = launches.calls[0]
    assert name == "_attention_forward_kernel"
    assert all(isinstance(a, TensorDescriptor) for a in args[:4])  # q, k, v, out
    assert tuple(args[0].strides) == (
        seq_len * 3 * heads * head_dim,
        head_dim,
        3 * heads * head_dim,
        1,
    )
    same = run(lambda q, k, v: attention_reference(q, k, v, causal, upcast=False), fused)
    ref64 = run(lambda q, k, v: attention_reference(q, k, v, causal), fused.double())
    dtype = torch.float16
    assert_close_to_reference(kernel[0], same[0], ref64[0], dtype=dtype, name="out")
    assert_close_to_reference(
        kernel[1], same[1], ref64[1], dtype=dtype, backward=True, name="d(qkv)"
    )


def test_tma_is_offered_only_for_legal_tensors(device, monkeypatch):
    # `_tma_legal`: unit last stride, 16-byte aligned base, other strides multiples of 16 B.
    legal = attention_module._tma_legal
    fused = torch.zeros(2, 17, 3, 2, 16, dtype=torch.float16, device=device)
    q, k, v = fused.permute(2, 0, 3, 1, 4).unbind(0)  # the model's views: legal
    assert legal(q, k, v, torch.zeros_like(q))
    assert not legal(q, k, v.transpose(-1, -2))  # last stride 96
    assert not legal(q, k, fused[..., 1:].permute(2, 0, 3, 1, 4)[2])  # base 2 B past alignment
    odd_rows = torch.zeros(1, 1, 5, 12, dtype=torch.float16, device=device)[..., :8]
    assert not legal(q, odd_rows)  # row stride 24 B
    assert not legal(torch.zeros(1, 1, 0, 16, dtype=torch.float16, device=device))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # tracing: no address to check, the pointer kernel is traced
        assert not legal(torch.zeros(1, 1, 4, 16, dtype=torch.float16))
    # The launcher asks the candidates for TMA only where its tensors are legal.
    seen = []
    tuned = attention_module._tuned_config

    def recording(kernel, q, tk, causal, dropout, launch, tma=False):
        seen.append((kernel, tma))
        return tuned(kernel, q, tk, causal, dropout, launch, tma)

    monkeypatch.setattr(attention_module, "_tuned_config", recording)
    attention(q, k, v)
    bad_k = torch.zeros(2, 2, 16, 17, dtype=torch.float16, device=device).transpose(-1, -2)
    attention(q, bad_k, v)
    if device == "cpu" and not attention_module.use_triton(torch.device("cpu")):
        assert seen == []  # the PyTorch fallback launches nothing
    else:
        assert seen == [("forward", True), ("forward", False)]


def test_transposed_upstream_gradient(device):
    # dout with arbitrary strides (as after ctx.transpose(1, 2) in a model) must be honoured.
    q, k, v, dout = _inputs(1, 2, 17, 17, 16, torch.float32, device)
    dout_t = dout.transpose(1, 2).contiguous().transpose(1, 2)
    assert not dout_t.is_contiguous()
    _check_against_reference(q, k, v, dout_t, causal=True)


# --- properties --------------------------------------------------------------------------


@pytest.mark.parametrize(("tq", "tk"), [(33, 33), (17, 40)])
def test_causality_later_keys_do_not_change_earlier_outputs(device, tq, tk):
    q, k, v, _ = _inputs(1, 2, tq, tk, 16, torch.float32, device)
    t = 9  # outputs of queries 0..t may only read keys j <= i + (tk - tq)
    last_visible_key = t + (tk - tq)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, last_visible_key + 1 :] = torch.randn_like(k2[:, :, last_visible_key + 1 :]) * 5
    v2[:, :, last_visible_key + 1 :] = torch.randn_like(v2[:, :, last_visible_key + 1 :]) * 5
    out = attention(q, k, v, causal=True)
    out2 = attention(q, k2, v2, causal=True)
    assert torch.equal(out[:, :, : t + 1], out2[:, :, : t + 1])
    assert not torch.equal(out[:, :, t + 1 :], out2[:, :, t + 1 :])  # later rows do see them


@pytest.mark.parametrize(
    ("op", "table"),
    [("flash_attention", "ATTENTION_TILES"), ("flash_attention_varlen", "VARLEN_TILES")],
)
def test_tile_tables_cover_every_arch_dtype_and_head_dim(monkeypatch, op, table):
    # A GPU reads its tiles from the op's table by (arch family, precision, BLOCK_D); the CPU
    # tests run the interpreter's tiles, so a head dim missing from a table would show only on a
    # GPU. Here the GPU path of the lookup is asked for every supported case.
    core = importlib.import_module("fastgpt.kernels.flash_core")
    tiles = getattr(importlib.import_module(f"fastgpt.kernels.{op}"), table)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for arch in (80, 86, 89, 90, 100):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for head_dim in SUPPORTED_HEAD_DIMS:
                configs = core.block_config(tiles, dtype, head_dim, lambda arch=arch: arch)
                assert list(configs) == ["forward", "dkdv", "dq"]
                for cfg in configs.values():
                    assert set(cfg) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
                    for name in ("BLOCK_M", "BLOCK_N", "num_warps"):  # powers of two
                        assert cfg[name] & (cfg[name] - 1) == 0, (arch, dtype, head_dim, cfg)
                    assert cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N"] >= 16  # tl.dot's least
                    assert cfg["num_stages"] >= 1
    # no entry that no supported case reads
    used = {core.padded_head_dim(d) for d in SUPPORTED_HEAD_DIMS}
    assert {block_d for _, _, block_d in tiles} == used


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's max over nan rows
@pytest.mark.parametrize("key_offset", [0, 1], ids=["square", "more_keys"])
def test_tiles_above_the_diagonal_are_never_read(device, key_offset):
    # Causal kernels skip (not merely mask) the tiles wholly above the diagonal. Query rows
    # [0, edge) see keys [0, key_edge) only; `edge` is a tile boundary of every kernel. A nan
    # planted in the keys/values past key_edge (or in the queries/upstream gradient of rows
    # before edge) would reach the other side through 0·nan if a skipped tile were loaded.
    configs = attention_module._block_config(torch.float32, 16)
    edge = max(cfg[block] for cfg in configs.values() for block in ("BLOCK_M", "BLOCK_N"))
    tq, tk = 2 * edge, (2 + key_offset) * edge
    key_edge = edge + (tk - tq)
    q, k, v, dout = _inputs(1, 1, tq, tk, 16, torch.float32, device)
    clean = outputs_and_grads(attention, (q, k, v), dout)

    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, key_edge:] = float("nan")
    v_nan[:, :, key_edge:] = float("nan")
    out, dq, _, _ = outputs_and_grads(attention, (q, k_nan, v_nan), dout)
    assert torch.equal(out[:, :, :edge], clean[0][:, :, :edge])
    assert torch.equal(dq[:, :, :edge], clean[1][:, :, :edge])
    assert attention(q, k_nan, v_nan, causal=False)[:, :, :edge].isnan().all()  # it would show

    q_nan, dout_nan = q.clone(), dout.clone()
    q_nan[:, :, :edge] = float("nan")
    dout_nan[:, :, :edge] = float("nan")
    out, dq, dk, dv = outputs_and_grads(attention, (q_nan, k, v), dout_nan)
    assert torch.equal(out[:, :, edge:], clean[0][:, :, edge:])
    assert torch.equal(dq[:, :, edge:], clean[1][:, :, edge:])
    assert torch.equal(dk[:, :, key_edge:], clean[2][:, :, key_edge:])
    assert torch.equal(dv[:, :, key_edge:], clean[3][:, :, key_edge:])


def test_backward_is_deterministic(device):
    q, k, v, dout = _inputs(2, 3, 33, 33, 16, torch.float32, device)
    first = outputs_and_grads(attention, (q, k, v), dout)
    second = outputs_and_grads(attention, (q, k, v), dout)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_empty_key_sequence_gives_zeros(device):
    q, k, v, _ = _inputs(1, 2, 5, 0, 16, torch.float32, device)
    out = attention(q, k, v, causal=False)
    assert out.shape == q.shape and torch.all(out == 0)


def test_cpu_without_interpreter_falls_back(monkeypatch):
    # TRITON_INTERPRET unset: CPU tensors take the PyTorch path
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, _ = _inputs(1, 2, 17, 17, 16, torch.float32, "cpu")
    assert torch.equal(attention(q, k, v), attention_reference(q, k, v, sm_scale=0.25))


# --- dropout -----------------------------------------------------------------------------


def test_dropout_same_seed_same_output_and_grads(device):
    q, k, v, dout = _inputs(1, 2, 17, 17, 16, torch.float32, device)

    def fn(q, k, v):
        return attention(q, k, v, dropout_p=0.3, seed=123)

    first = outputs_and_grads(fn, (q, k, v), dout)
    second = outputs_and_grads(fn, (q, k, v), dout)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    other_seed = attention(q, k, v, dropout_p=0.3, seed=124)
    assert not torch.equal(first[0], other_seed)
    no_dropout = attention(q, k, v)
    assert not torch.equal(first[0], no_dropout)


def test_dropout_without_seed_follows_torch_manual_seed(device):
    q, k, v, _ = _inputs(1, 1, 17, 17, 16, torch.float32, device)
    torch.manual_seed(7)
    first = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(7)
    second = attention(q, k, v, dropout_p=0.5)
    third = attention(q, k, v, dropout_p=0.5)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_kept_fraction(device, dropout_p):
    keep = attention_dropout_mask(3, 3, 5, 40, 50, dropout_p, device)  # 30,000 draws
    assert keep.shape == (3, 5, 40, 50) and keep.dtype == torch.bool
    n, drawn = keep.numel(), kernel_dropout_p(dropout_p)
    sigma = math.sqrt(drawn * (1 - drawn) / n)
    assert abs(keep.float().mean().item() - (1 - drawn)) < 5 * sigma
    # Rows and heads get different draws, and the same seed gives the same mask.
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert torch.equal(keep, attention_dropout_mask(3, 3, 5, 40, 50, dropout_p, device))


def test_kernel_dropout_p_is_the_nearest_byte_threshold():
    assert kernel_dropout_p(0.0) == 0.0
    assert kernel_dropout_p(0.1) == 26 / 256 and kernel_dropout_p(0.25) == 0.25
    assert kernel_dropout_p(1 / 512) == 1 / 256 and kernel_dropout_p(0.998) == 255 / 256
    for p in (0.001, 0.999):
        with pytest.raises(
            ValueError, match=rf"dropout_p={p} rounds to \d+/256.* \[1/512, 511/512\)"
        ):
            kernel_dropout_p(p)


PHILOX_ROUNDS = 7  # the documented draw's rounds (flash_core.PHILOX_ROUNDS says why)


def _philox_2x32(c0, c1, key, rounds: int = PHILOX_ROUNDS):
    """Philox-2x32 (Salmon et al., SC'11) as written in the paper, on Python ints or numpy
    uint64 arrays holding uint32 values (a 32x32-bit product fits 64 bits)."""
    for _ in range(rounds):
        product = c0 * 0xD256D193
        c0, c1 = ((product >> 32) ^ key ^ c1) & 0xFFFFFFFF, product & 0xFFFFFFFF
        key = (key + 0x9E3779B9) & 0xFFFFFFFF
    return c0, c1


def _documented_keep(seed, bh, i, j, tk, dropout_p, rounds: int = PHILOX_ROUNDS):
    """flash_core.dropout_keep's definition: group {i, i+8} x {j, j+8, j+16, j+24} (bit 3 of i,
    bits 3 and 4 of j cleared) draws Philox-2x32 at counter (i·Tk + j, b·H + h) under the seed's
    low word; member (bit 4 of j, bit 3 of i, bit 3 of j) = (c, a, b) keeps iff byte 2a + b of
    word c is >= round(p·256). Python ints, or numpy arrays of i and j (uint64) broadcast."""
    words = _philox_2x32((i - (i & 8)) * tk + j - (j & 24), bh, seed & 0xFFFFFFFF, rounds)
    word = (words[1] - words[0]) * ((j >> 4) & 1) + words[0]  # word 1 where bit 4 of j is set
    byte = 2 * ((i >> 3) & 1) + ((j >> 3) & 1)
    return ((word >> (8 * byte)) & 0xFF) >= round(dropout_p * 256)


def test_dropout_mask_is_its_documented_philox_draw(device):
    """The mask, recomputed weight by weight from flash_core.dropout_keep's definition
    (`_documented_keep`)."""
    # The Python Philox first, against Random123's published known-answer vectors
    # (tests/kat_vectors: philox2x32 at 7 and at 10 rounds).
    assert _philox_2x32(0, 0, 0, 7) == (0x257A3673, 0xCD26BE2A)
    assert _philox_2x32(2**32 - 1, 2**32 - 1, 2**32 - 1, 7) == (0xAB302C4D, 0x3DC9D239)
    assert _philox_2x32(0x243F6A88, 0x85A308D3, 0x13198A2E, 7) == (0xBEDBBE6B, 0xE4C770B3)
    assert _philox_2x32(0, 0, 0, 10) == (0xFF1DAE59, 0x6CD10DF2)
    assert _philox_2x32(2**32 - 1, 2**32 - 1, 2**32 - 1, 10) == (0x2C3F628B, 0xAB4FD7AD)
    assert _philox_2x32(0x243F6A88, 0x85A308D3, 0x13198A2E, 10) == (0xDD7CE038, 0xF62A4C12)
    seed, batch, heads, tq, tk, p = 2**33 + 12345, 2, 3, 19, 27, 0.3
    keep = attention_dropout_mask(seed, batch, heads, tq, tk, p, device).cpu()
    expected = torch.empty_like(keep)
    for bh in range(batch * heads):
        for i in range(tq):
            for j in range(tk):
                expected[bh // heads, bh % heads, i, j] = _documented_keep(seed, bh, i, j, tk, p)
    assert torch.equal(keep, expected)


def _dropout_draw_z_scores(rounds: int) -> dict[str, float]:
    """Statistics of the documented draw at `rounds` Philox rounds, each as a z-score (about
    N(0, 1) for an ideal generator): the avalanche of every input bit (counter, head, key) into
    every output bit of Philox-2x32 (the largest deviation from 1/2 among 96 x 64 pairs), and,
    over four heads' 1024 x 1024 masks at p = 1/2, the keep rate, the correlation of a weight
    with its neighbours at row and column lags 1-32 (8, 16, 24: its group partners), with the next
    head's weight, and the chi-square of the 256 patterns a group's eight weights take."""
    rng = np.random.default_rng(0)
    n = 1 << 14
    inputs = [rng.integers(0, 2**32, n, dtype=np.uint64) for _ in range(3)]
    out = _philox_2x32(*inputs, rounds)
    flips = []
    for word in range(3):
        for bit in range(32):
            flipped = [x ^ np.uint64(1 << bit) if w == word else x for w, x in enumerate(inputs)]
            changed = [a ^ b for a, b in zip(out, _philox_2x32(*flipped, rounds), strict=True)]
            for c in changed:
                flips.append(((c[:, None] >> np.arange(32, dtype=np.uint64)) & 1).mean(0))
    z = {"avalanche": float(np.abs(np.concatenate(flips) - 0.5).max() / (0.5 / math.sqrt(n)))}

    t = 1024
    i, j = np.arange(t, dtype=np.uint64)[:, None], np.arange(t, dtype=np.uint64)[None, :]
    masks = [_documented_keep(2024, bh, i, j, t, 0.5, rounds) - 0.5 for bh in range(4)]
    for bh, x in enumerate(masks):
        z[f"head {bh} keep rate"] = x.mean() / (0.5 / math.sqrt(x.size))
        for lag in (1, 2, 7, 8, 9, 16, 24, 32):
            for name, pair in (("row", (x[:, :-lag], x[:, lag:])), ("column", (x[:-lag], x[lag:]))):
                z[f"head {bh} {name} lag {lag}"] = (pair[0] * pair[1]).mean() / (
                    0.25 / math.sqrt(pair[0].size)
                )
        if bh + 1 < len(masks):
            z[f"heads {bh}, {bh + 1}"] = (x * masks[bh + 1]).mean() / (0.25 / math.sqrt(x.size))
        first_row = np.arange(t)[np.arange(t) & 8 == 0]  # a group's first row and column
        first_col = np.arange(t)[np.arange(t) & 24 == 0]
        members = [
            x[np.ix_(first_row + a, first_col + b)] > 0 for a in (0, 8) for b in (0, 8, 16, 24)
        ]
        pattern = sum(m.astype(np.int64) << k for k, m in enumerate(members)).ravel()
        counts, expected = np.bincount(pattern, minlength=256), pattern.size / 256
        chi2 = ((counts - expected) ** 2 / expected).sum()
        z[f"head {bh} group patterns"] = (chi2 - 255) / math.sqrt(2 * 255)
    return z


def test_dropout_draws_pass_the_statistical_checks():
    """The kernels' draw (test above: the mask is exactly `_documented_keep`) at its rounds
    shows no structure: every statistic within 5 standard deviations. The same checks catch
    Philox cut to 4 rounds, so they can fail."""
    z = _dropout_draw_z_scores(PHILOX_ROUNDS)
    assert max(abs(v) for v in z.values()) < 5.0, z
    too_few = _dropout_draw_z_scores(4)
    assert too_few["avalanche"] > 10 and abs(too_few["heads 0, 1"]) > 5, too_few


@pytest.mark.parametrize(("tq", "tk", "causal"), [(17, 17, True), (17, 33, True), (33, 17, False)])
def test_dropout_matches_reference_with_the_same_mask(device, tq, tk, causal):
    q, k, v, dout = _inputs(2, 3, tq, tk, 16, torch.float32, device)
    _check_against_reference(q, k, v, dout, causal, dropout_p=0.3, seed=2024)  # drawn at 77/256


def test_dropout_fp16_matches_reference(device):
    q, k, v, dout = _inputs(1, 2, 33, 33, 64, torch.float16, device)
    _check_against_reference(q, k, v, dout, causal=True, dropout_p=0.1, seed=5)


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [4, 24, 100, 256])
def test_unsupported_head_dim_names_the_supported_ones(device, head_dim):
    q, k, v, _ = _inputs(1, 1, 4, 4, head_dim, torch.float32, device)
    supported = re.escape(str(SUPPORTED_HEAD_DIMS))
    with pytest.raises(
        ValueError, match=rf"head dim {head_dim} .*supported head dims: {supported}"
    ):
        attention(q, k, v)


def test_offsets_inside_one_head_past_int32_raise():
    # Within-head offsets i·stride_t + d·stride_d are int32 in the kernels; `attention` refuses
    # strides that would pass 2^31 (meta tensors: no memory behind them).
    q = torch.empty(1, 1, 4, 16, device="meta")
    far = torch.empty_strided((1, 1, 4, 16), (0, 0, 2**30, 1), device="meta")
    with pytest.raises(ValueError, match=r"k: offsets inside one head reach 4294967312"):
        attention(q, far, q)


def test_bad_shapes_raise(device):
    q, k, v, _ = _inputs(2, 2, 4, 4, 16, torch.float32, device)
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="same shape"):
        attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="agree"):
        attention(q[:1], k, v)
    with pytest.raises(ValueError, match="agree"):
        attention(q[:, :1], k, v)
    with pytest.raises(ValueError, match="agree"):
        attention(torch.cat([q, q], dim=-1), k, v)


def test_bad_dtypes_raise(device):
    q, k, v, _ = _inputs(1, 1, 4, 4, 16, torch.float32, device)
    with pytest.raises(TypeError, match="one dtype"):
        attention(q, k.half(), v)
    with pytest.raises(TypeError, match="float"):
        attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="float"):
        attention(q.double(), k.double(), v.double())


def test_bad_device_and_dropout_raise(device):
    q, k, v, _ = _inputs(1, 1, 4, 4, 16, torch.float32, device)
    with pytest.raises(ValueError, match="device"):
        attention(q, k.to("meta"), v)
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout_p"):
            attention(q, k, v, dropout_p=p)
    # the kernels scale each row's max of q·kᵀ once, right only for a positive scale
    for scale in (0.0, -0.25, float("nan")):
        with pytest.raises(ValueError, match="sm_scale must be > 0"):
            attention(q, k, v, sm_scale=scale)
    # dropout's within-head Philox counter i·Tk + j is int32
    long_q = torch.zeros(1, 1, 46341, 16, device=device)
    with pytest.raises(ValueError, match="2\\^31"):
        attention(long_q, long_q, long_q, dropout_p=0.1)


def _fake_gpu(monkeypatch, capability: tuple[int, int], name: str) -> None:
    """Make torch.cuda report one GPU of `capability` named `name` (no CUDA needed)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def _fake_cuda(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """A tensor that says it is on cuda:0 and has no memory (a fake tensor): a launch on it
    would fail, so an op that refuses it refused before launching."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(*shape, dtype=dtype, device="cuda")


def _attention_ops_on_fake_cuda() -> dict:
    """Each attention op called on fake CUDA fp16 tensors of its layout (B=1, H=2, T=8, D=16)."""
    from fastgpt.kernels import attention_varlen, decode_attention

    q, flat, one = _fake_cuda(1, 2, 8, 16), _fake_cuda(8, 2, 16), _fake_cuda(1, 2, 16)
    cu, lengths = _fake_cuda(2, dtype=torch.int32), _fake_cuda(1, dtype=torch.int32)
    return {
        "attention": lambda: attention(q, q, q),
        "attention_varlen": lambda: attention_varlen(
            flat, flat, flat, cu, cu, 8, 8, check_cu_seqlens=False
        ),
        "decode_attention": lambda: decode_attention(one, q, q, lengths),
    }


@pytest.mark.parametrize("op", ["attention", "attention_varlen", "decode_attention"])
def test_attention_ops_refuse_gpus_below_sm80_naming_the_gpu_and_sdpa(monkeypatch, op):
    # Below sm_80 Triton lowers tl.dot to FFMA (no tensor cores): the attention ops refuse at
    # call time, before any launch, in one line that names the GPU and the alternative.
    _fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    call = _attention_ops_on_fake_cuda()[op]
    with pytest.raises(ValueError, match=r"^[^\n]*Tesla T4 \(sm_75\)[^\n]*backend=\"sdpa\"") as e:
        call()
    assert str(e.value).startswith(f"{op} needs compute capability 8.0")


def test_gpus_below_sm80_refuse_bf16_in_every_op_and_take_fp16(monkeypatch):
    from fastgpt.kernels import (
        add_layer_norm,
        bias_gelu,
        fused_linear_cross_entropy,
        gelu,
        layer_norm,
    )
    from fastgpt.kernels._dispatch import check_gpu

    _fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    x, w = _fake_cuda(4, 16, dtype=torch.bfloat16), _fake_cuda(16, dtype=torch.bfloat16)
    targets = _fake_cuda(4, dtype=torch.int64)
    calls = {
        "layer_norm": lambda: layer_norm(x, w, w),
        "add_layer_norm": lambda: add_layer_norm(x, x, w, w),
        "gelu": lambda: gelu(x),
        "bias_gelu": lambda: bias_gelu(x, w),
        "fused_linear_cross_entropy": lambda: fused_linear_cross_entropy(
            x, _fake_cuda(8, 16, dtype=torch.bfloat16), targets, check_targets=False
        ),
    }
    for op, call in calls.items():
        with pytest.raises(TypeError, match=rf"^{op}: the Tesla T4 \(sm_75\) has no bfloat16"):
            call()
    check_gpu("layer_norm", _fake_cuda(4, 16), _fake_cuda(16))  # fp16 passes
    # an fp16 weight beside a bf16 input is refused too
    with pytest.raises(TypeError, match="has no bfloat16"):
        check_gpu("layer_norm", _fake_cuda(4, 16), w)


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (12, 0)])
def test_gpus_from_sm80_pass_the_gpu_check(monkeypatch, capability):
    from fastgpt.kernels._dispatch import check_gpu

    _fake_gpu(monkeypatch, capability, "some GPU")
    q = _fake_cuda(1, 2, 8, 16, dtype=torch.bfloat16)
    check_gpu("attention", q, dots=True)
    check_gpu("layer_norm", q)


# --- launch grids ------------------------------------------------------------------------


def _assert_valid_cuda_grid(grid):
    """CUDA allows 2^31 - 1 programs along grid axis 0 but only 65535 along axes 1 and 2."""
    assert 1 <= grid[0] <= 2**31 - 1 and all(1 <= n <= 65535 for n in grid[1:]), grid


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_launch_grids_stay_valid_for_70000_heads(device, launches, monkeypatch, dropout_p):
    # B·H = 70,000 > 65535 programs in a row: every launch (forward, the three backward kernels,
    # the dropout mask) must keep the heads on grid axis 0. The kernels themselves are not run
    # (70,000 programs are too many for the interpreter); test_more_than_65535_batch_heads_gpu
    # runs them on a GPU.
    launches.run = False
    mask_grids = []

    class MaskKernel:
        def __getitem__(self, grid):
            mask_grids.append(tuple(grid))
            return lambda *args, **kwargs: None

    monkeypatch.setattr(attention_module, "_attention_dropout_mask_kernel", MaskKernel())
    batch, heads = 700, 100
    q, k, v, dout = _inputs(batch, heads, 5, 7, 16, torch.float32, device)
    q.requires_grad_()
    attention(q, k, v, dropout_p=dropout_p, seed=1).backward(dout)
    attention_dropout_mask(1, batch, heads, 5, 7, 0.1, device)
    assert len(launches.calls) == 4 and len(mask_grids) == 1
    for grid in [grid for _, grid, _ in launches.calls] + mask_grids:
        _assert_valid_cuda_grid(grid)
        assert math.prod(grid) >= batch * heads  # at least one program per head


# --- torch.compile --------------------------------------------------------


def test_torch_compile_fullgraph_traces_the_op(device):
    # On CPU the interpreter's ops are opaque custom ops: this checks tracing, the fake shapes
    # and the registered autograd (aot_eager runs forward and backward through the op).
    q, k, v, dout = _inputs(1, 2, 17, 17, 16, torch.float32, device)
    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    got = outputs_and_grads(compiled, (q, k, v), dout)
    expected = outputs_and_grads(attention, (q, k, v), dout)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- GPU only ----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_gpu(head_dim, causal):
    q, k, v, dout = _inputs(2, 3, 257, 257, head_dim, torch.bfloat16, "cuda")
    _check_against_reference(q, k, v, dout, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seq_len", [1023, 1025, 4096])
def test_long_sequences_gpu(seq_len, dtype):
    q, k, v, dout = _inputs(1, 2, seq_len, seq_len, 64, dtype, "cuda")
    _check_against_reference(q, k, v, dout, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
def test_all_head_dims_gpu(head_dim):
    q, k, v, dout = _inputs(2, 2, 200, 333, head_dim, torch.float16, "cuda")
    _check_against_reference(q, k, v, dout, causal=True)
    _check_against_reference(q, k, v, dout, causal=False, dropout_p=0.2, seed=3)


@pytest.mark.gpu
def test_kv_cache_shapes_gpu():
    for tq, tk in [(1, 1025), (7, 1024), (1025, 300)]:
        q, k, v, dout = _inputs(2, 3, tq, tk, 64, torch.float16, "cuda")
        _check_against_reference(q, k, v, dout, causal=True)


@pytest.mark.gpu
def test_more_than_65535_batch_heads_gpu():
    q, k, v, dout = _inputs(700, 100, 5, 7, 16, torch.float16, "cuda")  # B·H = 70,000
    _check_against_reference(q, k, v, dout, causal=True)


def _last_two_heads(q):
    """(B, H) index of the last two heads of the last batch entry: the largest offsets."""
    return slice(q.shape[0] - 1, None), slice(q.shape[1] - 2, None)


@pytest.mark.gpu
def test_tensor_offsets_past_2_pow_31_gpu():
    # B·H·T·D = 2^31 + 2^20 elements per tensor (4 GiB in fp16): the last heads' data lie past
    # element 2^31 of q, k, v, out and of every gradient.
    q, k, v, dout = _inputs(2, 16392, 1024, 1024, 64, torch.float16, "cuda")
    assert q.numel() > 2**31
    _check_against_reference(q, k, v, dout, causal=True, heads=_last_two_heads(q))


@pytest.mark.gpu
def test_dropout_offsets_past_2_pow_31_gpu():
    # B·H·Tq·Tk = 2049 · 2^20 > 2^31: one flat Philox offset per weight would pass 2^31 in the
    # last heads; their per-head counters (i·Tk + j, b·H + h) must still give the mask that
    # attention_dropout_mask gives.
    q, k, v, dout = _inputs(1, 2049, 1024, 1024, 16, torch.float16, "cuda")
    _check_against_reference(
        q, k, v, dout, causal=True, dropout_p=0.2, seed=9, heads=_last_two_heads(q)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_torch_compile_inductor_gpu(dtype):
    q, k, v, dout = _inputs(2, 3, 129, 129, 64, dtype, "cuda")
    compiled = torch.compile(attention, fullgraph=True)
    got = outputs_and_grads(compiled, (q, k, v), dout)
    expected = outputs_and_grads(attention, (q, k, v), dout)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    module = MultiHeadAttention(128, 128, 2, BACKENDS["triton"], dropout=0.1).to("cuda", dtype)
    x = torch.randn(2, 65, 128, device="cuda", dtype=dtype, requires_grad=True)
    torch.compile(module, fullgraph=True)(x).sum().backward()
    assert torch.isfinite(x.grad).all()
