"""Compile Triton kernels for an NVIDIA arch on a machine without a GPU.

Triton compiles for whatever its active driver reports as the current target. `StubDriver`
reports `GPUTarget("cuda", arch, 32)` and no device; `compiling_for(arch)` makes it the active
driver and turns every kernel launch (`kernel[grid](...)`) into a compile (`warmup=True`), so
the project's own launchers, called with CPU tensors, pick exactly the tiles, warps, stages and
argument specializations (divisibility by 16, ints equal to 1, None arguments) that a GPU run
would compile. The ptxas bundled with Triton's wheel then gives registers and spills.

Each compile is handed to a callback with the compiled kernel and ptxas's `-v` log. Nothing is
ever launched: output tensors stay unwritten.

Needs a Triton with the NVIDIA backend (Linux wheels have it) and the kernels defined without
the interpreter (TRITON_INTERPRET unset when `kernels` is first imported).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

# callback(kernel_name, launch_kwargs, compiled_kernel_or_None, ptxas_log, error_or_None)
CompileCallback = Callable[[str, dict[str, Any], Any, str, "Exception | None"], None]


class StubDriver:
    """Just enough of a Triton driver for `JITFunction.run(warmup=True)` to specialize and
    compile for `GPUTarget("cuda", arch, 32)`."""

    def __init__(self, arch: int):
        self.arch = arch

    def is_active(self) -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        # The JIT keeps one kernel cache per device: one per arch, so that compiles for sm_80
        # never reuse sm_90 binaries within one process.
        return self.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty


def _ptxas_log_knob():
    """Triton's switch that prints ptxas's `-v` log after each compile (Triton >= 3.4)."""
    from triton import knobs

    return knobs.nvidia


@contextlib.contextmanager
def compiling_for(arch: int, on_compile: CompileCallback) -> Iterator[None]:
    """While active: Triton targets sm_`arch`, and every launch of a `@triton.jit` kernel
    compiles instead of running, calling `on_compile` once per launch (a launch whose
    specialization compiled before gets the cached kernel and an empty log). A compile error
    is passed to `on_compile`, not raised, so a sweep goes on past a broken specialization."""
    original_run = JITFunction.run
    knob = _ptxas_log_knob()
    original_log = knob.dump_ptxas_log

    def compile_only(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        compiled, error = None, None
        try:
            with contextlib.redirect_stdout(log):  # the ptxas log is print()ed
                compiled = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as exc:  # a specialization that would fail on the GPU too
            error = exc
        on_compile(self.fn.__name__, kwargs, compiled, log.getvalue(), error)
        return compiled

    drivers = triton.runtime.driver
    original_driver = drivers._active  # None on a machine without a GPU: keep it so
    drivers.set_active(StubDriver(arch))
    JITFunction.run = compile_only
    knob.dump_ptxas_log = True
    try:
        yield
    finally:
        JITFunction.run = original_run
        knob.dump_ptxas_log = original_log
        drivers._active = original_driver
