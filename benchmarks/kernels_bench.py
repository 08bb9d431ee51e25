"""Kernel benchmarks: LayerNorm, GELU, bias+GELU and causal attention against PyTorch.

Each case is timed forward ("fwd"), backward alone ("bwd": the backward of one stored forward,
the Triton tutorials' convention) and forward+backward ("fwd+bwd"), with inputs that require
grad as in training.

On CUDA the providers are:

- LayerNorm / GELU / bias+GELU: ours (`kernels.layer_norm`, `gelu`, `bias_gelu`), PyTorch eager
  (`F.layer_norm`, `F.gelu(approximate="tanh")`, `F.gelu(x + b, ...)`) and `torch.compile` of
  the same eager function (compiled afresh for every shape and dtype, `dynamic=False`); the
  fused residual add + LayerNorm (`kernels.add_layer_norm`) against `r + x` then
  `F.layer_norm`, eager and compiled.
  Reported as ms, GB/s of the bytes the op must move (`harness.memory_bound_bytes`) and % of
  the copy bandwidth measured in the same run.
- Attention (causal): ours (`kernels.attention`), `F.scaled_dot_product_attention` pinned to
  each backend (flash, memory-efficient, cuDNN; a backend that rejects the shape is recorded as
  skipped) and the book's plain attention (scores, mask, softmax, weighted sum; skipped when its
  T×T score matrices would not fit). Reported as ms, TFLOP/s (`harness.attention_flops`) and %
  of the bf16 matmul TFLOP/s measured in the same run. Its varlen rows (`bench_attention_varlen`):
  16 documents of mixed lengths packed into 16k tokens, `kernels.attention_varlen` against the
  padded batch through `kernels.attention` and SDPA with a block-diagonal mask.

On CPU Triton kernels are never timed (the interpreter measures Python, not the kernel): "ours"
is then fastgpt's `backend="torch"` path, the plain-PyTorch references in `kernels/`, timed in
fp32 against PyTorch's own CPU ops.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from fastgpt.benchmarks import harness
from tqdm import tqdm

MODES = ("fwd", "bwd", "fwd+bwd")
# Tensors of (rows, width) the fused residual add + LayerNorm must move: forward reads x and
# the residual and writes normed and the new residual; backward reads dnormed, dnew_residual
# and the new residual and writes the one gradient of x and residual.
ADD_LAYER_NORM_TENSORS = {"fwd": 4, "bwd": 4, "fwd+bwd": 8}


# --- grids ---------------------------------------------------------------------------------


def _only_dtypes(grid: dict[str, Any], dtypes: tuple[str, ...] | None) -> dict[str, Any]:
    """The grid with its dtypes narrowed to `dtypes` (unknown names raise ValueError)."""
    if dtypes is None:
        return grid
    unknown = [d for d in dtypes if d not in harness.DTYPES]
    if unknown:
        raise ValueError(f"unknown dtype {unknown}; choose from {', '.join(harness.DTYPES)}")
    return {**grid, "dtypes": list(dtypes)}


def rowwise_grid(device: torch.device, quick: bool) -> dict[str, list]:
    """Shapes and dtypes of the LayerNorm / GELU benchmarks."""
    if device.type == "cuda":
        if quick:
            return {"rows": [16384], "widths": [768, 4096], "dtypes": ["bf16"]}
        return {
            "rows": [4096, 16384, 65536],
            "widths": [768, 1024, 1280, 1600, 4096],
            "dtypes": ["bf16", "fp16"],
        }
    if quick:
        return {"rows": [1024], "widths": [768], "dtypes": ["fp32"]}
    return {"rows": [4096], "widths": [768, 1024, 1600, 4096], "dtypes": ["fp32"]}


def attention_grid(device: torch.device, quick: bool) -> dict[str, list]:
    """Attention shapes: (heads, head_dim) pairs of GPT-2 small/medium/large/xl (64-dim heads)
    and a 128-dim-head case; batch = tokens_per_batch // T so every length moves about the same
    number of tokens (as the Triton and FlashAttention benchmarks do)."""
    if device.type == "cuda":
        if quick:
            return {
                "heads_dims": [(12, 64), (16, 128)],
                "seq_lens": [1024, 4096],
                "dtypes": ["bf16"],
                "tokens_per_batch": 16384,
            }
        return {
            "heads_dims": [(12, 64), (16, 64), (20, 64), (25, 64), (16, 128)],
            "seq_lens": [512, 1024, 2048, 4096, 8192, 16384],
            "dtypes": ["bf16", "fp16"],
            "tokens_per_batch": 16384,
        }
    if quick:
        return {
            "heads_dims": [(12, 64)],
            "seq_lens": [128],
            "dtypes": ["fp32"],
            "tokens_per_batch": 128,
        }
    return {
        "heads_dims": [(12, 64)],
        "seq_lens": [256, 512, 1024],
        "dtypes": ["fp32"],
        "tokens_per_batch": 1024,
    }


# --- one measurement -------------------------------------------------------------------------


def measure_modes(
    forward: Callable[[], torch.Tensor],
    leaves: list[torch.Tensor],
    device: torch.device,
    quick: bool,
) -> Iterator[tuple[str, float, float | None]]:
    """Yield (mode, median ms, peak MiB) for fwd, bwd and fwd+bwd of `forward()`, whose inputs
    `leaves` require grad. Raises what `forward` raises (the caller records skips)."""
    rep_ms = 40.0 if quick else 100.0
    with torch.no_grad():  # only the outputs' shapes and dtypes; keep no graph alive
        out = forward()  # a tensor, or a tuple of them (each gets a gradient)
        dy = [torch.randn_like(o) for o in out] if isinstance(out, tuple) else torch.randn_like(out)

    def fwd_bwd() -> None:
        torch.autograd.backward(forward(), dy)

    for t in leaves:
        t.grad = None
    fwd_peak = harness.peak_memory_mb(forward, device)
    yield "fwd", harness.time_ms(forward, device, rep_ms=rep_ms), fwd_peak

    # One plain forward+backward before any retain_graph=True backward: it compiles the
    # backward of a torch.compile'd function (AOTAutograd refuses to compile a backward with
    # donated buffers under retain_graph=True) and gives the peak memory of a training step.
    full_peak = harness.peak_memory_mb(fwd_bwd, device)
    if full_peak is None:
        fwd_bwd()
    for t in leaves:
        t.grad = None
    y = forward()
    bwd_ms = harness.time_ms(
        lambda y=y: torch.autograd.backward(y, dy, retain_graph=True),
        device,
        rep_ms=rep_ms,
        grad_to_none=leaves,
    )
    del y  # frees the retained graph
    yield "bwd", bwd_ms, full_peak
    yield "fwd+bwd", harness.time_ms(fwd_bwd, device, rep_ms=rep_ms, grad_to_none=leaves), full_peak


def measured(
    suite: str, case: dict[str, Any], provider: str, role: str, **metrics: Any
) -> dict[str, Any]:
    """The record of a case that ran (see `benchmarks/report.py`): metrics such as ms=..."""
    record = {"suite": suite, "case": case, "provider": provider, "role": role}
    return {**record, "status": "ok", "note": None, **metrics}


def skipped(suite: str, case: dict[str, Any], provider: str, role: str, note: str) -> dict:
    """The record of a case that could not run, with the reason in "note"."""
    record = {"suite": suite, "case": case, "provider": provider, "role": role}
    return {**record, "status": "skipped", "note": note}


def skipped_modes(
    suite: str,
    base_case: dict[str, Any],
    provider: str,
    role: str,
    exc: BaseException,
    records: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Skip records for the modes of (base_case, provider) that have no record yet (a failure
    in backward keeps the forward that ran)."""
    done = {
        r["case"]["mode"]
        for r in records
        if r["provider"] == provider and {**r["case"], "mode": None} == {**base_case, "mode": None}
    }
    note = short_error(exc)
    return [
        skipped(suite, {**base_case, "mode": m}, provider, role, note)
        for m in MODES
        if m not in done
    ]


