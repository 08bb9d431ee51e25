"""The checks `fastgpt selftest` runs on a GPU (`gpu_check` plans and runs them): each op and
its gradients against the same-dtype PyTorch computation and a float64 reference, judged by the
tolerance rule (`fastgpt.selftest.tolerance`); the model's logits, torch.compile, training and
generation. Each returns a one-line detail on success and raises CheckFailed naming what broke
the rule. Inputs are seeded: the same sizes give the same numbers."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastgpt.selftest.tolerance import Comparison, compare

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CheckFailed(Exception):
    """A check ran and its result is wrong; the message says what and by how much."""


@dataclass(frozen=True)
class Sizes:
    """Shapes of one selftest run. attention: (B, H, Tq, Tk) of the causal check at every head
    dim; long_t: T of the long-sequence check (head dim 64); widths: LayerNorm/bias-GELU N."""

    name: str
    dtypes: tuple[str, ...]
    head_dims: tuple[int, ...]
    attention: tuple[int, int, int, int]
    long_t: int
    varlen: tuple[int, ...]  # lengths of the packed sequences of the varlen check (H 4, D 64)
    rows: int  # M of LayerNorm / GELU inputs
    widths: tuple[int, ...]
    gelu_width: int
    cross_entropy: tuple[int, int, int]  # (N, d, V) of the fused linear cross-entropy
    model: str  # GPTConfig preset
    model_overrides: tuple[tuple[str, Any], ...]  # GPTConfig fields changed from the preset
    model_dtypes: tuple[str, ...]  # dtypes of the logits check
    model_batch: tuple[int, int]  # (B, T) of the logits and training checks
    train_steps: int
    train_dtype: str
    compile_backend: str  # torch.compile backend: Inductor on a GPU
    prompt: tuple[int, int]  # (B, T) of the generation prompt
    new_tokens: int


# --- helpers -----------------------------------------------------------------------------


def _judge(comparisons: list[Comparison], dtype: torch.dtype) -> str:
    """Raise CheckFailed naming every comparison that broke the rule; else the worst ratio."""
    failed = [c for c in comparisons if not c.passed]
    if failed:
        raise CheckFailed("; ".join(c.message(dtype) for c in failed))
    worst = max(comparisons, key=lambda c: c.err_kernel / c.bound if c.bound else 0.0)
    return f"worst {worst.name}: error {worst.err_kernel:.2e} <= bound {worst.bound:.2e}"


def _grads(fn: Callable, inputs: list[torch.Tensor], dy: torch.Tensor) -> list[torch.Tensor]:
    """[fn(*inputs), d/d input for each input] for the upstream gradient dy."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y.detach(), *(t.grad for t in leaves)]


def _three_way(ours, same, ref64, inputs, dy, dtype, names) -> str:
    """Run kernel, same-dtype PyTorch and float64 reference; judge output and gradients."""
    a = _grads(ours, inputs, dy)
    s = _grads(same, inputs, dy)
    r = _grads(ref64, [t.double() for t in inputs], dy.double())
    comparisons = [
        compare(x, y, z, dtype=dtype, backward=i > 0, name=names[i])
        for i, (x, y, z) in enumerate(zip(a, s, r, strict=True))
    ]
    return _judge(comparisons, dtype)


def _randn(shape, dtype, device, seed, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + offset).to(device, dtype)


# --- op checks ---------------------------------------------------------------------------


def attention_check(device, dtype, shape, head_dim, causal=True, dropout_p=0.0) -> str:
    """Output and dq/dk/dv of `attention` against the reference (with the kernel's own
    dropout mask when dropout_p > 0). shape: (B, H, Tq, Tk)."""
    from fastgpt.kernels import kernel_dropout_p
    from fastgpt.kernels.flash_attention import (
        attention,
        attention_dropout_mask,
        attention_reference,
    )

    b, h, tq, tk = shape
    q = _randn((b, h, tq, head_dim), dtype, device, 1)
    k = _randn((b, h, tk, head_dim), dtype, device, 2)
    v = _randn((b, h, tk, head_dim), dtype, device, 3)
    dy = _randn((b, h, tq, head_dim), dtype, device, 4)
    seed = 1234
    mask = None
    if dropout_p > 0.0:
        mask = attention_dropout_mask(seed, b, h, tq, tk, dropout_p, device)
    scale, drawn_p = 1.0 / math.sqrt(head_dim), kernel_dropout_p(dropout_p)  # the mask's p
    return _three_way(
        lambda q, k, v: attention(q, k, v, causal, dropout_p=dropout_p, seed=seed),
        lambda q, k, v: attention_reference(q, k, v, causal, scale, drawn_p, mask, False),
        lambda q, k, v: attention_reference(q, k, v, causal, scale, drawn_p, mask),
        [q, k, v],
        dy,
        dtype,
        ("out", "dq", "dk", "dv"),
    )


