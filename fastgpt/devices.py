"""Choosing a device, and what a GPU can do on paper.

    device = resolve_device("auto")          # cuda:0 when CUDA is available, else cpu
    gpu_spec("NVIDIA H100 80GB HBM3")        # GPUSpec(board="H100 SXM", bf16_tflops=989.4, ...)

The spec-sheet table is the one place fastgpt keeps vendor peaks: the training loop divides by
its bf16 peak for MFU, the benchmarks show it as a labelled reference next to the limits they
measure themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fastgpt.errors import ConfigError


def resolve_device(spec: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """The device named by `spec`: "auto" or None is cuda:local_rank when CUDA is available,
    else cpu; otherwise cpu, cuda or cuda:N. ConfigError for another name, or a CUDA device this
    machine does not have."""
    if spec in (None, "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError("device", f"{str(spec)!r} is not a device: use cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", f"{spec}: no CUDA GPU is available (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ConfigError("device", f"{spec}: this machine has {n} CUDA GPU(s)")
    return device


@dataclass(frozen=True)
class GPUSpec:
    """A board's vendor spec-sheet peaks (dense, no sparsity)."""

    board: str
    bf16_tflops: float
    """Dense bf16 tensor-core peak, TFLOP/s."""
    hbm_gbps: float | None
    """Memory bandwidth, GB/s (None where we have not written it down)."""


# How each board names itself in torch.cuda.get_device_name (upper-cased): every substring must
# appear; the first match wins, so "GH200" precedes "H200" and "L40S" precedes "L4".
# Sources: NVIDIA's data sheets.
GPU_SPECS: list[tuple[tuple[str, ...], GPUSpec]] = [
    (("H100", "PCIE"), GPUSpec("H100 PCIe", 756.0, 2000.0)),
    (("H100", "NVL"), GPUSpec("H100 NVL", 835.0, 3900.0)),
    (("GH200",), GPUSpec("GH200", 989.4, None)),
    (("H100",), GPUSpec("H100 SXM", 989.4, 3350.0)),  # "NVIDIA H100 80GB HBM3"
    (("H200",), GPUSpec("H200", 989.4, 4800.0)),
    (("A100", "SXM", "80GB"), GPUSpec("A100 SXM 80GB", 312.0, 2039.0)),
    (("A100",), GPUSpec("A100", 312.0, None)),
    (("A10G",), GPUSpec("A10G", 70.0, None)),
    (("A10",), GPUSpec("A10", 125.0, None)),
    (("L40S",), GPUSpec("L40S", 362.0, None)),
    (("L4",), GPUSpec("L4", 121.0, None)),
    (("RTX 4090",), GPUSpec("RTX 4090", 165.0, None)),
    (("RTX 3090",), GPUSpec("RTX 3090", 71.0, None)),
]


def gpu_spec(gpu_name: str) -> GPUSpec | None:
    """The spec-sheet entry matching a GPU's name, or None for a board not in GPU_SPECS."""
    name = gpu_name.upper()
    for substrings, spec in GPU_SPECS:
        if all(part in name for part in substrings):
            return spec
    return None


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device from GPU_SPECS; None on CPU or if unknown."""
    if device.type != "cuda":
        return None
    spec = gpu_spec(torch.cuda.get_device_name(device))
    return spec.bf16_tflops * 1e12 if spec is not None else None


@dataclass
class InferenceOptions:
    """How a saved model runs in `fastgpt generate` and `fastgpt classify`."""

    backend: Literal["auto", "triton", "sdpa", "torch"] = "auto"
    """Kernels: triton (ours), sdpa (PyTorch's fused ops), torch (the references, the book's
    math), auto (triton on CUDA, sdpa on CPU)."""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... or auto (cuda if available)."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Weights and activations: auto is bf16 on a GPU that has it, fp16 on one that does not
    (T4, V100), fp32 on CPU."""

    def resolve(self) -> tuple[torch.device, torch.dtype]:
        """(device, dtype); ConfigError for an unknown or absent device."""
        device = resolve_device(self.device)
        return device, resolve_dtype(self.dtype, device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A --dtype or --precision option: auto is a 16-bit type on CUDA (half the memory traffic
    of fp32): bf16 where the GPU computes in it natively (compute capability 8.0 on), fp16 where
    it does not (a T4 or V100, on which torch only emulates bf16, slowly, and our kernels have
    no bf16); fp32 on CPU (CPU 16-bit matmuls are slow)."""
    named = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name != "auto":
        return named[name]
    if device.type != "cuda":
        return torch.float32
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native_bf16 else torch.float16
