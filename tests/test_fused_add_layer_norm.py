"""kernels.fused_add_layer_norm: normed, new_residual and every gradient (dx, dresidual,
dweight, dbias) against the float64 reference.

Without a GPU the Triton kernels run through the interpreter on CPU (tests/conftest.py sets
TRITON_INTERPRET=1); bf16 only on a GPU (the interpreter's bf16 arithmetic is wrong). Every
numerical comparison goes through tests/tolerance.py's rule.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from fastgpt.kernels import add_layer_norm, add_layer_norm_reference, layer_norm_reference

from tests.autograd_runs import outputs_and_grads
from tests.tolerance import assert_close_to_reference

fused_module = importlib.import_module("fastgpt.kernels.fused_add_layer_norm")
# The fused op shares LayerNorm's tiles: MAX_BLOCK_N (the widest single tile) lives there.
ln_module = importlib.import_module("fastgpt.kernels.normalization")

# Width 1, odd widths, GPT-2 small's 768 over a (3, 7) batch; 16385 takes the looping path.
SHAPES = [(1, 1), (5, 1), (17, 97), (2, 1023), (3, 7, 768), (2, 16385)]
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),
]
NAMES = ("normed", "new_residual", "dx", "dresidual", "dweight", "dbias")


def torch_same_dtype(x, residual, weight, bias, eps=1e-5):
    """PyTorch's own ops in the inputs' dtype: its error is the yardstick of the rule."""
    new_residual = residual + x
    normed = F.layer_norm(new_residual, (x.shape[-1],), weight, bias, eps)
    return normed, new_residual


def make_inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g).to(device, dtype)
    residual = (2.0 * torch.randn(shape, generator=g) + 1.0).to(device, dtype)
    weight = (1.0 + 0.5 * torch.randn(n, generator=g)).to(device, dtype)
    bias = (0.5 * torch.randn(n, generator=g)).to(device, dtype)
    return x, residual, weight, bias


def upstream_grads(shape, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device) for _ in range(2)]


def check_add_layer_norm(x, residual, weight, bias, eps=1e-5, grads=None):
    """Outputs and all four gradients of `add_layer_norm` against PyTorch in the same dtype
    (its own error) and the reference in float64."""
    dtype = x.dtype
    grads = grads if grads is not None else upstream_grads(x.shape, x.device)
    tensors = (x, residual, weight, bias)
    ours = outputs_and_grads(lambda *t: add_layer_norm(*t, eps), tensors, grads)
    same = outputs_and_grads(lambda *t: torch_same_dtype(*t, eps), tensors, grads)
    ref64 = outputs_and_grads(
        lambda *t: add_layer_norm_reference(*t, eps), [t.double() for t in tensors], grads
    )
    for name, a, s, r in zip(NAMES, ours, same, ref64, strict=True):
        assert a.dtype == s.dtype and a.shape == s.shape, name
        backward = name.startswith("d")
        assert_close_to_reference(a, s, r, dtype=dtype, backward=backward, name=name)
    assert torch.equal(ours[1], same[1]), "new_residual must be PyTorch's add, bit for bit"


def test_reference_is_the_books_add_then_layer_norm():
    # The torch backend's logits stay bit-identical: exactly `x + delta`, then the reference.
    x, residual, weight, bias = make_inputs((17, 97), torch.float16, "cpu")
    normed, new_residual = add_layer_norm_reference(x, residual, weight, bias)
    assert torch.equal(new_residual, residual + x)
    assert torch.equal(normed, layer_norm_reference(residual + x, weight, bias))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, device, nan_outputs):
    check_add_layer_norm(*make_inputs(shape, dtype, device))


@pytest.mark.parametrize("shape", [(17, 97), (2, 1023)], ids=str)
def test_rows_wider_than_one_tile(shape, device, monkeypatch, nan_outputs):
    # Rows wider than MAX_BLOCK_N loop over column chunks; shrink it to test that path cheaply.
    monkeypatch.setattr(ln_module, "MAX_BLOCK_N", 64)
    check_add_layer_norm(*make_inputs(shape, torch.float16, device))


@pytest.mark.parametrize("layout", ["row_slice", "column_step", "transposed", "expanded"])
def test_strided_inputs(layout, device, nan_outputs):
    g = torch.Generator().manual_seed(2)
    base = lambda *shape: torch.randn(shape, generator=g).to(device)
    if layout == "row_slice":  # rows 1000 apart, columns contiguous: read in place
        x, residual = base(33, 1000)[:, 3:100], base(33, 500)[:, 7:104]
    elif layout == "column_step":  # every other column
        x, residual = base(33, 194)[:, ::2], base(33, 97)
    elif layout == "transposed":
        x, residual = base(97, 33).t(), base(33, 97)
    else:  # one row repeated: row stride 0
        x, residual = base(1, 97).expand(33, 97), base(33, 97)
    assert not x.is_contiguous()
    if layout == "row_slice":  # read in place: the op sees the row stride
        assert ln_module._rows(x, 97).stride(0) == 1000
    _, _, weight, bias = make_inputs((2 * 97,), torch.float32, device)
    # Strided parameters too, and upstream gradients of row stride 0 (passed as they are).
    grads = [base(1, 97).expand(33, 97), base(1, 97).expand(33, 97)]
    check_add_layer_norm(x, residual, weight[::2], bias[1::2], grads=grads)
    check_add_layer_norm(residual, x, weight[::2], bias[1::2], grads=grads)  # residual strided


def test_eps_is_used(device):
    # Rows of variance ~1e-2 with eps = 0.1: a kernel that ignored eps would be far off.
    x, residual, weight, bias = make_inputs((17, 97), torch.float32, device)
    check_add_layer_norm(0.05 * x, 0.05 * residual, weight, bias, eps=0.1)


def test_gradient_of_normed_only(device):
    # new_residual unused (the final norm of a model): its gradient arrives as zeros.
    x, residual, weight, bias = make_inputs((5, 97), torch.float32, device)
    zeros = torch.zeros(x.shape, device=device)
    check_add_layer_norm(
        x, residual, weight, bias, grads=[upstream_grads(x.shape, device)[0], zeros]
    )
    leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
    add_layer_norm(*leaves)[0].sum().backward()
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize(
    "x_dtype, residual_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)]
)
def test_mixed_dtypes_follow_pytorchs_add(x_dtype, residual_dtype, device):
    # An fp32 stream plus an fp16 branch output (a model under autocast): both outputs in
    # result_type(residual, x), as `residual + x` gives; dx and dresidual in their own dtypes.
    x, _, weight, bias = make_inputs((33, 97), x_dtype, device)
    _, residual, _, _ = make_inputs((33, 97), residual_dtype, device, seed=1)
    grads = upstream_grads(x.shape, device)
    tensors = (x, residual, weight.float(), bias.float())
    ours = outputs_and_grads(add_layer_norm, tensors, grads)
    assert ours[0].dtype == ours[1].dtype == torch.float32
    assert ours[2].dtype == x_dtype and ours[3].dtype == residual_dtype
    # PyTorch's way: the add promoted to fp32, the gradients rounded to each input's dtype.
    same = outputs_and_grads(torch_same_dtype, tensors, grads)
    ref64 = outputs_and_grads(add_layer_norm_reference, [t.double() for t in tensors], grads)
    dtypes = (torch.float32, torch.float32, x_dtype, residual_dtype, torch.float32, torch.float32)
    for name, a, s, r, dt in zip(NAMES, ours, same, ref64, dtypes, strict=True):
        assert a.dtype == s.dtype == dt, name
        assert_close_to_reference(a, s, r, dtype=dt, backward=name.startswith("d"), name=name)


@pytest.mark.parametrize(
    ("shape", "max_block_n"), [((300, 97), None), ((130, 97), 64)], ids=["one_tile", "chunks"]
)
def test_backward_is_deterministic(shape, max_block_n, device, monkeypatch):
    if max_block_n is not None:  # rows wider than a tile: dweight/dbias accumulate per chunk
        monkeypatch.setattr(ln_module, "MAX_BLOCK_N", max_block_n)
    tensors = make_inputs(shape, torch.float32, device)
    grads = upstream_grads(shape, device)
    first, second = (outputs_and_grads(add_layer_norm, tensors, grads) for _ in range(2))
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("max_block_n", [None, 64], ids=["one_tile", "chunks"])
def test_runs_layer_norms_kernels_with_its_tuned_tile(max_block_n, device, monkeypatch):
    # No kernels of its own: LayerNorm's, the residual flags on, launched with the tile that
    # LayerNorm's tuning picks (buckets of their own: "add_layer_norm.forward"/".backward").
    assert not hasattr(fused_module, "_add_layer_norm_forward_kernel")
    assert not hasattr(fused_module, "_add_layer_norm_backward_kernel")
    if max_block_n is not None:
        monkeypatch.setattr(ln_module, "MAX_BLOCK_N", max_block_n)
    monkeypatch.setenv("FASTGPT_AUTOTUNE", "0")  # a GPU launches the pinned tile, untimed
    picked, launched = [], []
    layer_norms_tuned_tile = ln_module._tuned_tile  # wrapped below, in its module

    def tuned_tile(pass_name, x2, launch, op="layer_norm"):
        tile = layer_norms_tuned_tile(pass_name, x2, launch, op=op)
        picked.append((op, pass_name, tuple(x2.shape), tile))
        return tile

    def spy(kernel, flag):
        class Spy:  # kernel[grid](...) as a launch, its flag and tile recorded
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    tile = {k: kwargs[k] for k in ln_module.TILE_KEYS}
                    launched.append((flag, kwargs[flag], tile))
                    return kernel[grid](*args, **kwargs)

                return run

        return Spy()

    monkeypatch.setattr(ln_module, "_tuned_tile", tuned_tile)
    for name, flag in (("forward", "HAS_RESIDUAL"), ("backward", "HAS_DRESIDUAL")):
        attr = f"_layer_norm_{name}_kernel"
        monkeypatch.setattr(ln_module, attr, spy(getattr(ln_module, attr), flag))
    shape = (37, 97)
    x, residual, weight, bias = make_inputs(shape, torch.float32, device)
    check_add_layer_norm(x, residual, weight, bias)
    m, n = 37, 97
    assert [(op, p, s) for op, p, s, _ in picked] == [
        ("add_layer_norm", "forward", (m, n)),
        ("add_layer_norm", "backward", (m, n)),
    ]
    for _, pass_name, _, tile in picked:  # pinned (FASTGPT_AUTOTUNE=0 on a GPU): no timing
        assert tile == ln_module._tile_candidates(m, n)[0], pass_name
    assert launched == [
        ("HAS_RESIDUAL", True, picked[0][3]),
        ("HAS_DRESIDUAL", True, picked[1][3]),
    ]
    assert launched[0][2]["SINGLE_TILE"] == (max_block_n is None)


@pytest.mark.filterwarnings("ignore:var... degrees of freedom")  # the reference, on 0 rows
def test_empty_input(device):
    leaves = [torch.randn(0, 8, device=device, requires_grad=True) for _ in range(2)]
    weight = torch.ones(8, device=device, requires_grad=True)
    normed, new_residual = add_layer_norm(*leaves, weight, torch.zeros(8, device=device))
    assert normed.shape == new_residual.shape == (0, 8)
    (normed.sum() + new_residual.sum()).backward()
    assert leaves[0].grad.shape == leaves[1].grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros(8, device=device))


def test_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    w, b = torch.ones(8, device=device), torch.zeros(8, device=device)
    with pytest.raises(TypeError, match="x must be float32"):
        add_layer_norm(torch.ones(4, 8, dtype=torch.int64, device=device), x, w, b)
    with pytest.raises(TypeError, match="residual must be float32"):
        add_layer_norm(x, torch.ones(4, 8, dtype=torch.int32, device=device), w, b)
    with pytest.raises(TypeError, match="bias must be float32"):
        add_layer_norm(x, x, w, torch.zeros(8, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=r"one device.*residual on meta"):
        add_layer_norm(x, torch.randn(4, 8, device="meta"), w, b)
    with pytest.raises(ValueError, match=r"residual must have x's shape \(4, 8\).*got \(1, 8\)"):
        add_layer_norm(x, x[:1], w, b)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\).*got \(9,\)"):
        add_layer_norm(x, x, torch.ones(9, device=device), b)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\).*got \(1, 8\)"):
        add_layer_norm(x, x, w, b[None])
    with pytest.raises(ValueError, match="scalar"):
        scalar = torch.tensor(1.0, device=device)
        add_layer_norm(scalar, scalar, w[:1], b[:1])


def test_cpu_without_interpreter_falls_back(monkeypatch):
    # TRITON_INTERPRET unset: CPU tensors take the PyTorch path
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tensors = make_inputs((6, 40), torch.float32, "cpu")
    # The public function is the reference itself ...
    for a, r in zip(add_layer_norm(*tensors), add_layer_norm_reference(*tensors), strict=True):
        assert torch.equal(a, r)
    # ... and the registered op computes the same math in PyTorch, forward and backward.
    grads = upstream_grads((6, 40), "cpu")
    op = lambda *t: torch.ops.fastgpt.add_layer_norm_forward(*t, 1e-5)[:2]
    ours = outputs_and_grads(op, tensors, grads)
    same = outputs_and_grads(torch_same_dtype, tensors, grads)
    ref64 = outputs_and_grads(add_layer_norm_reference, [t.double() for t in tensors], grads)
    for name, a, s, r in zip(NAMES, ours, same, ref64, strict=True):
        backward = name.startswith("d")
        assert_close_to_reference(a, s, r, dtype=torch.float32, backward=backward, name=name)


def test_opcheck():
    x, residual, weight, bias = make_inputs((3, 5), torch.float32, "cpu")
    args = [t.requires_grad_() for t in (x, residual, weight, bias)]
    torch.library.opcheck(torch.ops.fastgpt.add_layer_norm_forward.default, (*args, 1e-5))


def unfused_logits(model, ids):
    """GPTModel's forward as it was before the fusion: each add, then the next norm."""
    x = model.drop_emb(model.tok_emb(ids) + model.pos_emb(torch.arange(ids.shape[1])))
    for block in model.trf_blocks:
        x = x + block.drop_shortcut(block.att(block.norm1(x)))
        x = x + block.drop_shortcut(block.ff(block.norm2(x)))
    return model.out_head(model.final_norm(x))[..., : model.config.vocab_size]


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_model_logits_are_the_unfused_ones_bit_for_bit(backend):
    # The blocks fuse every residual add with the next norm (across blocks too); on the
    # reference backends that is the same arithmetic, so the logits stay identical, in
    # training mode (dropout drawn in the same order) as in eval.
    from fastgpt.model import GPTModel
    from fastgpt.model_config import GPTConfig

    config = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=3)
    torch.manual_seed(0)
    model = GPTModel(config, backend=backend).train()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    fused = model(ids)
    torch.manual_seed(1)
    assert torch.equal(fused, unfused_logits(model, ids))
