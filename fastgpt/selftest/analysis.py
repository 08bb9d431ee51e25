"""What one compiled kernel uses: registers, spills, shared memory, tensor cores, pipelining.

Read from Triton's `CompiledKernel` (its metadata and its `asm` dict of IR/PTX text) and from
ptxas's `-v` log, with per-arch limits from NVIDIA's occupancy tables.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM and per-block limits of one compute capability (bytes, registers, warps)."""

    name: str
    smem_per_block: int  # the most dynamic shared memory one block may opt in to
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_reserved_per_block: int = 1024  # the runtime's own share of every block


ARCHS: dict[int, ArchLimits] = {
    90: ArchLimits("sm_90", smem_per_block=232448, smem_per_sm=233472),  # H100/H200: 227 KB
    80: ArchLimits("sm_80", smem_per_block=166912, smem_per_sm=167936),  # A100: 163 KB
}


def parse_arch(text: str) -> int:
    """'sm_90' / '90' / 'sm90' -> 90; ValueError naming the supported archs otherwise."""
    digits = text.strip().lower().removeprefix("sm").lstrip("_")
    if not digits.isdigit() or int(digits) not in ARCHS:
        supported = ", ".join(a.name for a in ARCHS.values())
        raise ValueError(f"unknown arch {text!r}; supported: {supported}")
    return int(digits)


@dataclass
class KernelUsage:
    """Resources and instruction kinds of one compiled specialization."""

    registers: int | None  # per thread, from ptxas
    spill_bytes: int  # spill stores + spill loads per thread, from ptxas
    stack_bytes: int  # per-thread stack frame (spills and local arrays)
    shared_bytes: int  # shared memory per block (Triton's metadata)
    num_warps: int
    num_stages: int
    mma: str  # "wgmma" (Hopper async), "mma.sync" (Ampere-style), "none"
    pipelined: str  # "TMA", "cp.async" or "none": how global loads reach shared memory
    dot_16bit: bool  # the kernel has a tl.dot on fp16/bf16 operands
    warps_per_sm: int | None  # estimated resident warps per SM
    limiter: str | None  # what bounds warps_per_sm: regs, smem, warps, blocks

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_REGS = re.compile(r"Used (\d+) registers")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
# tt.dot / ttng.warp_group_dot on 16-bit operands, in Triton's IR: "... tensor<64x64xf16 ..."
_DOT_16BIT = re.compile(r"\b(?:tt\.dot|ttng\.warp_group_dot)\b[^\n]*x(?:f16|bf16)\b")


def parse_ptxas_log(log: str) -> tuple[int | None, int, int]:
    """(registers, spill bytes = stores + loads, stack frame bytes) from ptxas -v output.
    A kernel compiled before in this process has no log: (None, 0, 0)."""
    regs = _REGS.findall(log)
    stacks = _STACK.findall(log)
    if not regs:
        return None, 0, 0
    frame, stores, loads = (int(x) for x in stacks[-1]) if stacks else (0, 0, 0)
    return int(regs[-1]), stores + loads, frame


# (name, PTX pattern), the first match wins
MMA_KINDS = (("wgmma", r"wgmma\.mma_async"), ("mma.sync", r"\bmma\.sync\b"))
LOAD_KINDS = (("TMA", r"cp\.async\.bulk\.tensor"), ("cp.async", r"\bcp\.async\.c[ag]\b"))


def _first_kind(ptx: str, kinds: tuple[tuple[str, str], ...]) -> str:
    return next((name for name, pattern in kinds if re.search(pattern, ptx)), "none")


def mma_kind(ptx: str) -> str:
    """Which tensor-core instruction the PTX uses: "wgmma", "mma.sync" or "none"."""
    return _first_kind(ptx, MMA_KINDS)


def load_pipelining(ptx: str) -> str:
    """How global loads are staged: "TMA" (cp.async.bulk.tensor), "cp.async", or "none"."""
    return _first_kind(ptx, LOAD_KINDS)


def occupancy(registers: int, shared: int, num_warps: int, limits: ArchLimits) -> tuple[int, str]:
    """(resident warps per SM, limiter) by the CUDA occupancy calculator's rules: registers
    are allocated per warp in units of 256, shared memory per block in units of 128 bytes plus
    the runtime's reserved 1 KB."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by = {
        "regs": (limits.regs_per_sm // regs_per_warp) // num_warps,
        "warps": limits.max_warps_per_sm // num_warps,
        "blocks": limits.max_blocks_per_sm,
    }
    if shared:
        per_block = math.ceil((shared + limits.smem_reserved_per_block) / 128) * 128
        by["smem"] = limits.smem_per_sm // per_block
    limiter = min(by, key=by.get)
    return by[limiter] * num_warps, limiter


def analyse(compiled: Any, ptxas_log: str, arch: int) -> KernelUsage:
    """The usage of one freshly compiled kernel (a `triton.compiler.CompiledKernel`)."""
    registers, spills, stack = parse_ptxas_log(ptxas_log)
    md = compiled.metadata
    ptx = compiled.asm.get("ptx", "")
    ir = compiled.asm.get("ttir", "") + compiled.asm.get("ttgir", "")
    warps, limiter = (None, None)
    if registers is not None:
        warps, limiter = occupancy(registers, md.shared, md.num_warps, ARCHS[arch])
    return KernelUsage(
        registers=registers,
        spill_bytes=spills,
        stack_bytes=stack,
        shared_bytes=md.shared,
        num_warps=md.num_warps,
        num_stages=md.num_stages,
        mma=mma_kind(ptx),
        pipelined=load_pipelining(ptx),
        dot_16bit=bool(_DOT_16BIT.search(ir)),
        warps_per_sm=warps,
        limiter=limiter,
    )
