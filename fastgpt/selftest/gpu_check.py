"""`fastgpt selftest` on a GPU: every op against its reference, then the model end to end.

Checks, in order (`plan` lists them; `--dry-run` prints that list):

1. ops: attention (every head dim, fp32/fp16/bf16, causal, long sequences, non-causal with
   Tq ≠ Tk, dropout, one decoding step), variable-length attention over packed sequences
   (with dropout), LayerNorm, GELU and bias-GELU at GPT-2 widths up to
   the vocabulary, the fused linear cross-entropy at GPT-2's head, each forward and every
   gradient, judged by the tolerance rule
   (`fastgpt.selftest.tolerance`) against a float64 reference and PyTorch in the same dtype.
2. model: GPT-2 small's logits on backend="auto" (on a CPU "triton") against backend="torch"
   (same rule, the torch backend in float64 as the reference), in fp32 and bf16.
3. compile: `torch.compile(fullgraph=True)` of that model; logits and a backward pass against
   eager.
4. train: 20 steps (AdamW, autocast, cross-entropy) on one fixed batch, in the precision the
   training commands pick on that GPU (bf16, or fp16 with a loss scaler below sm_80): every
   loss finite, the last below the first.
5. generate: greedy generation with the KV cache gives exactly the tokens without it.

A GPU below sm_80 (a T4) gets only what it can run (`plan_and_left_out` says what it does not,
and why): no attention checks (the attention ops refuse it; "auto" takes PyTorch's attention
there) and no bf16 check (it has no bf16; its train check runs in fp16).

`GPU` sizes fit about 8 minutes on an H100/H200 (most of it Triton compiling); `SMALL` sizes run
the same code through Triton's interpreter on CPU in the tests. Model weights are random
(seeded): no download, no network.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastgpt.devices import resolve_dtype
from fastgpt.kernels._dispatch import TENSOR_CORE_CAPABILITY
from fastgpt.selftest import op_checks
from fastgpt.selftest.op_checks import DTYPES, CheckFailed, Sizes

GPU = Sizes(
    name="gpu",
    dtypes=("fp32", "fp16", "bf16"),
    head_dims=(8, 16, 32, 48, 64, 80, 96, 128),
    attention=(2, 4, 2048, 2048),
    long_t=8192,
    varlen=(1, 2048, 17, 900, 513, 0, 1000),
    rows=4096,
    widths=(768, 1600, 6400, 50257),
    gelu_width=3072,
    cross_entropy=(4096, 768, 50257),
    model="gpt2-small",
    model_overrides=(),
    model_dtypes=("fp32", "bf16"),
    model_batch=(4, 1024),
    train_steps=20,
    train_dtype="bf16",
    compile_backend="inductor",
    prompt=(2, 32),
    new_tokens=32,
)

SMALL = Sizes(
    name="small",
    dtypes=("fp32", "fp16"),
    head_dims=(8, 16, 64),
    attention=(1, 2, 33, 33),
    long_t=80,
    varlen=(1, 9, 0, 5),
    rows=9,
    widths=(33, 768),
    gelu_width=40,
    cross_entropy=(9, 32, 300),
    model="tiny",
    model_overrides=(),
    # The interpreter has no bf16 arithmetic (numpy lacks the type): bf16 is for the GPU.
    model_dtypes=("fp32",),
    model_batch=(2, 16),
    train_steps=4,
    train_dtype="fp16",
    compile_backend="aot_eager",  # no C++/Triton codegen on CPU: the tracing is what's checked
    prompt=(2, 5),
    new_tokens=6,
)


@dataclass
class Check:
    """One line of the plan: a name, its group and what running it does."""

    group: str
    name: str
    run: Callable[[], str] = field(repr=False)
    dtype: str | None = None  # the dtype it checks, for `--dtypes`; None: not dtype-specific


@dataclass
class Result:
    group: str
    name: str
    status: str  # "pass", "FAIL" (wrong result) or "ERROR" (raised)
    seconds: float
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --- plan and run ------------------------------------------------------------------------


GROUPS = (
    "attention", "attention_varlen", "layer_norm", "gelu", "bias_gelu", "cross_entropy",
    "model", "compile", "train", "generate",
)  # fmt: skip
TENSOR_CORE_GROUPS = ("attention", "attention_varlen")  # the ops with tl.dot: sm_80 on


def plan(
    sizes: Sizes,
    device: str | torch.device,
    groups: tuple[str, ...] = (),
    dtypes: tuple[str, ...] = (),
) -> list[Check]:
    """Every check of one run, in order: the kernels', then the model's; only those of
    `groups` and (for a check in one dtype) of `dtypes` when they are given, and of those only
    what the device can run (`plan_and_left_out` says what it cannot)."""
    return plan_and_left_out(sizes, device, groups, dtypes)[0]


def plan_and_left_out(
    sizes: Sizes,
    device: str | torch.device,
    groups: tuple[str, ...] = (),
    dtypes: tuple[str, ...] = (),
) -> tuple[list[Check], list[str]]:
    """`plan`'s checks, and what it leaves out of the picked ones because the device cannot
    run them, and why: one line each (none on a GPU from sm_80 on, or without CUDA)."""
    return _for_device(_picked(sizes, device, groups, dtypes), device)


def _for_device(checks: list[Check], device: str | torch.device) -> tuple[list[Check], list[str]]:
    """The checks the device runs, and a line for each kind it cannot (`_unsupported`)."""
    lines = []
    for kind, why, cannot_run in _unsupported(_capability(device)):
        if removed := [c for c in checks if cannot_run(c)]:
            groups = ", ".join(dict.fromkeys(c.group for c in removed))
            lines.append(f"left out: {len(removed)} {kind}checks of {groups}: {why}")
            checks = [c for c in checks if not cannot_run(c)]
    return checks, lines


def _picked(
    sizes: Sizes, device: str | torch.device, groups: tuple[str, ...], dtypes: tuple[str, ...]
) -> list[Check]:
    """The checks of `groups` and `dtypes` (all when empty); ValueError for an unknown name."""
    for name, known, what in ((groups, GROUPS, "check group"), (dtypes, DTYPES, "dtype")):
        unknown = [n for n in name if n not in known]
        if unknown:
            raise ValueError(f"unknown {what} {unknown[0]!r}; {what}s: {', '.join(known)}")
    checks = [*_kernel_checks(sizes, device), *_model_checks(sizes, device)]
    return [
        c
        for c in checks
        if (not groups or c.group in groups) and (not dtypes or c.dtype in (None, *dtypes))
    ]


def _capability(device: str | torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA `device`; None for another device, or where there is
    no CUDA (`--dry-run` on a machine without a GPU lists every check)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def _unsupported(
    capability: tuple[int, int] | None,
) -> list[tuple[str, str, Callable[[Check], bool]]]:
    """What a GPU of `capability` cannot run: (kind, why, which checks) for each, in the words
    of the ops' own refusal (`kernels._dispatch.check_gpu`)."""
    if capability is None or capability >= TENSOR_CORE_CAPABILITY:
        return []
    gpu = "sm_{}{}".format(*capability)
    return [
        (
            "",
            f"the attention ops refuse {gpu}, below sm_80 (Triton lowers tl.dot to FFMA there, "
            "not tensor cores); the model checks run PyTorch's attention (backend auto)",
            lambda c: c.group in TENSOR_CORE_GROUPS,
        ),
        ("bf16 ", f"{gpu} has no bfloat16", lambda c: c.dtype == "bf16"),
    ]


