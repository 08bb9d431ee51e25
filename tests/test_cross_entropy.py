"""kernels.cross_entropy: the fused linear + cross-entropy loss and its gradients in hidden, weight
and bias against the float64 reference, by tests/tolerance.py's rule.

Without a GPU the Triton kernel runs through the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), at about half a microsecond per logit: GPT-2's vocabulary (50,257) goes
through the kernel with a few rows here and with 1023 and 4097 rows on a GPU only (`gpu`
mark); many rows on CPU use smaller vocabularies. The PyTorch step per chunk
(`chunked_linear_cross_entropy_torch`, what CPUs run without the interpreter) is tested beside
the kernel. bf16 only on a GPU (the interpreter's bf16 arithmetic is wrong).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from fastgpt.benchmarks.harness import cpu_peak_bytes
from fastgpt.kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

from tests.autograd_runs import outputs_and_grads
from tests.tolerance import assert_close_to_reference

ce = importlib.import_module("fastgpt.kernels.cross_entropy")
chunked_torch = ce.chunked_linear_cross_entropy_torch

GPU = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=GPU)]
REDUCTIONS = ["mean", "sum", "none"]
GPT2_VOCAB = 50257


def make_inputs(n, v, d, dtype, device, bias=True, logit_std=2.0, ignore_index=-100, seed=0):
    """hidden (n, d), weight (v, d), bias (v,) | None, targets (n,): logits of std ~logit_std;
    targets hit the last class (row 0) and class 0 (row 2); every 7th from row 1 is ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * logit_std).to(device, dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(device, dtype)
    b = (0.5 * torch.randn(v, generator=g)).to(device, dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[0] = v - 1
    targets[2:3] = 0
    targets[1::7] = ignore_index
    return hidden, weight, b, targets.to(device)


def upstream(reduction, n, seed=1):
    """The gradient fed to backward: not 1 (so scaling is tested), exact in fp16."""
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if reduction == "none" else ()
    return torch.randint(1, 16, shape, generator=g).float() / 8


def unfused_loss(hidden, weight, targets, bias=None, **kw):
    """PyTorch's loss in the inputs' dtype, as fastgpt's engine computes it: the logits in that
    dtype, the softmax of them upcast to fp32 (an fp16 loss would overflow past 65504)."""
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, **kw)


def check_loss(
    hidden,
    weight,
    bias,
    targets,
    ignore_index=-100,
    reduction="mean",
    fn=fused_linear_cross_entropy,
):
    """Loss and gradients of `fn` against PyTorch's unfused loss in the same dtype
    (`unfused_loss`: its own error) and the reference in float64.
    Returns ours: [loss, dhidden, dweight(, dbias)]."""
    dtype = hidden.dtype
    dy = upstream(reduction, targets.shape[0])
    kw = {"ignore_index": ignore_index, "reduction": reduction}
    tensors = (hidden, weight, bias)
    ours = outputs_and_grads(lambda h, w, b: fn(h, w, targets, b, **kw), tensors, dy)
    same = outputs_and_grads(lambda h, w, b: unfused_loss(h, w, targets, b, **kw), tensors, dy)
    b64 = None if bias is None else bias.double()
    ref = outputs_and_grads(
        lambda h, w, b: fused_linear_cross_entropy_reference(h, w, targets, b, **kw),
        (hidden.double(), weight.double(), b64), dy,
    )  # fmt: skip
    assert ours[0].dtype == torch.float32
    names = ("loss", "dhidden", "dweight", "dbias")
    for name, a, s, r in zip(names, ours, same, ref, strict=False):
        assert a.shape == r.shape, name
        if name != "loss":
            assert a.dtype == dtype, name
        assert_close_to_reference(a, s, r, dtype=dtype, backward=name != "loss", name=name)
    return ours


# --- against the reference --------------------------------------------------------------------

# (N, V, d, bias, MAX_BLOCK_V): V = 97 (odd, one tile), V = 1000 in tiles of 256 and V = 300 in
# tiles of 128 (the last one ragged), GPT-2's vocabulary in one tile under the interpreter
# (MAX_BLOCK_V 65536) and in seven of 8192 on a GPU (the last one ragged: 50257 = 6 · 8192 +
# 1105).
KERNEL_CASES = [
    (1, 97, 32, True, None),
    (17, 97, 32, False, None),
    (1023, 97, 32, True, None),
    (4097, 97, 16, False, None),
    (17, 1000, 32, True, 256),
    (1023, 1000, 16, False, 256),
    (4097, 300, 8, True, 128),
    (1, GPT2_VOCAB, 16, False, None),
    (17, GPT2_VOCAB, 16, True, None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "v", "d", "bias", "max_block_v"), KERNEL_CASES, ids=str)
def test_matches_reference(n, v, d, bias, max_block_v, dtype, device, monkeypatch, nan_outputs):
    if max_block_v is not None:
        monkeypatch.setattr(ce, "MAX_BLOCK_V", max_block_v)
    if n >= 64:  # several chunks (smaller ones: CPU BLAS's few-row matmul is less accurate)
        monkeypatch.setattr(ce, "CHUNK_ROWS", n // 3)
    check_loss(*make_inputs(n, v, d, dtype, device, bias=bias))


@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1023, 4097])
@pytest.mark.parametrize("bias", [False, True])
def test_gpt2_vocabulary_many_rows_kernel(n, dtype, bias, device):
    # Through the interpreter these would take minutes (~0.5 µs a logit); on CPU the many-row
    # chunk loop is tested at V = 97, 300, 1000 above and for memory at 8192 rows below.
    check_loss(*make_inputs(n, GPT2_VOCAB, 768, dtype, device, bias=bias))


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_reduction(reduction, dtype, path, device, monkeypatch, nan_outputs):
    monkeypatch.setattr(ce, "MAX_BLOCK_V", 256)
    monkeypatch.setattr(ce, "CHUNK_ROWS", 100)
    fn = fused_linear_cross_entropy if path == "kernel" else chunked_torch
    inputs = make_inputs(257, 1000, 16, dtype, device, ignore_index=3)
    check_loss(*inputs, ignore_index=3, reduction=reduction, fn=fn)