def short_error(exc: BaseException) -> str:
    if harness.is_out_of_memory(exc):
        return "out of memory"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first[:160]}"


# --- LayerNorm and GELU --------------------------------------------------------------------


def _rowwise_providers(op: str, device: torch.device) -> list[tuple[str, str, Callable]]:
    """(name, role, fn) for one row-wise op. fn(x, weight, bias) -> y; GELU ignores weight and
    GELU without bias ignores bias too; the fused add + LayerNorm is fn(x, weight, bias,
    residual) -> (normed, residual + x)."""
    from fastgpt.kernels import (
        add_layer_norm,
        add_layer_norm_reference,
        bias_gelu,
        bias_gelu_reference,
        gelu,
        gelu_reference,
        layer_norm,
        layer_norm_reference,
    )

    if op == "layernorm":
        ours = lambda x, w, b: layer_norm(x, w, b, 1e-5)
        ref = lambda x, w, b: layer_norm_reference(x, w, b, 1e-5)

        def eager(x, w, b):
            return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)

    elif op == "add_layernorm":
        ours = lambda x, w, b, r: add_layer_norm(x, r, w, b, 1e-5)
        ref = lambda x, w, b, r: add_layer_norm_reference(x, r, w, b, 1e-5)

        def eager(x, w, b, r):
            new_residual = r + x  # the unfused pair: the add, then F.layer_norm
            return F.layer_norm(new_residual, (x.shape[-1],), w, b, 1e-5), new_residual

    elif op == "gelu":
        ours = lambda x, w, b: gelu(x)
        ref = lambda x, w, b: gelu_reference(x)

        def eager(x, w, b):
            return F.gelu(x, approximate="tanh")

    elif op == "bias_gelu":
        ours = lambda x, w, b: bias_gelu(x, b)
        ref = lambda x, w, b: bias_gelu_reference(x, b)

        def eager(x, w, b):
            return F.gelu(x + b, approximate="tanh")

    else:
        raise ValueError(f"unknown op {op!r}")

    if device.type == "cuda":
        return [
            ("fastgpt", "ours", ours),
            ("torch eager", "baseline", eager),
            ("torch.compile", "baseline", ("compile", eager)),
        ]
    # CPU: our torch backend (the references) against PyTorch's CPU ops; no Triton, no compile.
    return [
        ("fastgpt torch backend", "ours", ref),
        ("torch eager", "baseline", eager),
    ]