def _kernel_checks(sizes: Sizes, device: str | torch.device) -> list[Check]:
    checks: list[Check] = []
    for dname in sizes.dtypes:
        checks += _attention_checks(sizes, device, dname)
        checks += _row_checks(sizes, device, dname)
    n, d, v = sizes.cross_entropy
    for dname in sizes.dtypes:
        checks.append(
            Check(
                "cross_entropy",
                f"{dname} fused linear N={n} d={d} V={v}",
                lambda dt=DTYPES[dname]: op_checks.cross_entropy_check(device, dt, n, d, v),
                dname,
            )
        )
    return checks


def _attention_checks(sizes: Sizes, device: str | torch.device, dname: str) -> list[Check]:
    """Fixed-length attention at every head dim and in its edge cases, then varlen."""
    checks: list[Check] = []
    dt = DTYPES[dname]

    def add(group: str, name: str, run: Callable[[], str]) -> None:
        checks.append(Check(group, f"{dname} {name}", run, dname))

    b, h, tq, tk = sizes.attention
    for d in sizes.head_dims:
        add(
            "attention",
            f"D={d} causal B={b} H={h} T={tq}",
            lambda d=d: op_checks.attention_check(device, dt, (b, h, tq, tk), d),
        )
    long_shape = (1, 2, sizes.long_t, sizes.long_t)
    odd = (b, h, tq - 17, tk)  # a length no tile divides, fewer queries than keys
    decode = (b, h, 1, tk - 3)
    for name, shape, causal, p in (
        (f"long T={sizes.long_t} causal", long_shape, True, 0.0),
        (f"non-causal Tq={odd[2]} Tk={tk}", odd, False, 0.0),
        (f"causal Tq={odd[2]} Tk={tk} (cached keys)", odd, True, 0.0),
        (f"dropout 0.1 causal T={tq}", (b, h, tq, tk), True, 0.1),
        (f"decode Tq=1 Tk={decode[3]}", decode, True, 0.0),
    ):
        add(
            "attention",
            f"D=64 {name}",
            lambda s=shape, c=causal, p=p: op_checks.attention_check(device, dt, s, 64, c, p),
        )
    lengths = ",".join(map(str, sizes.varlen))
    for name, causal, p in (("causal", True, 0.0), ("dropout 0.1 causal", True, 0.1)):
        add(
            "attention_varlen",
            f"D=64 H=4 {name} lengths {lengths}",
            lambda c=causal, p=p: op_checks.varlen_check(device, dt, sizes.varlen, c, p),
        )
    return checks


