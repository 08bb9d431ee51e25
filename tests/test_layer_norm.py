"""kernels.layer_norm: output, dx, dweight and dbias against the float64 reference.

Without a GPU the Triton kernels run through the interpreter on CPU (tests/conftest.py sets
TRITON_INTERPRET=1); bf16 only on a GPU (the interpreter's bf16 arithmetic is wrong). Every
numerical comparison goes through tests/tolerance.py's rule.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from fastgpt.kernels import LayerNorm, layer_norm, layer_norm_reference

from tests.autograd_runs import outputs_and_grads
from tests.tolerance import assert_close_to_reference

ln_module = importlib.import_module("fastgpt.kernels.normalization")

# GPT-2's widths 768, 1024, 1280, 1600 among odd ones; width 1; a single row and 1151 rows.
SHAPES = [(1, 1), (5, 1), (17, 97), (2, 1023), (1151, 768), (3, 1024), (4, 1280), (3, 7, 1600)]
SHAPES += [(2, 3000)]
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),
]


def check_layer_norm(x, weight, bias, eps=1e-5, seed=0):
    """Compare forward and all three gradients of `layer_norm` with F.layer_norm in the same
    dtype (PyTorch's own error) and with the reference in float64."""
    dtype = x.dtype
    n = x.shape[-1]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device, dtype)

    ours = outputs_and_grads(lambda x, w, b: layer_norm(x, w, b, eps), (x, weight, bias), dy)
    same = outputs_and_grads(
        lambda x, w, b: F.layer_norm(x, (n,), w, b, eps), (x, weight, bias), dy
    )
    x64, w64, b64 = x.double(), weight.double(), bias.double()
    ref64 = outputs_and_grads(
        lambda x, w, b: layer_norm_reference(x, w, b, eps), (x64, w64, b64), dy
    )
    for name, a, s, r in zip(("y", "dx", "dweight", "dbias"), ours, same, ref64, strict=True):
        assert a.dtype == s.dtype and a.shape == s.shape, name
        assert_close_to_reference(a, s, r, dtype=dtype, backward=name != "y", name=name)


def make_inputs(shape, dtype, device, scale=1.0, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * scale + offset).to(device, dtype)
    weight = (1.0 + 0.5 * torch.randn(n, generator=g)).to(device, dtype)
    bias = (0.5 * torch.randn(n, generator=g)).to(device, dtype)
    return x, weight, bias


def test_reference_is_pytorchs_layer_norm():
    # The tolerance rule measures PyTorch's own error against the reference, so the reference
    # itself must be right: in float64 it agrees with F.layer_norm to rounding.
    x, weight, bias = make_inputs((17, 97), torch.float64, "cpu", scale=3.0, offset=5.0)
    expected = F.layer_norm(x, (97,), weight, bias, 1e-3)
    torch.testing.assert_close(layer_norm_reference(x, weight, bias, 1e-3), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, device, nan_outputs):
    check_layer_norm(*make_inputs(shape, dtype, device))


@pytest.mark.parametrize("shape", [(17, 97), (2, 1023), (3, 7, 1600)], ids=str)
def test_rows_wider_than_one_tile(shape, device, monkeypatch, nan_outputs):
    # Rows wider than MAX_BLOCK_N loop over column chunks; shrink it to test that path cheaply.
    monkeypatch.setattr(ln_module, "MAX_BLOCK_N", 64)
    check_layer_norm(*make_inputs(shape, torch.float32, device))


@pytest.mark.parametrize("width", [16384, 16385])
def test_widest_rows(width, device, nan_outputs):
    # 16384 is the widest single tile (MAX_BLOCK_N); one more column takes the looping path.
    check_layer_norm(*make_inputs((2, width), torch.float32, device))


@pytest.mark.parametrize("layout", ["row_slice", "column_step", "transposed", "expanded"])
def test_strided_inputs(layout, device):
    g = torch.Generator().manual_seed(1)
    base = lambda *shape: torch.randn(shape, generator=g).to(device)
    if layout == "row_slice":  # rows 1000 apart, columns contiguous: read in place
        x = base(33, 1000)[:, 3:771]
    elif layout == "column_step":  # every other column
        x = base(33, 1536)[:, ::2]
    elif layout == "transposed":
        x = base(768, 33).t()
    else:  # one row repeated: row stride 0
        x = base(1, 768).expand(33, 768)
    assert not x.is_contiguous()
    _, weight, bias = make_inputs((2 * 768,), torch.float32, device)
    check_layer_norm(x, weight[::2], bias[1::2])  # strided parameters too


def test_eps_is_used(device):
    # Rows of variance ~1e-2 with eps = 0.1: a kernel that ignored eps would be far off.
    x, weight, bias = make_inputs((17, 97), torch.float32, device, scale=0.1)
    check_layer_norm(x, weight, bias, eps=0.1)
    norm = LayerNorm(97, eps=0.1).to(device)
    expected = layer_norm_reference(x.double(), norm.weight.double(), norm.bias.double(), 0.1)
    same = F.layer_norm(x, (97,), norm.weight, norm.bias, 0.1)
    assert_close_to_reference(norm(x).detach(), same.detach(), expected, dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_rows(dtype, device):
    # Zero variance: x̂ = 0, so y = bias (up to the rounding of the mean).
    x = torch.arange(1, 8, dtype=torch.float32)[:, None].repeat(1, 300) * 3.3
    _, weight, bias = make_inputs((300,), dtype, device)
    check_layer_norm(x.to(device, dtype), weight, bias)


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["spread_1e4", "offset_1e4"])
def test_fp16_large_magnitude(offset, device):
    scale = 1e4 if offset == 0.0 else 30.0
    check_layer_norm(*make_inputs((64, 768), torch.float16, device, scale, offset))