def _compiled(fn: Callable) -> Callable:
    """A fresh torch.compile of fn for one shape and dtype. Dynamo's caches are reset first so
    every case compiles its own static-shape kernels (and never falls back to eager after the
    recompile limit)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def no_donated_buffers() -> contextlib.AbstractContextManager:
    """Compile without AOTAutograd's donated buffers while it is entered.

    A compiled backward that reuses ("donates") the memory of saved activations refuses to run
    under retain_graph=True, which timing backward alone needs. Turning donation off costs the
    compiled baseline at most that reuse in peak memory, not time. Entered around the whole
    measurement of a compiled provider (not per call, which would add Python overhead)."""
    try:
        import torch._functorch.config as functorch_config
    except ImportError:  # a torch without AOTAutograd's config: nothing to turn off
        return contextlib.nullcontext()
    if not hasattr(functorch_config, "donated_buffer"):
        return contextlib.nullcontext()
    return functorch_config.patch(donated_buffer=False)


def bench_rowwise(
    suite: str,
    ops: tuple[str, ...],
    device: torch.device,
    hardware: dict[str, Any],
    options: harness.RunOptions,
) -> list[dict[str, Any]]:
    """LayerNorm and the fused residual add + LayerNorm (suite "layernorm", ops ("layernorm",
    "add_layernorm")) or GELU (suite "gelu", ops ("gelu", "bias_gelu")) over the grid of
    `rowwise_grid`."""
    quick = options.quick
    grid = _only_dtypes(rowwise_grid(device, quick), options.dtypes)
    cases = [
        (op, dtype, rows, width)
        for op in ops
        for dtype in grid["dtypes"]
        for rows in grid["rows"]
        for width in grid["widths"]
    ]
    records: list[dict[str, Any]] = []
    copy_gbps = hardware["copy_bandwidth_gbps"]
    for op, dtype_name, rows, width in tqdm(cases, desc=suite, leave=False):
        dtype = harness.DTYPES[dtype_name]
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(rows, width, generator=gen, dtype=torch.float32).to(device, dtype)
        w = (1 + 0.1 * torch.randn(width, generator=gen)).to(device, dtype)
        b = (0.1 * torch.randn(width, generator=gen)).to(device, dtype)
        extra = []  # the fused add + LayerNorm's residual stream (rows, width)
        if op == "add_layernorm":
            extra = [torch.randn(rows, width, generator=gen).to(device, dtype)]
        leaves = [x, w, b] if op == "layernorm" else ([x, b] if op == "bias_gelu" else [x])
        leaves = [x, w, b, *extra] if extra else leaves
        for t in leaves:
            t.requires_grad_(True)
        for provider, role, fn in _rowwise_providers(op, device):
            stack = contextlib.ExitStack()
            base_case = {"op": op, "dtype": dtype_name, "rows": rows, "width": width}
            compiled = isinstance(fn, tuple)  # ("compile", eager fn)
            try:
                if compiled:
                    stack.enter_context(no_donated_buffers())
                    fn = _compiled(fn[1])
                forward = lambda fn=fn, x=x, w=w, b=b, extra=extra: fn(x, w, b, *extra)
                for mode, ms, peak in measure_modes(forward, leaves, device, quick):
                    moved = harness.memory_bound_bytes(mode, x.numel(), x.element_size())
                    if extra:  # x, residual -> normed, new residual; back: 3 in, 1 out
                        moved = ADD_LAYER_NORM_TENSORS[mode] * x.numel() * x.element_size()
                    gbps = harness.throughput(moved, ms) / 1e9
                    records.append(
                        measured(
                            suite,
                            {**base_case, "mode": mode},
                            provider,
                            role,
                            ms=ms,
                            bytes_moved=moved,
                            gbps=gbps,
                            pct_copy_bw=100.0 * gbps / copy_gbps,
                            peak_mem_mb=peak,
                        )
                    )
            except Exception as exc:  # a provider that cannot run this case is reported
                records += skipped_modes(suite, base_case, provider, role, exc, records)
            finally:
                stack.close()
                for t in leaves:
                    t.grad = None
        del x, w, b, leaves
        harness.free_memory(device)
        options.save(records)
    return records


def bench_layernorm(
    device: torch.device, hardware: dict[str, Any], options: harness.RunOptions
) -> list[dict]:
    return bench_rowwise("layernorm", ("layernorm", "add_layernorm"), device, hardware, options)


def bench_gelu(
    device: torch.device, hardware: dict[str, Any], options: harness.RunOptions
) -> list[dict]:
    return bench_rowwise("gelu", ("gelu", "bias_gelu"), device, hardware, options)


# --- attention -----------------------------------------------------------------------------


def book_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The book's causal attention in the inputs' dtype: scores q·kᵀ/√D (B, H, T, T), -inf
    above the diagonal, softmax, weighted sum of v -> (B, H, T, D)."""
    t, d = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-2, -1)  # (B, H, T, T)
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=q.device), diagonal=1)
    scores = scores.masked_fill(mask, float("-inf"))
    weights = torch.softmax(scores / math.sqrt(d), dim=-1)  # (B, H, T, T)
    return weights @ v  # (B, H, T, D)