def _row_checks(sizes: Sizes, device: str | torch.device, dname: str) -> list[Check]:
    """LayerNorm at every width, GELU and bias-GELU."""
    dt = DTYPES[dname]
    checks = [
        Check(
            "layer_norm",
            f"{dname} M={sizes.rows} N={n}",
            lambda n=n: op_checks.layer_norm_check(device, dt, sizes.rows, n),
            dname,
        )
        for n in sizes.widths
    ]
    for with_bias, group in ((False, "gelu"), (True, "bias_gelu")):
        checks.append(
            Check(
                group,
                f"{dname} M={sizes.rows} N={sizes.gelu_width}",
                lambda wb=with_bias: op_checks.gelu_check(
                    device, dt, sizes.rows, sizes.gelu_width, wb
                ),
                dname,
            )
        )
    return checks


def model_backend(device: str | torch.device) -> str:
    """The backend the model checks run: on a CUDA GPU "auto", what a user's model gets (our
    kernels from sm_80 on, PyTorch's attention with them below); on a CPU "triton", our kernels
    through Triton's interpreter ("auto" there is SDPA, which would check none of them)."""
    return "auto" if torch.device(device).type == "cuda" else "triton"


def _backend_label(device: str | torch.device) -> str:
    """model_backend's name, with what "auto" picks where there is a GPU to pick for."""
    from fastgpt.backends import resolve_backend

    backend = model_backend(device)
    if backend == "auto" and _capability(device) is not None:
        return f"auto ({resolve_backend(backend).name})"
    return backend


def train_dtype(sizes: Sizes, device: str | torch.device) -> str:
    """The train check's dtype: on a CUDA GPU what the training commands' `--precision auto`
    picks there (`devices.resolve_dtype`: bf16 from sm_80 on, fp16 below, which trains with a
    loss scaler), else `sizes.train_dtype` (the interpreter's fp16 on CPU; bf16 listed by
    `--dry-run` without a GPU)."""
    if _capability(device) is None:
        return sizes.train_dtype
    picked = resolve_dtype("auto", torch.device(device))
    return next(name for name, dtype in DTYPES.items() if dtype == picked)


def _model_checks(sizes: Sizes, device: str | torch.device) -> list[Check]:
    checks: list[Check] = []
    batch = "x".join(map(str, sizes.model_batch))
    backend, label = model_backend(device), _backend_label(device)
    train = dataclasses.replace(sizes, train_dtype=train_dtype(sizes, device))
    scaled = " with a loss scaler" if train.train_dtype == "fp16" else ""
    for dname in sizes.model_dtypes:
        checks.append(
            Check(
                "model",
                f"{sizes.model} logits {label} vs torch {dname} (B x T {batch})",
                lambda dt=DTYPES[dname]: op_checks.logits_check(sizes, device, dt, backend),
                dname,
            )
        )
    checks += [
        Check(
            "compile",
            f"torch.compile(fullgraph=True, backend={sizes.compile_backend}) {sizes.model} "
            f"on {label}",
            lambda: op_checks.compile_check(sizes, device, backend),
        ),
        Check(
            "train",
            f"{sizes.train_steps} {train.train_dtype} AdamW steps{scaled} {sizes.model} on "
            f"{label} (B x T {batch})",
            lambda: op_checks.train_check(train, device, backend),
            train.train_dtype,
        ),
        Check(
            "generate",
            f"KV cache == no cache, {sizes.new_tokens} greedy tokens {sizes.model} on {label}",
            lambda: op_checks.generate_check(sizes, device, backend),
        ),
    ]
    return checks


def run_checks(
    checks: list[Check],
    print_fn: Callable[[str], None] = print,
    on_result: Callable[[list[Result]], None] | None = None,
) -> list[Result]:
    """Run each check, catching its failure or exception so that the rest still run;
    `on_result` gets the results so far after each check (the caller saves them, so a run cut
    short by a timeout keeps what it finished)."""
    results = []
    for check in checks:
        started = time.perf_counter()
        try:
            status, detail = "pass", check.run()
        except CheckFailed as exc:
            status, detail = "FAIL", str(exc)
        except Exception as exc:  # a crash is a result too: report it, go on
            status, detail = "ERROR", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        seconds = time.perf_counter() - started
        results.append(Result(check.group, check.name, status, round(seconds, 2), detail))
        print_fn(f"{status:5s} {seconds:6.1f}s  {check.group}: {check.name}  {detail}")
        if on_result is not None:
            on_result(results)
    return results