@pytest.mark.parametrize(
    "x_dtype, param_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)]
)
def test_mixed_input_and_parameter_dtypes(x_dtype, param_dtype, device):
    # The documented promotion: math in fp32, y and dx in x's dtype, dweight/dbias in the
    # parameters' (an fp32 model fed fp16 activations, or fp16 weights given fp32 inputs).
    x, _, _ = make_inputs((33, 97), x_dtype, device)
    _, weight, bias = make_inputs((33, 97), param_dtype, device, seed=1)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device, x.dtype)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = layer_norm(*leaves)
    y.backward(dy)
    assert y.dtype == leaves[0].grad.dtype == x_dtype
    assert leaves[1].grad.dtype == leaves[2].grad.dtype == param_dtype
    # PyTorch's way to do the same: normalize in fp32, round each result to its tensor's dtype
    same = [t.clone().float().requires_grad_() for t in (x, weight, bias)]
    y_same = F.layer_norm(same[0], (97,), same[1], same[2])
    y_same.backward(dy.float())
    ref = [t.double().requires_grad_() for t in (x, weight, bias)]
    y_ref = layer_norm_reference(*ref)
    y_ref.backward(dy.double())
    assert_close_to_reference(y, y_same.to(x_dtype), y_ref, dtype=x_dtype)
    dtypes = (x_dtype, param_dtype, param_dtype)
    for a, s, r, dt in zip(leaves, same, ref, dtypes, strict=True):
        assert_close_to_reference(a.grad, s.grad.to(dt), r.grad, dtype=dt, backward=True)


@pytest.mark.parametrize(
    ("shape", "max_block_n"), [((1151, 768), None), ((130, 97), 64)], ids=["one_tile", "chunks"]
)
def test_backward_is_deterministic(shape, max_block_n, device, monkeypatch):
    if max_block_n is not None:  # rows wider than a tile: dweight/dbias accumulate per chunk
        monkeypatch.setattr(ln_module, "MAX_BLOCK_N", max_block_n)
    x, weight, bias = make_inputs(shape, torch.float32, device)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(device)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        layer_norm(*leaves).backward(dy)
        return [t.grad for t in leaves]

    first, second = grads(), grads()
    for name, a, b in zip(("dx", "dweight", "dbias"), first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical backward passes"


@pytest.mark.filterwarnings("ignore:var... degrees of freedom")  # the reference, on 0 rows
def test_empty_input(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    weight = torch.ones(8, device=device, requires_grad=True)
    y = layer_norm(x, weight, torch.zeros(8, device=device))
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 8) and torch.equal(weight.grad, torch.zeros(8, device=device))


def test_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    w, b = torch.ones(8, device=device), torch.zeros(8, device=device)
    with pytest.raises(TypeError, match="x must be float32"):
        layer_norm(torch.ones(4, 8, dtype=torch.int64, device=device), w, b)
    with pytest.raises(TypeError, match="weight must be float32"):
        layer_norm(x, torch.ones(8, dtype=torch.int32, device=device), b)
    with pytest.raises(ValueError, match=r"one device.*weight on meta"):
        layer_norm(x, torch.ones(8, device="meta"), b)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\).*got \(9,\)"):
        layer_norm(x, torch.ones(9, device=device), b)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\).*got \(1, 8\)"):
        layer_norm(x, w, b[None])
    with pytest.raises(ValueError, match="scalar"):
        layer_norm(torch.tensor(1.0, device=device), w[:1], b[:1])


def test_module_state_dict_and_forward(device):
    norm = LayerNorm(97).to(device)
    assert set(norm.state_dict()) == {"weight", "bias"}
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 5, 97, device=device)
    expected = layer_norm_reference(x.double(), norm.weight.double(), norm.bias.double())
    same = F.layer_norm(x, (97,), norm.weight, norm.bias)
    assert_close_to_reference(norm(x).detach(), same.detach(), expected, dtype=torch.float32)


def test_cpu_without_interpreter_falls_back(monkeypatch):
    # TRITON_INTERPRET unset: CPU tensors take the PyTorch path
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, weight, bias = make_inputs((6, 40), torch.float32, "cpu")
    # The public function uses the reference itself ...
    assert torch.equal(layer_norm(x, weight, bias), layer_norm_reference(x, weight, bias))
    # ... and the registered op computes the same math in PyTorch, forward and backward.
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y, mean, rstd = torch.ops.fastgpt.layer_norm_forward(*leaves, 1e-5)
    assert mean.shape == rstd.shape == (6,)
    y.backward(torch.ones_like(y))
    same = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y_same = F.layer_norm(same[0], (40,), same[1], same[2])
    y_same.backward(torch.ones_like(y_same))
    ref = [t.double().requires_grad_() for t in (x, weight, bias)]
    y_ref = layer_norm_reference(*ref)
    y_ref.backward(torch.ones_like(y_ref))
    assert_close_to_reference(y.detach(), y_same.detach(), y_ref, dtype=torch.float32)
    for a, s, r in zip(leaves, same, ref, strict=True):
        assert_close_to_reference(a.grad, s.grad, r.grad, dtype=torch.float32, backward=True)


def test_opcheck():
    x, weight, bias = make_inputs((3, 5), torch.float32, "cpu")
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), 1e-5)
    torch.library.opcheck(torch.ops.fastgpt.layer_norm_forward.default, args)
