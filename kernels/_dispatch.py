"""Input checks and the choice between a Triton kernel and its PyTorch reference.

Every public op in `kernels/` validates its inputs, refuses what its GPU cannot run
(`check_gpu`: attention below sm_80, bf16 below sm_80), then calls `use_triton(...)`:

- CUDA tensors run the Triton kernel.
- CPU tensors run the Triton kernel through Triton's interpreter when ``TRITON_INTERPRET=1`` is
  set in the environment before `triton` is imported (that is how the test suite runs on a
  machine without a GPU: slow, but it executes the very same kernel code).
- Otherwise CPU tensors fall back to the plain-PyTorch reference beside each kernel.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# sm_80 (A100) on: the tensor cores that Triton lowers a 16-bit tl.dot to (mma.sync, wgmma on
# sm_90), and bfloat16. Below it (sm_75, T4) Triton lowers every dot to an FFMA loop, several
# times slower than PyTorch's own attention, and bf16 does not exist.
TENSOR_CORE_CAPABILITY = (8, 0)


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Raise ValueError naming each tensor and its device unless all share one device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return next(iter(devices))


def check_float(name: str, t: torch.Tensor | None) -> None:
    """Raise TypeError unless `t` is fp32, fp16 or bf16 (None passes)."""
    if t is not None and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_gpu(op: str, *tensors: torch.Tensor | None, dots: bool = False) -> None:
    """Refuse, in one line naming the GPU and before any launch, what the CUDA GPU of `tensors`
    (on one device, checked before) cannot run below TENSOR_CORE_CAPABILITY: an op with
    tensor-core dots (`dots`: the attention ops), or bf16 tensors. Raises ValueError (dots) or
    TypeError (bf16); tensors on other devices pass. None entries are skipped."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability >= TENSOR_CORE_CAPABILITY:
        return
    gpu = f"the {torch.cuda.get_device_name(device)} (sm_{capability[0]}{capability[1]})"
    if dots:
        raise ValueError(
            f"{op} needs compute capability 8.0 or newer (Triton's dots on tensor cores), not "
            f'{gpu}; use PyTorch\'s attention there: backend="sdpa" (or "auto")'
        )
    if any(t.dtype == torch.bfloat16 for t in present):
        raise TypeError(f"{op}: {gpu} has no bfloat16; use float16 (--precision fp16) or float32")


def bf16_in_fp32_under_interpreter(op: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """An attention op (q, k, v first) that computes bf16 CPU inputs in fp32 under Triton's
    interpreter, whose bf16 arithmetic is wrong (numpy has no bf16: outputs near 8e8 where
    they are O(1)); the output is cast back to bf16, gradients flow through the casts."""

    @functools.wraps(op)
    def wrapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs):
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and triton_interpreter_enabled():
            return op(q.float(), k.float(), v.float(), *args, **kwargs).to(q.dtype)
        return op(q, k, v, *args, **kwargs)

    return wrapped


def empty_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for the kernels' outputs. Each kernel module imports it as `_empty`, which the
    tests swap for a nan-filled allocator so that an element a kernel forgets to write shows."""
    return torch.empty(shape, dtype=dtype, device=device)


def use_triton(device: torch.device) -> bool:
    """Whether tensors on `device` run the Triton kernel (True) or the PyTorch reference."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return triton_interpreter_enabled()
    return False


def define_op(name: str, mutates_args: tuple[str, ...] = ()) -> Callable:
    """Decorator registering a launcher as the torch.library op `name`, so that
    torch.compile(fullgraph=True) traces through it. On a GPU a `triton_op`, which Inductor can
    see into (it schedules the Triton kernels itself); under TRITON_INTERPRET=1 the kernels are
    plain Python that cannot run on tracing tensors, so there an opaque `custom_op` (traced
    through the fake impl the op registers)."""
    if triton_interpreter_enabled():
        return torch.library.custom_op(name, mutates_args=mutates_args)
    return torch.library.triton_op(name, mutates_args=mutates_args)
