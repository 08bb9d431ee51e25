"""pytest-benchmark cases for LayerNorm, GELU, bias+GELU and causal attention.

    pytest benchmarks/test_kernels.py --benchmark-only -n 0
    pytest benchmarks/ --benchmark-only -n 0 -k "attention and fastgpt"

Providers and the math of GB/s and TFLOP/s are those of `benchmarks/kernels_bench.py`; this
file only picks a few shapes and lets pytest-benchmark do the statistics.
"""

from __future__ import annotations

import pytest
import torch
from fastgpt.benchmarks import harness
from fastgpt.benchmarks.kernels_bench import _attention_providers, _compiled, _rowwise_providers

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
ROWS = 16384 if HAS_CUDA else 1024
WIDTHS = (768, 1600) if HAS_CUDA else (768,)
SEQ_LENS = (1024, 4096) if HAS_CUDA else (128,)
TOKENS = 16384 if HAS_CUDA else 128
MODES = ("fwd", "fwd+bwd")


def _provider_names(providers):
    return [name for name, _, _ in providers]


def _step(forward, mode: str, leaves: list[torch.Tensor]):
    """The callable to time for `mode`: forward only, or forward then backward of a fixed
    random upstream gradient (grads reset each call so nothing accumulates)."""
    if mode == "fwd":
        return forward
    with torch.no_grad():
        dy = torch.randn_like(forward())

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        forward().backward(dy)

    return fwd_bwd


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("provider", _provider_names(_rowwise_providers("layernorm", DEVICE)))
@pytest.mark.parametrize("op", ["layernorm", "gelu", "bias_gelu"])
def test_rowwise(timed, op, provider, width, mode):
    fn = dict((name, fn) for name, _, fn in _rowwise_providers(op, DEVICE))[provider]
    if isinstance(fn, tuple):  # ("compile", eager fn)
        fn = _compiled(fn[1])
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(ROWS, width, generator=gen).to(DEVICE, DTYPE).requires_grad_(True)
    w = torch.ones(width, device=DEVICE, dtype=DTYPE, requires_grad=True)
    b = torch.zeros(width, device=DEVICE, dtype=DTYPE, requires_grad=True)
    step = _step(lambda: fn(x, w, b), mode, [x, w, b])
    moved = harness.memory_bound_bytes(mode, x.numel(), x.element_size())
    timed(step, bytes_moved=moved, gbps=lambda s: moved / s / 1e9, shape=[ROWS, width])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("provider", _provider_names(_attention_providers(DEVICE)))
def test_attention(timed, provider, seq_len, mode):
    fn = dict((name, fn) for name, _, fn in _attention_providers(DEVICE))[provider]
    batch, heads, head_dim = max(1, TOKENS // seq_len), 12, 64
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, seq_len, head_dim, generator=gen)
        .to(DEVICE, DTYPE)
        .requires_grad_(True)
        for _ in range(3)
    )  # (B, H, T, D) each
    try:
        with torch.no_grad():
            fn(q, k, v)
    except RuntimeError as exc:  # an SDPA backend that rejects this shape or GPU
        pytest.skip(f"{provider}: {str(exc).splitlines()[0][:120]}")
    step = _step(lambda: fn(q, k, v), mode, [q, k, v])
    flops = harness.attention_flops(batch, heads, seq_len, head_dim, True, mode)
    timed(step, flops=flops, tflops=lambda s: flops / s / 1e12, shape=list(q.shape))
