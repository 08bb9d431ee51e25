"""kernels.gelu: gelu and bias_gelu, outputs and gradients against the float64 reference, special
values against F.gelu(approximate="tanh"), and the ops under torch.compile.

Without a GPU the Triton kernels run through the interpreter on CPU (tests/conftest.py sets
TRITON_INTERPRET=1); bf16 only on a GPU. Every numerical comparison goes through
tests/tolerance.py's rule.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from fastgpt.kernels import (
    GELU,
    bias_gelu,
    bias_gelu_reference,
    gelu,
    gelu_reference,
    layer_norm,
    layer_norm_reference,
)
from torch import nn

from tests.autograd_runs import outputs_and_grads
from tests.tolerance import assert_close_to_reference

gelu_module = importlib.import_module("fastgpt.kernels.activation")

SHAPES = [(1, 1), (5, 1), (17, 97), (2, 1023), (1151, 768), (3, 7, 1600), (2, 3000)]
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),
]
SPECIAL = [0.0, 1e-4, -1e-4, 3.0, -3.0, 10.0, -10.0, 50.0, -50.0, 1e4, -1e4]
SPECIAL += [float("inf"), float("-inf"), float("nan")]


def torch_gelu(x):
    return F.gelu(x, approximate="tanh")


def check(ours_fn, torch_fn, ref_fn, tensors, names, dy=None):
    """ours_fn vs torch_fn (same dtype) vs ref_fn (float64), forward and every gradient."""
    dtype = tensors[0].dtype
    if dy is None:
        g = torch.Generator().manual_seed(7)
        dy = torch.randn(tensors[0].shape, generator=g).to(tensors[0].device, dtype)
    ours = outputs_and_grads(ours_fn, tensors, dy)
    same = outputs_and_grads(torch_fn, tensors, dy)
    ref64 = outputs_and_grads(ref_fn, [t.double() for t in tensors], dy.double())
    for name, a, s, r in zip(("y", *names), ours, same, ref64, strict=True):
        assert a.dtype == s.dtype and a.shape == s.shape, name
        assert_close_to_reference(a, s, r, dtype=dtype, backward=name != "y", name=name)
    return ours, same


def inputs(shape, dtype, device, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(shape, generator=g)).to(device, dtype)
    bias = torch.randn(shape[-1], generator=g).to(device, dtype)
    return x, bias


def test_references_are_pytorchs_gelu():
    # The tolerance rule measures PyTorch's own error against the references, so they must be
    # right: in float64 they agree with F.gelu(approximate="tanh"), special values included.
    x = torch.cat([torch.linspace(-12, 12, 1001, dtype=torch.float64), torch.tensor(SPECIAL)])
    torch.testing.assert_close(gelu_reference(x), torch_gelu(x), equal_nan=True)
    bias = torch.linspace(-1, 1, x.numel(), dtype=torch.float64)
    expected = torch_gelu(x + bias)
    torch.testing.assert_close(bias_gelu_reference(x[None], bias)[0], expected, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gelu_matches_reference(shape, dtype, device, nan_outputs):
    x, _ = inputs(shape, dtype, device)
    check(gelu, torch_gelu, gelu_reference, [x], ["dx"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_gelu_matches_reference(shape, dtype, device, nan_outputs):
    x, bias = inputs(shape, dtype, device)
    same = lambda x, b: torch_gelu(x + b)
    check(bias_gelu, same, bias_gelu_reference, [x, bias], ["dx", "dbias"])


@pytest.mark.parametrize("shape", [(), (1,), (2, 3, 4, 5)], ids=str)
def test_gelu_any_shape(shape, device, nan_outputs):
    x, _ = inputs(shape or (1,), torch.float32, device, seed=4)
    check(gelu, torch_gelu, gelu_reference, [x.reshape(shape)], ["dx"])


def test_gelu_tail_of_the_last_block(device, nan_outputs):
    # 65536 is the interpreter's block (GPU: 1024): 70001 elements leave a ragged last block.
    x, _ = inputs((70001,), torch.float32, device, seed=3)
    check(gelu, torch_gelu, gelu_reference, [x], ["dx"])


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # interpreter: inf · 0
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_match_pytorch(dtype, device, nan_outputs):
    x = torch.tensor(SPECIAL, dtype=dtype, device=device)
    dy = torch.ones_like(x)
    for fn in (gelu, lambda x, b: bias_gelu(x[None], b)[0]):
        # bias_gelu with a zero bias: the same values through the fused kernel
        tensors = [x] if fn is gelu else [x, torch.zeros(x.shape, dtype=dtype, device=device)]
        names = ["dx"] if fn is gelu else ["dx", "dbias"]
        same_fn = torch_gelu if fn is gelu else (lambda x, b: torch_gelu(x + b))
        ref_fn = gelu_reference if fn is gelu else (lambda x, b: gelu_reference(x + b))
        ours, same = check(fn, same_fn, ref_fn, tensors, names, dy=dy)
        # PyTorch: gelu(+inf) = inf, gelu(-inf) = nan, gelu(nan) = nan; gradient nan at all three
        for name, a, s in zip(("y", "dx"), ours, same, strict=False):
            assert torch.equal(a.isnan(), s.isnan()), f"{name}: nan positions differ"
            assert torch.equal(a.isinf(), s.isinf()), f"{name}: inf positions differ"
        assert ours[0][SPECIAL.index(float("inf"))] == float("inf")


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_finite_inputs_do_not_overflow(dtype, device):
    # x³ overflows fp32 at |x| ~ 1e13 (fp16: x² already at ~256). The exact answers are x and -0
    # with gradients 1 and 0; PyTorch's own fp32 gradient here is nan (inf · 0), so compare with
    # the exact values rather than through the PyTorch-relative rule.
    big = torch.finfo(dtype).max / 2
    x = torch.tensor([big, -big, 1e4, -1e4], dtype=dtype, device=device, requires_grad=True)
    y = gelu(x)
    y.backward(torch.ones_like(y))
    assert torch.equal(y.detach().cpu(), torch.tensor([big, 0.0, 1e4, 0.0], dtype=dtype))
    assert torch.equal(x.grad.cpu(), torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=dtype))


@pytest.mark.parametrize("layout", ["transposed", "column_step", "expanded"])
def test_strided_inputs(layout, device):
    g = torch.Generator().manual_seed(2)
    base = lambda *shape: (3 * torch.randn(shape, generator=g)).to(device)
    if layout == "transposed":
        x = base(97, 33).t()
    elif layout == "column_step":
        x = base(33, 194)[:, ::2]
    else:  # one row repeated: row stride 0
        x = base(1, 97).expand(33, 97)
    assert not x.is_contiguous()
    bias = torch.randn(194, generator=g).to(device)[::2]  # a strided bias too
    check(gelu, torch_gelu, gelu_reference, [x], ["dx"])
    same = lambda x, b: torch_gelu(x + b)
    check(bias_gelu, same, bias_gelu_reference, [x, bias], ["dx", "dbias"])


def test_bias_gelu_mixed_dtypes_promote(device):
    # fp16 activations with an fp32 bias (as under autocast): the result is fp32, like x + bias.
    x, _ = inputs((17, 97), torch.float16, device)
    bias = torch.randn(97).to(device)
    y = bias_gelu(x, bias)
    assert y.dtype == torch.float32
    ref = bias_gelu_reference(x.double(), bias.double())
    assert_close_to_reference(y, torch_gelu(x + bias), ref, dtype=torch.float32)


def test_bias_gradient_is_deterministic(device):
    x, bias = inputs((1151, 768), torch.float32, device)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(device)
    first = outputs_and_grads(bias_gelu, [x, bias], dy)
    second = outputs_and_grads(bias_gelu, [x, bias], dy)
    for name, a, b in zip(("y", "dx", "dbias"), first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_empty_inputs(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    bias = torch.randn(8, device=device, requires_grad=True)
    assert gelu(x).shape == (0, 8)
    y = bias_gelu(x, bias)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 8) and torch.equal(bias.grad, torch.zeros(8, device=device))


def test_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    bias = torch.randn(8, device=device)
    with pytest.raises(TypeError, match="x must be float32"):
        gelu(torch.ones(4, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="x must be float32"):
        bias_gelu(torch.ones(4, 8, dtype=torch.int64, device=device), bias)
    with pytest.raises(TypeError, match="bias must be float32"):
        bias_gelu(x, torch.ones(8, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=r"one device.*bias on meta"):
        bias_gelu(x, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\).*got \(4,\)"):
        bias_gelu(x, bias[:4])
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\).*got \(4, 8\)"):
        bias_gelu(x, x)


def test_module(device):
    x, _ = inputs((3, 5, 97), torch.float32, device)
    module = GELU()
    assert list(module.state_dict()) == []
    assert_close_to_reference(module(x), torch_gelu(x), gelu_reference(x.double()), dtype=x.dtype)


def test_cpu_without_interpreter_falls_back(monkeypatch):
    # TRITON_INTERPRET unset: CPU tensors take the PyTorch path
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, bias = inputs((6, 40), torch.float32, "cpu")
    # The public functions use the references themselves ...
    assert torch.equal(gelu(x), gelu_reference(x))
    assert torch.equal(bias_gelu(x, bias), bias_gelu_reference(x, bias))
    # ... and the registered ops compute the kernels' math in PyTorch, forward and backward.
    check(torch.ops.fastgpt.gelu_forward, torch_gelu, gelu_reference, [x], ["dx"])
    same = lambda x, b: torch_gelu(x + b)
    op = torch.ops.fastgpt.bias_gelu_forward
    check(op, same, bias_gelu_reference, [x, bias], ["dx", "dbias"])
    special = torch.tensor(SPECIAL)
    y = op(special[None], torch.zeros(len(SPECIAL)))[0]
    assert torch.equal(y.isnan(), torch_gelu(special).isnan())


def test_opcheck():
    x, bias = inputs((3, 5), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.fastgpt.gelu_forward.default, (x.requires_grad_(),))
    torch.library.opcheck(torch.ops.fastgpt.bias_gelu_forward.default, (x, bias.requires_grad_()))


# --- torch.compile -----------------------------------------------------------------------


class TinyBlock(nn.Module):
    """LayerNorm -> Linear -> bias_gelu -> gelu: both kernels' ops in one graph."""

    def __init__(self, d: int = 48, reference: bool = False):
        super().__init__()
        self.reference = reference  # the float64 twin runs the references (kernels take no fp64)
        self.norm_weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.norm_bias = nn.Parameter(0.1 * torch.randn(d))
        self.fc = nn.Linear(d, 2 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, act, bias_act = layer_norm, gelu, bias_gelu
        if self.reference:
            norm, act, bias_act = layer_norm_reference, gelu_reference, bias_gelu_reference
        h = norm(x, self.norm_weight, self.norm_bias)  # (B, T, d)
        h = bias_act(nn.functional.linear(h, self.fc.weight), self.fc.bias)  # (B, T, 2d)
        return act(h).sum(-1)  # (B, T)


def compiled_matches_eager(device, dtype, backend):
    torch.manual_seed(0)
    model = TinyBlock().to(device, dtype)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(2, 9, 48, device=device, dtype=dtype)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = model(x_eager)
    y_eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_compiled = compiled(x_compiled)
    y_compiled.sum().backward()
    # The compiled graph calls the very same kernels: results agree up to the rounding of the
    # surrounding PyTorch ops (Inductor may fuse or reorder the sum and the linear layer).
    ref = TinyBlock(reference=True).to(device, torch.float64)
    ref.load_state_dict(model.state_dict())
    x64 = x.double().requires_grad_()
    y64 = ref(x64)
    y64.sum().backward()
    assert_close_to_reference(y_compiled, y_eager, y64, dtype=dtype, name="y")
    assert_close_to_reference(x_compiled.grad, x_eager.grad, x64.grad, dtype=dtype, backward=True)
    for p, g_eager, p64 in zip(model.parameters(), eager_grads, ref.parameters(), strict=True):
        assert_close_to_reference(p.grad, g_eager, p64.grad, dtype=dtype, backward=True)


def test_compile_fullgraph_traces_the_ops():
    # aot_eager traces forward and backward through the registered ops (no graph break allowed
    # with fullgraph=True) without Inductor's code generation: cheap enough for every CPU run.
    torch._dynamo.reset()
    compiled_matches_eager("cpu", torch.float32, "aot_eager")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_inductor_on_gpu(dtype):
    torch._dynamo.reset()
    compiled_matches_eager("cuda", dtype, "inductor")