def test_reference_is_the_textbook_loss():
    # The rule measures PyTorch's own error against the reference, so the reference must be
    # right: -log softmax(hidden @ weight.T + bias)[target], averaged over counted targets.
    hidden, weight, bias, targets = make_inputs(33, 97, 8, torch.float64, "cpu")
    logits = hidden @ weight.T + bias
    counted = targets != -100
    nll = -(logits - logits.logsumexp(1, keepdim=True))[counted, targets[counted]]
    loss = fused_linear_cross_entropy_reference(hidden, weight, targets, bias)
    torch.testing.assert_close(loss, nll.mean(), rtol=1e-12, atol=0)
    rows = fused_linear_cross_entropy_reference(hidden, weight, targets, bias, reduction="none")
    assert rows.shape == (33,) and torch.equal(rows[~counted], torch.zeros_like(rows[~counted]))


# --- edge cases --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["tiles", "one_tile", "torch"])
def test_huge_logits(path, dtype, device, monkeypatch):
    # Logits of ±1e4: exp of them overflows even in fp32; the log-sum-exp must not, nor lose
    # the softmax's precision (a rounded m + log(s) would be off by ~1e-3 at 1e4).
    v, fn = 300, chunked_torch if path == "torch" else fused_linear_cross_entropy
    if path == "tiles":
        monkeypatch.setattr(ce, "MAX_BLOCK_V", 128)
    hidden, weight, bias, targets = make_inputs(33, v, 16, dtype, device, logit_std=6000.0)
    logits = F.linear(hidden.float(), weight.float(), bias.float())
    assert logits.abs().max() > 1e4 and torch.isinf(logits.exp()).any()
    for reduction in REDUCTIONS:
        ours = check_loss(hidden, weight, bias, targets, reduction=reduction, fn=fn)
        assert torch.isfinite(ours[0]).all()