def varlen_check(device, dtype, lengths, causal=True, dropout_p=0.0) -> str:
    """Output and dq/dk/dv of `attention_varlen` over packed sequences of `lengths` (an empty one
    and one of a single token among them) against its reference, with the kernel's own dropout
    masks when dropout_p > 0. 4 heads of dim 64."""
    from fastgpt.kernels import kernel_dropout_p
    from fastgpt.kernels.flash_attention_varlen import (
        attention_varlen,
        attention_varlen_dropout_mask,
        attention_varlen_reference,
    )

    heads, head_dim, total = 4, 64, sum(lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    longest = max(lengths)
    q, k, v, dy = (_randn((total, heads, head_dim), dtype, device, s) for s in (1, 2, 3, 4))
    seed = 1234
    masks = None
    if dropout_p > 0.0:
        masks = attention_varlen_dropout_mask(seed, cu, cu, heads, dropout_p)
    scale = 1.0 / math.sqrt(head_dim)
    args = (cu, cu, longest, longest, causal, scale, kernel_dropout_p(dropout_p))  # the masks' p
    return _three_way(
        lambda q, k, v: attention_varlen(q, k, v, *args, seed=seed),
        lambda q, k, v: attention_varlen_reference(
            q, k, v, *args, dropout_masks=masks, upcast=False
        ),
        lambda q, k, v: attention_varlen_reference(q, k, v, *args, dropout_masks=masks),
        [q, k, v],
        dy,
        dtype,
        ("out", "dq", "dk", "dv"),
    )


def layer_norm_check(device, dtype, rows, width) -> str:
    """layer_norm's y, dx, dweight, dbias against F.layer_norm and the float64 reference."""
    import torch.nn.functional as F

    from fastgpt.kernels.normalization import layer_norm, layer_norm_reference

    x = _randn((rows, width), dtype, device, 1, scale=2.0, offset=0.5)
    w = _randn((width,), dtype, device, 2, scale=0.5, offset=1.0)
    bias = _randn((width,), dtype, device, 3, scale=0.5)
    dy = _randn((rows, width), dtype, device, 4)
    return _three_way(
        layer_norm,
        lambda x, w, b: F.layer_norm(x, (width,), w, b),
        layer_norm_reference,
        [x, w, bias],
        dy,
        dtype,
        ("y", "dx", "dweight", "dbias"),
    )


def gelu_check(device, dtype, rows, width, with_bias) -> str:
    """gelu / bias_gelu forward and gradients against F.gelu(tanh) and the reference."""
    import torch.nn.functional as F

    from fastgpt.kernels.activation import bias_gelu, bias_gelu_reference, gelu, gelu_reference

    x = _randn((rows, width), dtype, device, 1, scale=3.0)
    dy = _randn((rows, width), dtype, device, 4)
    same = lambda x: F.gelu(x, approximate="tanh")
    if not with_bias:
        return _three_way(gelu, same, gelu_reference, [x], dy, dtype, ("y", "dx"))
    bias = _randn((width,), dtype, device, 2)
    return _three_way(
        bias_gelu,
        lambda x, b: same(x + b),
        bias_gelu_reference,
        [x, bias],
        dy,
        dtype,
        ("y", "dx", "dbias"),
    )


def cross_entropy_check(device, dtype, n, d, v) -> str:
    """fused_linear_cross_entropy's loss and its gradients in hidden, weight and bias against
    the unfused loss (logits in `dtype`) and the float64 reference."""
    import torch.nn.functional as F

    from fastgpt.kernels.cross_entropy import (
        fused_linear_cross_entropy,
        fused_linear_cross_entropy_reference,
    )

    hidden = _randn((n, d), dtype, device, 1)
    weight = _randn((v, d), dtype, device, 2, scale=0.05)
    bias = _randn((v,), dtype, device, 3, scale=0.1)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(4)).to(device)
    return _three_way(
        lambda h, w, b: fused_linear_cross_entropy(h, w, targets, b),
        lambda h, w, b: F.cross_entropy(h @ w.T + b, targets).float(),
        lambda h, w, b: fused_linear_cross_entropy_reference(h, w, targets, b),
        [hidden, weight, bias],
        torch.ones((), device=device),
        dtype,
        ("loss", "dhidden", "dweight", "dbias"),
    )