def book_attention_bytes(batch: int, heads: int, seq_len: int, element_size: int) -> int:
    """Rough peak of `book_attention` forward+backward: about four live (B, H, T, T) tensors
    (scores, masked scores, softmax weights, and their gradient) plus the T×T mask."""
    return 4 * batch * heads * seq_len * seq_len * element_size + seq_len * seq_len


def _attention_providers(device: torch.device) -> list[tuple[str, str, Callable]]:
    from fastgpt.kernels import attention, attention_reference

    if device.type != "cuda":
        return [
            (
                "fastgpt torch backend",
                "ours",
                lambda q, k, v: attention_reference(q, k, v, causal=True),
            ),
            (
                "torch SDPA (default)",
                "baseline",
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            ),
            ("book attention", "baseline", book_attention),
        ]

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_with(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return run

    return [
        ("fastgpt", "ours", lambda q, k, v: attention(q, k, v, causal=True)),
        ("SDPA flash", "baseline", sdpa_with(SDPBackend.FLASH_ATTENTION)),
        ("SDPA mem-efficient", "baseline", sdpa_with(SDPBackend.EFFICIENT_ATTENTION)),
        ("SDPA cuDNN", "baseline", sdpa_with(SDPBackend.CUDNN_ATTENTION)),
        ("book attention", "baseline", book_attention),
    ]


def bench_attention(
    device: torch.device, hardware: dict[str, Any], options: harness.RunOptions
) -> list[dict]:
    """Causal attention over `attention_grid`: q, k, v contiguous (B, H, T, D)."""
    quick = options.quick
    grid = _only_dtypes(attention_grid(device, quick), options.dtypes)
    cases = [
        (dtype, heads, head_dim, seq_len)
        for dtype in grid["dtypes"]
        for heads, head_dim in grid["heads_dims"]
        for seq_len in grid["seq_lens"]
    ]
    peak_flops = hardware["matmul_tflops"] * 1e12
    records: list[dict[str, Any]] = []
    for dtype_name, heads, head_dim, seq_len in tqdm(cases, desc="attention", leave=False):
        dtype = harness.DTYPES[dtype_name]
        batch = max(1, grid["tokens_per_batch"] // seq_len)
        gen = torch.Generator(device="cpu").manual_seed(0)
        shape = (batch, heads, seq_len, head_dim)  # (B, H, T, D)
        q, k, v = (
            torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(True)
            for _ in range(3)
        )
        base_case = {
            "dtype": dtype_name,
            "batch": batch,
            "heads": heads,
            "head_dim": head_dim,
            "seq_len": seq_len,
        }
        for provider, role, fn in _attention_providers(device):
            if provider == "book attention" and device.type == "cuda":
                need = book_attention_bytes(batch, heads, seq_len, q.element_size())
                free, _ = torch.cuda.mem_get_info(device)
                if need > 0.8 * free:
                    note = (
                        f"would need ~{need / 2**30:.0f} GiB of T×T scores, "
                        f"{free / 2**30:.0f} GiB free"
                    )
                    records += [
                        skipped("attention", {**base_case, "mode": m}, provider, role, note)
                        for m in MODES
                    ]
                    continue
            try:
                with warnings.catch_warnings():  # a rejected SDPA backend warns, then raises
                    warnings.simplefilter("ignore")
                    with torch.no_grad():
                        fn(q, k, v)  # probe: record a skip if this backend refuses the shape
                forward = lambda fn=fn, q=q, k=k, v=v: fn(q, k, v)
                for mode, ms, peak in measure_modes(forward, [q, k, v], device, quick):
                    flops = harness.attention_flops(batch, heads, seq_len, head_dim, True, mode)
                    tflops = harness.throughput(flops, ms) / 1e12
                    records.append(
                        measured(
                            "attention",
                            {**base_case, "mode": mode},
                            provider,
                            role,
                            ms=ms,
                            flops=flops,
                            tflops=tflops,
                            pct_matmul=100.0 * tflops * 1e12 / peak_flops,
                            peak_mem_mb=peak,
                        )
                    )
            except Exception as exc:  # backend rejects the shape, or out of memory
                records += skipped_modes("attention", base_case, provider, role, exc, records)
            finally:
                for t in (q, k, v):
                    t.grad = None
                harness.free_memory(device)
        del q, k, v
        harness.free_memory(device)
        options.save(records)
    records += bench_attention_varlen(device, peak_flops, quick, grid["dtypes"])
    options.save(records)
    return records


# --- attention over packed documents (varlen) ----------------------------------------------


def varlen_document_lengths(total: int, count: int) -> list[int]:
    """`count` document lengths of mixed sizes (proportional to 1, 2, ..., count) summing to
    `total`: fixed, so that every run times the same packing."""
    weights = range(1, count + 1)
    lengths = [max(1, total * w // sum(weights)) for w in weights]
    lengths[-1] += total - sum(lengths)
    return lengths


def _varlen_providers(device, lengths, heads, head_dim, dtype):
    """(provider, role, leaves, forward) for causal attention over the packed `lengths`: ours on
    the packed (total, H, D) tensors; the batch padded to the longest document (B, H, max, D)
    through `attention`; SDPA over the whole packed axis with a block-diagonal causal mask
    (1, H, total, D). On CPU ours is the torch backend (`attention_varlen_reference`) and the
    padded batch goes through SDPA too; each name says which SDPA call it is."""
    from fastgpt.kernels import attention, attention_varlen, attention_varlen_reference

    total, longest = sum(lengths), max(lengths)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def leaves(*shape):
        return [torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() for _ in "qkv"]

    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), cu.diff().long())
    allowed = (doc[:, None] == doc[None, :]).tril()  # (total, total) block-diagonal causal
    packed = leaves(total, heads, head_dim)  # (total, H, D) each
    batch = leaves(len(lengths), heads, longest, head_dim)  # (B, H, max, D) each
    whole = leaves(1, heads, total, head_dim)  # (1, H, total, D) each
    if device.type == "cuda":
        ours, varlen = "fastgpt varlen", attention_varlen
        padded, pad_name = attention, "attention (padded batch)"
        mask_name = "SDPA block-diagonal mask"
    else:
        ours, varlen = "fastgpt torch backend", attention_varlen_reference
        pad_name, mask_name = "torch SDPA, padded batch", "torch SDPA, block-diagonal mask"

        def padded(q, k, v, causal):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return [
        (ours, "ours", packed, lambda: varlen(*packed, cu, cu, longest, longest)),
        (pad_name, "baseline", batch, lambda: padded(*batch, causal=True)),
        (
            mask_name,
            "baseline",
            whole,
            lambda: F.scaled_dot_product_attention(*whole, attn_mask=allowed),
        ),
    ]


def bench_attention_varlen(
    device: torch.device, peak_flops: float, quick: bool, dtypes: list[str]
) -> list[dict]:
    """Causal attention over 16 documents of mixed lengths packed into one sequence (16k tokens
    on CUDA, 512 (--quick) or 2048 on CPU): ours (attention_varlen), the padded batch, SDPA
    with a block-diagonal mask; the records' case says layout="varlen, 16 documents" and
    seq_len = the total tokens. TFLOP/s count the useful work, sum over documents of causal
    attention of each, for every provider."""
    total = 16384 if device.type == "cuda" else (512 if quick else 2048)
    lengths = varlen_document_lengths(total, 16)
    heads_dims = [(12, 64)] if quick or device.type != "cuda" else [(12, 64), (16, 128)]
    records: list[dict[str, Any]] = []
    for dtype_name, (heads, head_dim) in itertools.product(dtypes, heads_dims):
        base_case = {"dtype": dtype_name, "layout": "varlen, 16 documents", "heads": heads,
                     "head_dim": head_dim, "seq_len": total}  # fmt: skip
        dtype = harness.DTYPES[dtype_name]
        for provider, role, leaves, forward in _varlen_providers(
            device, lengths, heads, head_dim, dtype
        ):
            try:
                for mode, ms, peak in measure_modes(forward, leaves, device, quick):
                    flops = sum(
                        harness.attention_flops(1, heads, n, head_dim, True, mode) for n in lengths
                    )
                    tflops = harness.throughput(flops, ms) / 1e12
                    records.append(
                        measured(
                            "attention", {**base_case, "mode": mode}, provider, role, ms=ms,
                            flops=flops, tflops=tflops, peak_mem_mb=peak,
                            pct_matmul=100.0 * tflops * 1e12 / peak_flops,
                        )
                    )  # fmt: skip
            except Exception as exc:  # a backend rejects the mask, or out of memory
                records += skipped_modes("attention", base_case, provider, role, exc, records)
            finally:
                harness.free_memory(device)
    return records