@pytest.mark.parametrize("max_block_v", [None, 256])
def test_targets_at_the_last_class(max_block_v, device, monkeypatch):
    # Every target is class V - 1: the last column of the last (ragged) tile.
    if max_block_v is not None:
        monkeypatch.setattr(ce, "MAX_BLOCK_V", max_block_v)
    for v in (97, 1000):
        hidden, weight, bias, targets = make_inputs(40, v, 16, torch.float32, device)
        check_loss(hidden, weight, bias, torch.full_like(targets, v - 1))


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_targets_ignored(reduction, path, device):
    # As F.cross_entropy: "mean" is 0 / 0 = nan, "sum" 0, "none" zeros; gradients all zero.
    fn = fused_linear_cross_entropy if path == "kernel" else chunked_torch
    hidden, weight, bias, targets = make_inputs(9, 97, 8, torch.float32, device)
    targets = torch.full_like(targets, -100)
    ours = check_loss(hidden, weight, bias, targets, reduction=reduction, fn=fn)
    if reduction == "mean":
        assert torch.isnan(ours[0])
    else:
        assert torch.equal(ours[0], torch.zeros_like(ours[0]))
    for grad in ours[1:]:
        assert torch.equal(grad, torch.zeros_like(grad))


def test_ignore_index_inside_the_classes(device):
    # ignore_index may be a real class id (e.g. a padding token): those targets do not count.
    hidden, weight, bias, targets = make_inputs(50, 97, 8, torch.float32, device, ignore_index=5)
    assert (targets == 5).sum() > 1
    check_loss(hidden, weight, bias, targets, ignore_index=5)


