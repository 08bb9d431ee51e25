"""Loss benchmark: fused linear + cross-entropy against the unfused loss, forward+backward.

The loss of gpt2-small's output head, d = 768, V = 50,257, at N = 8192 and 16384 tokens
(batch 8 and 16 of 1024), bf16 on CUDA (`--dtypes` may add fp16/fp32), fp32 on CPU. Every
provider computes loss(hidden (N, d), weight (V, d), targets (N,)) and its backward into hidden
and weight, as training does:

- ours: `kernels.fused_linear_cross_entropy` (CUDA: the Triton kernel per chunk of rows, the
  N × V logits never exist). On CPU Triton is never timed (the interpreter measures Python):
  there ours is `chunked_linear_cross_entropy_torch`, the same chunks with the PyTorch math per
  chunk, named "fastgpt torch backend"; its memory is the algorithm's, its time not the kernel's.
- torch eager: the unfused loss as fastgpt's engine computes it today,
  `F.cross_entropy((hidden @ weight.T).float(), targets)`.
- torch.compile of that function (compiled afresh per case; on CPU only outside --quick).

Reported: ms of one forward+backward (CUDA: `triton.testing.do_bench`; CPU: perf_counter, one
repetition at the full shapes, which take seconds each), tokens/s, and the peak memory of one
forward+backward with the inputs and gradients included: `torch.cuda.max_memory_allocated` on
CUDA; on CPU `harness.cpu_peak_bytes` (the profiler's allocation records) plus the inputs'
bytes. `peak % of eager` is the provider's peak over torch eager's in the same case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from fastgpt.benchmarks import harness
from fastgpt.benchmarks.kernels_bench import (
    _compiled,
    measured,
    no_donated_buffers,
    short_error,
    skipped,
)
from tqdm import tqdm

SUITE = "loss"
D_MODEL, VOCAB = 768, 50257  # gpt2-small's head


def loss_grid(device: torch.device, quick: bool) -> dict[str, Any]:
    """Token counts, width, vocabulary and dtypes of the loss benchmark."""
    if device.type == "cuda":
        tokens = [8192] if quick else [8192, 16384]
        return {"tokens": tokens, "d": D_MODEL, "vocab": VOCAB, "dtypes": ["bf16"]}
    if quick:  # about a second, for the smoke test: small (one chunk within the budget)
        return {"tokens": [2048], "d": 32, "vocab": 8192, "dtypes": ["fp32"]}
    return {"tokens": [8192, 16384], "d": D_MODEL, "vocab": VOCAB, "dtypes": ["fp32"]}


def unfused_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """The engine's loss today: all (N, V) logits, upcast to fp32, then F.cross_entropy."""
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def _loss_providers(device: torch.device, quick: bool) -> list[tuple[str, str, Any]]:
    """(name, role, fn) with fn(hidden, weight, targets) -> loss; ("compile", fn) marks a
    provider to compile."""
    from fastgpt.kernels import fused_linear_cross_entropy
    from fastgpt.kernels.cross_entropy import chunked_linear_cross_entropy_torch

    if device.type == "cuda":
        return [
            ("fastgpt", "ours", fused_linear_cross_entropy),
            ("torch eager", "baseline", unfused_loss),
            ("torch.compile", "baseline", ("compile", unfused_loss)),
        ]
    providers = [
        ("fastgpt torch backend", "ours", chunked_linear_cross_entropy_torch),
        ("torch eager", "baseline", unfused_loss),
    ]
    if not quick:
        providers.append(("torch.compile", "baseline", ("compile", unfused_loss)))
    return providers


def _measure(
    step: Callable[[], torch.Tensor],
    inputs: list[torch.Tensor],
    leaves: list[torch.Tensor],
    device: torch.device,
    quick: bool,
    compiled: bool,
) -> tuple[float, float, float]:
    """(ms, peak MiB, loss) of `step()` (forward+backward). A warm-up call first (compilation,
    lazy initialisation), except for an eager provider on CPU, whose calls take seconds at the
    full shapes: there the call measuring the peak memory is the warm-up."""
    last: dict[str, torch.Tensor] = {}

    def run() -> None:
        last["loss"] = step()

    if compiled or device.type == "cuda" or quick:
        run()
        for t in leaves:
            t.grad = None
        harness.free_memory(device)
    peak = harness.peak_memory_mb(run, device)
    if peak is None:  # CPU: what step() allocates, plus the inputs alive throughout
        inputs_bytes = sum(t.numel() * t.element_size() for t in inputs)
        peak = (inputs_bytes + harness.cpu_peak_bytes(run)) / 2**20
    if device.type == "cuda":
        ms = harness.time_ms(run, device, rep_ms=50.0 if quick else 200.0, grad_to_none=leaves)
    else:
        ms = harness.time_steps_ms(run, device, warmup=0, reps=3 if quick else 1)
    return ms, peak, float(last["loss"])


def bench_loss(
    device: torch.device, hardware: dict[str, Any], options: harness.RunOptions
) -> list[dict[str, Any]]:
    """Fused vs unfused linear + cross-entropy, forward+backward, over `loss_grid`."""
    del hardware  # the loss suite reports time and memory, no % of a limit
    grid = loss_grid(device, options.quick)
    dtypes = list(options.dtypes) if options.dtypes else grid["dtypes"]
    cases = [(dtype, n) for dtype in dtypes for n in grid["tokens"]]
    d, v = grid["d"], grid["vocab"]
    records: list[dict[str, Any]] = []
    for dtype_name, n in tqdm(cases, desc=SUITE, leave=False):
        dtype = harness.DTYPES[dtype_name]
        gen = torch.Generator(device="cpu").manual_seed(0)
        hidden = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_(True)
        weight = (0.02 * torch.randn(v, d, generator=gen)).to(device, dtype).requires_grad_(True)
        targets = torch.randint(0, v, (n,), generator=gen).to(device)
        leaves = [hidden, weight]
        case = {"dtype": dtype_name, "tokens": n, "d": d, "vocab": v, "mode": "fwd+bwd"}
        case_records = []
        for provider, role, fn in _loss_providers(device, options.quick):
            stack = contextlib.ExitStack()
            compiled = isinstance(fn, tuple)  # ("compile", eager fn)
            try:
                if compiled:
                    stack.enter_context(no_donated_buffers())
                    fn = _compiled(fn[1])

                def step(fn=fn, h=hidden, w=weight, t=targets) -> torch.Tensor:
                    h.grad = w.grad = None
                    loss = fn(h, w, t)
                    loss.backward()
                    return loss.detach()

                inputs = [hidden, weight, targets]
                ms, peak, loss = _measure(step, inputs, leaves, device, options.quick, compiled)
                metrics = {"ms": ms, "tokens_per_s": n / (ms * 1e-3), "peak_mem_mb": peak}
                case_records.append(measured(SUITE, case, provider, role, **metrics, loss=loss))
            except Exception as exc:  # a provider that cannot run this case is reported
                case_records.append(skipped(SUITE, case, provider, role, short_error(exc)))
            finally:
                stack.close()
                for t in leaves:
                    t.grad = None
                harness.free_memory(device)
        eager = next((r for r in case_records if r["provider"] == "torch eager"), None)
        for r in case_records:
            if r["status"] == "ok" and eager is not None and eager["status"] == "ok":
                r["peak_pct_of_eager"] = 100.0 * r["peak_mem_mb"] / eager["peak_mem_mb"]
        records += case_records
        del hidden, weight, targets, leaves
        harness.free_memory(device)
        options.save(records)
    return records