# --- model checks ------------------------------------------------------------------------


def _model(sizes: Sizes, device, backend: str, dtype=torch.float32, seed=0):
    from fastgpt.model import GPTModel
    from fastgpt.model_config import GPTConfig

    torch.manual_seed(seed)
    config = GPTConfig.from_name(sizes.model, **dict(sizes.model_overrides))
    return GPTModel(config, backend=backend).to(device, dtype).eval()


def _tokens(shape, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g).to(device)


def logits_check(sizes: Sizes, device, dtype, backend: str) -> str:
    """Logits of `backend` vs backend="torch" in `dtype`, the torch backend in float64 as the
    reference: the tolerance rule on the whole model."""
    model = _model(sizes, device, backend, dtype)
    ids = _tokens(sizes.model_batch, model.config.vocab_size, device)
    with torch.no_grad():
        ours = model(ids)
        model.set_backend("torch")
        same = model(ids)
        ref = model.double()(ids)
    return _judge([compare(ours, same, ref, dtype=dtype, name="logits")], dtype)


def compile_check(sizes: Sizes, device, backend: str) -> str:
    """torch.compile(fullgraph=True) of the model on `backend`: logits and the first
    parameter's gradient agree with eager (fp32), with no graph break."""
    model = _model(sizes, device, backend)
    ids = _tokens(sizes.model_batch, model.config.vocab_size, device)
    compiled = torch.compile(model, fullgraph=True, backend=sizes.compile_backend)

    def run(m):
        model.zero_grad(set_to_none=True)
        logits = m(ids)
        logits.float().logsumexp(-1).mean().backward()
        first = next(model.parameters())  # the token embedding: every position reaches it
        return logits.detach(), first.grad.clone()

    eager_logits, eager_grad = run(model)
    comp_logits, comp_grad = run(compiled)
    for name, a, b in (("logits", comp_logits, eager_logits), ("grad", comp_grad, eager_grad)):
        err = (a - b).abs().max().item()
        tol = 1e-4 * max(1.0, b.abs().max().item())
        if not err <= tol:
            raise CheckFailed(f"compiled {name} differ from eager by {err:.3e} > {tol:.3e}")
    return "compiled logits and gradients match eager"


def train_check(sizes: Sizes, device, backend: str) -> str:
    """`train_steps` AdamW steps of the model on `backend` under `train_dtype` autocast on one
    fixed batch (fp16 with a loss scaler, as training runs it): finite, decreasing."""
    import torch.nn.functional as F

    model = _model(sizes, device, backend).train()
    b, t = sizes.model_batch
    ids = _tokens((b, t + 1), model.config.vocab_size, device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    autocast_dtype = DTYPES[sizes.train_dtype]
    device_type = torch.device(device).type
    scaler = torch.amp.GradScaler(device_type, enabled=autocast_dtype == torch.float16)
    losses = []
    for _ in range(sizes.train_steps):
        with torch.autocast(device_type=device_type, dtype=autocast_dtype):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    summary = f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps"
    if not all(math.isfinite(x) for x in losses):
        raise CheckFailed(f"non-finite loss: {losses}")
    if not losses[-1] < losses[0]:
        raise CheckFailed(f"loss did not decrease: {summary}")
    return summary


def generate_check(sizes: Sizes, device, backend: str) -> str:
    """Greedy tokens of the model on `backend` with the KV cache == without it (fp32)."""
    from fastgpt.generation import generate

    model = _model(sizes, device, backend)
    prompt = _tokens(sizes.prompt, model.config.vocab_size, device, seed=1)
    with torch.no_grad():
        cached = generate(model, prompt, sizes.new_tokens, use_cache=True)
        plain = generate(model, prompt, sizes.new_tokens, use_cache=False)
    if not torch.equal(cached, plain):
        first = (cached != plain).nonzero()[0].tolist()
        raise CheckFailed(f"cached generation differs from uncached first at (row, pos) {first}")
    return f"{sizes.new_tokens} tokens x {sizes.prompt[0]} prompts identical"