@pytest.mark.parametrize("layout", ["row_slice", "column_step", "transposed"])
def test_strided_inputs(layout, device):
    # hidden, weight and targets read in place from views; the gradients land in the bases.
    g = torch.Generator().manual_seed(3)
    n, v, d = 37, 97, 24
    if layout == "row_slice":  # rows 40 apart
        base_h = torch.randn(n, 40, generator=g)
        view_h = lambda h: h[:, 5 : 5 + d]
    elif layout == "column_step":  # every other column
        base_h = torch.randn(n, 2 * d, generator=g)
        view_h = lambda h: h[:, ::2]
    else:
        base_h = torch.randn(d, n, generator=g)
        view_h = lambda h: h.t()
    base_w = torch.randn(d, v, generator=g) / d**0.5  # weight = its transpose, (V, d)
    targets = torch.randint(0, v, (2 * n,), generator=g)[::2]  # stride 2
    targets[3] = -100
    base_h, base_w, targets = base_h.to(device), base_w.to(device), targets.to(device)
    assert not view_h(base_h).is_contiguous() and not targets.is_contiguous()
    dy = upstream("mean", n)

    def loss_of(fn):
        return lambda h, w: fn(view_h(h), w.t(), targets)

    ours = outputs_and_grads(loss_of(fused_linear_cross_entropy), (base_h, base_w), dy)
    same = outputs_and_grads(loss_of(unfused_loss), (base_h, base_w), dy)
    ref = outputs_and_grads(
        loss_of(fused_linear_cross_entropy_reference), (base_h.double(), base_w.double()), dy
    )
    for name, a, s, r in zip(("loss", "dhidden", "dweight"), ours, same, ref, strict=True):
        assert_close_to_reference(a, s, r, dtype=torch.float32, backward=name != "loss", name=name)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_are_deterministic(reduction, device, monkeypatch):
    monkeypatch.setattr(ce, "CHUNK_ROWS", 50)  # grad_weight/grad_bias summed over 4 chunks
    monkeypatch.setattr(ce, "MAX_BLOCK_V", 128)
    hidden, weight, bias, targets = make_inputs(200, 300, 16, torch.float32, device)
    dy = upstream(reduction, 200)
    loss_fn = lambda h, w, b: fused_linear_cross_entropy(h, w, targets, b, reduction=reduction)
    first = outputs_and_grads(loss_fn, (hidden, weight, bias), dy)
    second = outputs_and_grads(loss_fn, (hidden, weight, bias), dy)
    for name, a, b in zip(("loss", "dhidden", "dweight", "dbias"), first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_without_gradients(device):
    # No input requires grad (or grad mode is off): the loss alone, equal to the one with.
    hidden, weight, bias, targets = make_inputs(40, 97, 8, torch.float32, device)
    plain = fused_linear_cross_entropy(hidden, weight, targets, bias)
    assert not plain.requires_grad
    with torch.no_grad():
        leaf = weight.clone().requires_grad_()
        no_grad = fused_linear_cross_entropy(hidden, leaf, targets, bias)
    with_grad = fused_linear_cross_entropy(hidden, weight.clone().requires_grad_(), targets, bias)
    assert torch.equal(plain, no_grad) and torch.equal(plain, with_grad.detach())


def test_empty_batch(device):
    hidden = torch.randn(0, 8, device=device, requires_grad=True)
    weight = torch.randn(97, 8, device=device, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long, device=device)
    assert torch.isnan(fused_linear_cross_entropy(hidden, weight, targets))  # as torch: 0 / 0
    loss = fused_linear_cross_entropy(hidden, weight, targets, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(weight.grad, torch.zeros_like(weight))
    assert fused_linear_cross_entropy(hidden, weight, targets, reduction="none").shape == (0,)


def test_torch_compile_fullgraph(device):
    # The op, its fake and its autograd formula trace into one graph (aot_eager: no inductor).
    hidden, weight, bias, targets = make_inputs(20, 97, 8, torch.float32, device)
    dy = upstream("mean", 20)
    loss_fn = lambda h, w, b: fused_linear_cross_entropy(h, w, targets, b)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager = outputs_and_grads(loss_fn, (hidden, weight, bias), dy)
    for a, b in zip(outputs_and_grads(compiled, (hidden, weight, bias), dy), eager, strict=True):
        assert torch.equal(a, b)


def test_chunk_rule_at_gpt2_shapes():
    # A chunk's logits fit LOGITS_BUDGET_BYTES (256 MiB): gpt2-small's head at 8k tokens in
    # bf16 runs in 4 chunks of 2048 rows; fp32 halves the rows; the rows are then shared
    # equally between the chunks; never more rows than N.
    budget = 256 << 20
    assert budget == ce.LOGITS_BUDGET_BYTES
    for n, itemsize, chunks in ((8192, 2, 4), (16384, 2, 7), (8192, 4, 7), (16384, 4, 13)):
        rows = ce._chunk_rows(n, GPT2_VOCAB, itemsize)
        assert -(-n // rows) == chunks and rows * GPT2_VOCAB * itemsize <= budget, (n, rows)
    assert ce._chunk_rows(8192, GPT2_VOCAB, 2) == 2048
    assert ce._chunk_rows(4097, 97, 4) == 4097  # a small vocabulary: one chunk
    assert ce._chunk_rows(17, 97, 4) == 17


# --- memory ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["torch", "kernel"])
def test_peak_memory_is_one_chunk_not_all_logits(path, monkeypatch):
    # Count every CPU allocation while forward+backward runs: the fused loss's peak must stay
    # far below the (N, V) fp32 logits (which the unfused loss holds several of), and at least
    # one chunk's logits (else the counter did not see inside the op and proves nothing).
    n, v, d = (8192, 4096, 16) if path == "torch" else (2048, 2048, 16)
    fn = chunked_torch if path == "torch" else fused_linear_cross_entropy
    if path == "kernel":
        monkeypatch.setattr(ce, "CHUNK_ROWS", 256)
    else:  # the budget scaled down with the sizes: 8 chunks, as at GPT-2's 16k tokens
        monkeypatch.setattr(ce, "LOGITS_BUDGET_BYTES", n * v * 4 // 8)
    rows = ce._chunk_rows(n, v, 4)
    hidden, weight, _, targets = make_inputs(n, v, d, torch.float32, "cpu", bias=False)
    hidden.requires_grad_()
    weight.requires_grad_()
    logits_bytes = n * v * 4
    chunk_bytes = rows * v * 4
    assert n // rows >= 8

    def fused():
        fn(hidden, weight, targets).backward()

    def unfused():
        fused_linear_cross_entropy_reference(hidden, weight, targets).backward()

    fused_peak, unfused_peak = cpu_peak_bytes(fused), cpu_peak_bytes(unfused)
    assert unfused_peak >= 2 * logits_bytes
    assert chunk_bytes <= fused_peak < logits_bytes / 2, (fused_peak, chunk_bytes, logits_bytes)
    assert fused_peak < 4 * chunk_bytes + 4 * (n + v) * d * 4  # the chunk, gradients, copies


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_allocates_only_the_gradients(dtype, reduction, monkeypatch):
    # "mean"/"sum" compute the gradients in forward; backward only scales them. Counted over
    # backward alone, with a wide vocabulary so that grad_weight (V, d) dominates: the returned
    # gradients in their dtypes, plus for bf16 one block's fp32 temporaries (the upcast and
    # the product, 4 bytes each). No zero-filled gradients of the op's other outputs (autograd
    # materializes those unless told not to), no whole fp32 copy of grad_weight before its
    # rounding to a bf16 weight.
    monkeypatch.setattr(ce, "SCALE_BLOCK_ELEMENTS", 1 << 14)  # blocks of 512 rows of 32
    n, v, d = 64, 8192, 32
    hidden, weight, _, targets = make_inputs(n, v, d, dtype, "cpu", bias=False)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss = chunked_torch(hidden, weight, targets, reduction=reduction)
    size = dtype.itemsize
    grads = (n + v) * d * size  # grad_hidden and grad_weight as returned
    block = 0 if dtype == torch.float32 else 2 * ce.SCALE_BLOCK_ELEMENTS * 4
    peak = cpu_peak_bytes(loss.backward)
    assert grads <= peak <= grads + block + (16 << 10), (peak, grads)
    assert weight.grad.dtype == dtype and hidden.grad.dtype == dtype  # (their values: above)


def test_a_retained_graph_gives_the_same_gradients_twice():
    # The gradients forward saved are scaled into new tensors, never in place: a second
    # backward of the same graph adds the very same values again (doubling is exact).
    hidden, weight, bias, targets = make_inputs(40, 97, 8, torch.float32, "cpu")
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    loss = chunked_torch(hidden, weight, targets, bias)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    loss.backward()
    for t, g in zip(leaves, first, strict=True):
        assert torch.equal(t.grad, 2 * g)


# --- bad input --------------------------------------------------------------------------------


def test_bad_inputs(device):
    h = torch.randn(4, 8, device=device)
    w = torch.randn(10, 8, device=device)
    t = torch.tensor([0, 9, -100, 3], device=device)
    f = fused_linear_cross_entropy
    with pytest.raises(TypeError, match="hidden must be float32"):
        f(h.long(), w, t)
    with pytest.raises(TypeError, match=r"weight must have hidden's dtype torch\.float32"):
        f(h, w.half(), t)
    with pytest.raises(TypeError, match="bias must have hidden's dtype"):
        f(h, w, t, torch.zeros(10, dtype=torch.float16, device=device))
    with pytest.raises(TypeError, match="targets must be int64"):
        f(h, w, t.int())
    with pytest.raises(ValueError, match=r"one device.*targets on meta"):
        f(h, w, torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"hidden must be 2-D \(N, d\), got shape \(2, 2, 8\)"):
        f(h.reshape(2, 2, 8), w, t)
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 8\).*got \(10, 7\)"):
        f(h, w[:, :7], t)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\).*got \(9,\)"):
        f(h, w, t, torch.zeros(9, device=device))
    with pytest.raises(ValueError, match=r"targets must have shape \(4,\).*got \(3,\)"):
        f(h, w, t[:3])
    with pytest.raises(ValueError, match="reduction must be one of"):
        f(h, w, t, reduction="avg")
    for bad, where in ((10, 1), (-1, 2), (2**40, 3)):
        t_bad = t.clone()
        t_bad[where] = bad
        with pytest.raises(ValueError, match=rf"targets\[{where}\] = {bad} is outside .*\[0, 10\)"):
            f(h, w, t_bad)
        with pytest.raises(ValueError, match=r"is outside"):
            chunked_torch(h, w, t_bad)


# --- a padded head --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["torch", "kernel"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_padded_head_is_the_unpadded_loss(path, reduction, device, monkeypatch):
    # weight padded from 97 to 128 rows of random values (vocab_multiple=64's 50257 -> 50304 in
    # small), num_classes=97, in 3 chunks: the loss and the gradients of hidden and of the first
    # 97 rows of weight and bias are the unpadded loss's on the same path (sums with zeros
    # added: to fp32 rounding); the padding rows' gradients are exactly 0.
    monkeypatch.setattr(ce, "CHUNK_ROWS", 7)
    fn = chunked_torch if path == "torch" else fused_linear_cross_entropy
    hidden, weight, bias, targets = make_inputs(20, 97, 16, torch.float32, device)
    g = torch.Generator().manual_seed(5)
    pad_w, pad_b = torch.randn(31, 16, generator=g) * 3, torch.randn(31, generator=g) * 3
    padded_w = torch.cat([weight, pad_w.to(device)])
    padded_b = torch.cat([bias, pad_b.to(device)])
    dy = upstream(reduction, 20)
    kw = {"reduction": reduction}
    plain = outputs_and_grads(
        lambda h, w, b: fn(h, w, targets, b, **kw), (hidden, weight, bias), dy
    )
    padded = outputs_and_grads(
        lambda h, w, b: fn(h, w, targets, b, num_classes=97, **kw), (hidden, padded_w, padded_b), dy
    )
    for got, want in zip(padded, plain, strict=True):  # the same sums, with zeros added
        torch.testing.assert_close(got[: len(want)] if got.dim() else got, want)
    assert not padded[2][97:].any() and not padded[3][97:].any()
    bad = targets.clone()
    bad[3] = 100  # a padding row is no class
    with pytest.raises(ValueError, match=r"targets\[3\] = 100 is outside .*\[0, 97\)"):
        fn(hidden, padded_w, bad, padded_b, num_classes=97)
    for wrong in (0, 129, 2.0):
        with pytest.raises(ValueError, match=r"num_classes must be an int in \[1, 128\]"):
            fn(hidden, padded_w, targets, padded_b, num_classes=wrong)


# --- the fp32 grad_weight is accumulated in place -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grad_weight_is_one_accumulator_for_all_chunks(dtype, monkeypatch):
    # Every tensor any op makes inside the chunk loop, counted by shape: across 5 chunks one
    # (V, d) tensor (the fp32 accumulator, zero-filled once) and no other of its size. A fp16
    # product rounded and added per chunk (CPU has no fp32-out addmm) goes block by block.
    from torch.utils._python_dispatch import TorchDispatchMode

    def n_elements(shape):
        return torch.Size(shape).numel()

    monkeypatch.setattr(ce, "CHUNK_ROWS", 8)
    monkeypatch.setattr(ce, "SCALE_BLOCK_ELEMENTS", 64 * 16)
    n, v, d = 40, 256, 16
    hidden, weight, _, targets = make_inputs(n, v, d, dtype, "cpu", bias=False)
    made = []

    class NewTensors(TorchDispatchMode):  # outputs in storage no input of the op owns
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [*args, *(kwargs or {}).values()]
            owned = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in owned:
                    made.append((str(func), tuple(t.shape)))
            return out

    one = torch.ones(1)
    with NewTensors():
        _, _, grad_weight, _ = ce._chunked(hidden, weight, None, targets, one, -100, v, True, False)
    assert [shape for _, shape in made].count((v, d)) == 1, made
    assert all(n_elements(shape) < v * d for _, shape in made if shape != (v, d)), made
    assert grad_weight.dtype == torch.float32
    want = torch.zeros(v, d)
    for start in range(0, n, 8):
        z = (hidden[start : start + 8].float() @ weight.float().T).softmax(-1)
        rows = torch.arange(z.shape[0])
        t = targets[start : start + 8]
        z[rows[t >= 0], t[t >= 0]] -= 1
        z[t < 0] = 0
        want += z.T @ hidden[start : start + 8].float()
    torch.testing.assert_close(grad_weight, want, atol=5e-3 if dtype == torch.float16 else 1e-5,
                               rtol=1e-2 if dtype == torch.float16 else 1e-5)  # fmt: skip
