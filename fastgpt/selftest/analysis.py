"""What one compiled kernel uses: registers, spills, shared memory, tensor cores, pipelining.

Read from Triton's `CompiledKernel` (its metadata and its `asm` dict of IR/PTX text) and from
ptxas's `-v` log, with per-arch limits from NVIDIA's occupancy tables.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChipPeak:
    """Peak throughputs of one chip of an arch, for the cycle model of `loop_bound`: per SM per
    clock, at the boost clock. Sources are cited at each entry of ARCHS."""

    chip: str
    sms: int
    clock_ghz: float  # boost clock
    tensor_flops_per_clock: int  # dense fp16/bf16 tensor-core FLOP (2 per FMA), fp32 accumulate
    dram_gb_per_s: float
    mufu_per_clock: int = 16  # MUFU results (exp2, rcp, lg2, ...) per SM: CUDA guide, "Throughput"
    issue_per_clock: int = 4  # warp instructions per SM: 4 sub-partitions, 1 each per clock

    @property
    def dram_bytes_per_clock(self) -> float:
        """DRAM bytes per clock per SM: the chip's bandwidth shared evenly by its SMs."""
        return self.dram_gb_per_s / (self.sms * self.clock_ghz)


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM and per-block limits of one compute capability (bytes, registers, warps), from the
    CUDA C Programming Guide's table "Technical Specifications per Compute Capability", the
    tensor-core instruction Triton lowers a 16-bit `tl.dot` to there, and the chip whose peaks
    the cycle model uses."""

    name: str
    smem_per_block: int  # the most dynamic shared memory one block may opt in to
    smem_per_sm: int
    mma: str  # the tensor-core instruction a 16-bit dot must lower to (see MMA_KINDS)
    peak: ChipPeak
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_reserved_per_block: int = 1024  # the runtime's own share of every block (sm_80 on)
    regs_per_sm: int = 65536  # 64 K 32-bit registers on every arch here
    max_regs_per_thread: int = 255


KB = 1024
# Shared memory, warps and blocks per SM: CUDA C Programming Guide (12.8), "Technical
# Specifications per Compute Capability" (7.5: 64 KB per SM and per block, 32 warps, 16 blocks;
# 8.0: 164/163 KB, 64 warps, 32 blocks; 8.6: 100/99 KB, 48 warps, 16 blocks; 8.9: 100/99 KB,
# 48 warps, 24 blocks; 9.0 and 10.0: 228/227 KB, 64 warps, 32 blocks; 12.0: 100/99 KB, 48
# warps, 32 blocks). Peaks: NVIDIA's whitepapers and datasheets (dense, without sparsity; the
# 16-bit tensor rate with fp32 accumulation, which GeForce parts run at half their fp16-accumulate
# rate), per SM per clock = chip TFLOP/s / (SMs x boost clock).
# The chip each arch's cycle model uses: SMs, boost clock (GHz), 16-bit tensor FLOP per clock
# per SM, DRAM GB/s.
CHIPS: dict[int, ChipPeak] = {
    # T4 (TU104): 40 SMs, 1590 MHz, 65 TFLOP/s fp16 -> 1024 FLOP/clk/SM, 320 GB/s GDDR6
    75: ChipPeak("T4", 40, 1.59, 1024, 320),
    # A100 SXM4 80 GB: 108 SMs, 1410 MHz, 312 TFLOP/s -> 2048, 2039 GB/s HBM2e
    80: ChipPeak("A100 SXM4 80GB", 108, 1.41, 2048, 2039),
    # RTX 3090 (GA102): 82 SMs, 1695 MHz, 71 TFLOP/s with fp32 accumulate -> 512, 936 GB/s
    86: ChipPeak("RTX 3090", 82, 1.695, 512, 936),
    # RTX 4090 (AD102): 128 SMs, 2520 MHz, 165.2 TFLOP/s with fp32 accumulate -> 512, 1008 GB/s
    89: ChipPeak("RTX 4090", 128, 2.52, 512, 1008),
    # H100 SXM5: 132 SMs, 1830 MHz, 989.4 TFLOP/s -> 4096 FLOP/clk/SM, 3352 GB/s HBM3
    90: ChipPeak("H100 SXM5", 132, 1.83, 4096, 3352),
    # B200: 148 SMs, ~1965 MHz, ~2250 TFLOP/s dense fp16 -> 8192 (rounded), 8000 GB/s HBM3e
    100: ChipPeak("B200", 148, 1.965, 8192, 8000),
    # RTX 5090 (GB202): 170 SMs, 2407 MHz, 209.5 TFLOP/s with fp32 accumulate -> 512, 1792 GB/s
    120: ChipPeak("RTX 5090", 170, 2.407, 512, 1792),
}
# arch: KB of shared memory per block / per SM, the 16-bit tensor-core instruction, warps and
# blocks per SM, the runtime's reserved shared memory per block (bytes).
ARCHS: dict[int, ArchLimits] = {
    arch: ArchLimits(f"sm_{arch}", block * KB, sm * KB, mma, CHIPS[arch], warps, blocks, reserved)
    for arch, block, sm, mma, warps, blocks, reserved in (
        (75, 64, 64, "mma.sync", 32, 16, 0),
        (80, 163, 164, "mma.sync", 64, 32, KB),
        (86, 99, 100, "mma.sync", 48, 16, KB),
        (89, 99, 100, "mma.sync", 48, 24, KB),
        (90, 227, 228, "wgmma", 64, 32, KB),
        (100, 227, 228, "tcgen05", 64, 32, KB),
        (120, 99, 100, "mma.sync", 48, 32, KB),
    )
}


def parse_arch(text: str) -> int:
    """'sm_90' / '90' / 'sm90' -> 90; ValueError naming the supported archs otherwise."""
    digits = text.strip().lower().removeprefix("sm").lstrip("_")
    if not digits.isdigit() or int(digits) not in ARCHS:
        supported = ", ".join(a.name for a in ARCHS.values())
        raise ValueError(f"unknown arch {text!r}; supported: {supported}")
    return int(digits)


def triton_can_target(arch: int) -> str | None:
    """None when the Triton in use compiles a one-line kernel for sm_`arch` (its backend and
    bundled ptxas know the arch), else why not, in one line. Call with TRITON_INTERPRET unset."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    @triton.jit
    def probe(x):  # x: (1,) fp32
        tl.store(x, 1.0)

    source = triton.compiler.ASTSource(fn=probe, signature={"x": "*fp32"})
    try:
        triton.compile(source, target=GPUTarget("cuda", arch, 32))
    except Exception as exc:  # the backend or its ptxas refuses the arch
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        return f"Triton {triton.__version__} cannot compile for sm_{arch}: {first.strip()[:160]}"
    return None


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
    loop: LoopProfile | None = None  # the main loop's instructions and cycle bound (SASS)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KernelUsage:
        """The inverse of as_dict (a record of a JSON file written by `--out`)."""
        loop = d.get("loop")
        return cls(**{**d, "loop": LoopProfile(**loop) if loop else None})


@dataclass
class LoopProfile:
    """One iteration of a kernel's main loop, read from its SASS, and the cycles it needs on one
    SM by `loop_bound`. Instruction counts are static (each instruction of the loop body once,
    both sides of a branch inside it) and per warp: every warp of the block runs the body once
    per iteration. Bytes are per block."""

    found: bool  # a loop was found; else the whole kernel counts as one "iteration"
    instructions: int  # SASS instructions per warp, NOPs left out
    mma: dict[str, int]  # tensor-core instructions by SASS shape ("HGMMA.64x64x16")
    mma_flops: int  # tensor-core FLOP per block (2 per multiply-add)
    tf32: bool  # the tensor-core instructions are tf32 (fp32 dots), at half the 16-bit rate
    mufu: int  # MUFU instructions per warp (exp2 and the other special functions)
    ex2: int  # of which MUFU.EX2
    bytes_loaded: int  # global bytes loaded per block (LDG, cp.async LDGSTS, TMA UTMALDG)
    cycles: dict[str, float] = field(default_factory=dict)  # tensor, issue, exp, memory, bound
    limiter: str = ""  # the largest of the four
    peak_fraction: float = 0.0  # tensor / bound (tensor kernels) or memory / bound (the rest)


def sass_of(cubin: bytes) -> str:
    """The SASS of a cubin, addresses and all, by the cuobjdump bundled with Triton's wheel."""
    import subprocess
    import tempfile

    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        run = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-sass", f.name],
            capture_output=True,
            check=True,
        )
    return run.stdout.decode()


# "/*1b40*/   @!P3 HGMMA.64x64x16.F32 R24, gdesc[UR12], RZ, !UPT ;": address, opcode, operands
_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"\b0x([0-9a-f]+)\b")
_LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
# "!ttg.memdesc<64x64xf16, ..." of a TMA copy into shared memory, in Triton's TTGIR
_TMA_TILE = re.compile(r"async_tma_copy_global_to_local.*?!ttg\.memdesc<([0-9x]+)x(f16|bf16|f32)")
_DTYPE_BYTES = {"f16": 2, "bf16": 2, "f32": 4}


def sass_instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every instruction, in address order."""
    return [(int(a, 16), op, args.strip()) for a, op, args in _SASS.findall(sass)]


def main_loop(code: list[tuple[int, str, str]]) -> tuple[int, int] | None:
    """(first, last) address of the main loop's body, or None for straight-line code.

    A branch to a lower address closes a loop whose body runs from the target to the branch
    (a branch to itself is the padding after EXIT). Among these, the innermost ones (holding no
    other loop) are the candidates, and the largest of them (most instructions) is taken: a
    kernel's hot loop is its innermost, and where a kernel splits it in two (attention's
    unmasked key tiles, then the diagonal tiles with the causal mask) the two bodies differ by
    the mask's few instructions, so the larger is the conservative count."""
    loops = []
    for address, opcode, operands in code:
        if opcode.split(".")[0] in ("BRA", "JMP"):
            target = _BRANCH_TARGET.search(operands)
            if target and int(target.group(1), 16) < address:
                loops.append((int(target.group(1), 16), address))
    innermost = [
        (lo, hi)
        for lo, hi in loops
        if not any(lo <= a < b <= hi and (a, b) != (lo, hi) for a, b in loops)
    ]
    if not innermost:
        return None
    size = lambda loop: sum(1 for a, _, _ in code if loop[0] <= a <= loop[1])
    return max(innermost, key=size)


# tcgen05's instruction descriptor (PTX ISA, "Instruction descriptor" of tcgen05.mma, kind::f16
# and kind::tf32): bits 7-9 the A type (0 f16, 1 bf16, 2 tf32), 17-22 N / 8, 24-28 M / 16; K is
# 32 bytes of A's type (16 for 16-bit, 8 for tf32). Set by an immediate UMOV into the uniform
# register that UTCHMMA names: "UMOV UR31, 0x8080010" is M 128, N 32, f16.
_UMOV_IMMEDIATE = re.compile(r"(UR\d+), 0x([0-9a-f]+)$")
_IDESC = re.compile(r"idesc\[(UR\d+)\]")


def _tcgen05_shape(code: list[tuple[int, str, str]], index: int) -> tuple[str, int, bool]:
    """(shape name, FLOP, tf32) of the UTCHMMA at code[index] (sm_100: tcgen05.mma, issued by
    one thread for the whole block), from the last immediate its idesc register was given
    before it: "UTCHMMA.128x32x16"; "UTCHMMA.?" with 0 FLOP where that register was computed."""
    register = _IDESC.search(code[index][2])
    for _, opcode, operands in reversed(code[:index] if register else []):
        if operands.split(",")[0] != register.group(1):
            continue
        immediate = _UMOV_IMMEDIATE.match(operands) if opcode == "UMOV" else None
        if immediate is None:
            break
        descriptor = int(immediate.group(2), 16)
        tf32 = (descriptor >> 7) & 7 == 2
        m, n, k = (
            ((descriptor >> 24) & 0x1F) * 16,
            ((descriptor >> 17) & 0x3F) * 8,
            8 if tf32 else 16,
        )
        return f"UTCHMMA.{m}x{n}x{k}", 2 * m * n * k, tf32
    return "UTCHMMA.?", 0, False


def _mma_flops(opcode: str) -> tuple[str, int, bool]:
    """(shape name, FLOP of one instruction, per warpgroup) of a tensor-core opcode:
    HGMMA.64xNxK (sm_90, one per warpgroup of 4 warps) or HMMA.MNK (m16n8k16 "16816",
    m16n8k8 "1688", m16n8k4 "1684"; one per warp). sm_100's UTCHMMA: `_tcgen05_shape`."""
    parts = opcode.split(".")
    if parts[0] == "HGMMA":
        m, n, k = (int(x) for x in parts[1].split("x"))
        return f"HGMMA.{parts[1]}", 2 * m * n * k, True
    digits = parts[1]
    m, n, k = int(digits[:2]), int(digits[2]), int(digits[3:])
    return f"HMMA.{digits}", 2 * m * n * k, False


def loop_profile(sass: str, ttgir: str, num_warps: int) -> LoopProfile:
    """Count the main loop's instructions (`main_loop`), or the whole kernel's where it has no
    loop. A load's bytes: its width (LDG.E.128: 16 B per thread, no suffix: 4 B) x 32 lanes x
    the block's warps; a TMA load (UTMALDG, issued once per block) moves one tile, whose size is
    read from the TTGIR's TMA copies (their mean, where they differ). A tensor-core
    instruction's FLOP: HMMA per warp, HGMMA per warpgroup, UTCHMMA (tcgen05) per block."""
    code = sass_instructions(sass)
    loop = main_loop(code)
    body = [i for i, (a, _, _) in enumerate(code) if loop is None or loop[0] <= a <= loop[1]]
    tiles = [
        math.prod(int(x) for x in shape.split("x")) * _DTYPE_BYTES[dtype]
        for shape, dtype in _TMA_TILE.findall(ttgir)
    ]
    tma_tile = sum(tiles) / len(tiles) if tiles else 0
    mma: dict[str, int] = {}
    flops = mufu = ex2 = loaded = instructions = 0
    tf32 = False
    for index in body:
        opcode = code[index][1]
        kind = opcode.split(".")[0]
        if kind == "NOP":
            continue
        instructions += 1
        if kind == "UTCHMMA":  # one per block
            shape, per_instruction, is_tf32 = _tcgen05_shape(code, index)
            mma[shape] = mma.get(shape, 0) + 1
            tf32 = tf32 or is_tf32
            flops += per_instruction
        elif kind in ("HGMMA", "HMMA"):
            shape, per_instruction, per_warpgroup = _mma_flops(opcode)
            mma[shape] = mma.get(shape, 0) + 1
            tf32 = tf32 or ".TF32" in opcode
            flops += per_instruction * (num_warps // 4 if per_warpgroup else num_warps)
        elif kind == "MUFU":
            mufu += 1
            ex2 += opcode.startswith("MUFU.EX2")
        elif kind in ("LDG", "LDGSTS"):
            width = next((b for s, b in _LOAD_BYTES.items() if s in opcode.split(".")), 4)
            loaded += width * 32 * num_warps
        elif kind == "UTMALDG":
            loaded += int(tma_tile)
    return LoopProfile(loop is not None, instructions, mma, flops, tf32, mufu, ex2, loaded)


def loop_bound(profile: LoopProfile, num_warps: int, peak: ChipPeak) -> None:
    """Fill profile.cycles, .limiter and .peak_fraction: the SM cycles one iteration of one
    block needs by each of four throughput limits, the largest of them (the bound), and the
    fraction of the chip's peak the kernel would reach at that bound. On one SM:

        tensor = tensor FLOP / (16-bit tensor FLOP per clock per SM)   [tf32: half that rate]
        issue  = instructions per warp x warps / (4 warp-instructions per clock: one per
                 sub-partition)
        exp    = MUFU per warp x 32 lanes x warps / (16 MUFU results per clock)
        memory = bytes loaded / (DRAM bytes per clock per SM = bandwidth / (SMs x clock))

    A throughput bound: no latency, stall, bank conflict or L2 reuse is modelled (memory counts
    every load as DRAM traffic, an upper bound on it), so real kernels run slower than the
    bound, never faster. Blocks resident together on an SM share these units, so the bound per
    iteration and the fraction of peak do not depend on occupancy."""
    warp_lanes = 32 * num_warps
    cycles = {
        "tensor": profile.mma_flops / (peak.tensor_flops_per_clock / (2 if profile.tf32 else 1)),
        "issue": profile.instructions * num_warps / peak.issue_per_clock,
        "exp": profile.mufu * warp_lanes / peak.mufu_per_clock,
        "memory": profile.bytes_loaded / peak.dram_bytes_per_clock,
    }
    profile.limiter = max(cycles, key=cycles.get)
    bound = cycles[profile.limiter]
    cycles["bound"] = bound
    profile.cycles = {k: round(v, 1) for k, v in cycles.items()}
    useful = cycles["tensor"] if profile.mma_flops else cycles["memory"]
    profile.peak_fraction = round(useful / bound, 3) if bound else 0.0


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
MMA_KINDS = (
    ("tcgen05", r"tcgen05\.mma"),  # sm_100 (Blackwell datacenter)
    ("wgmma", r"wgmma\.mma_async"),  # sm_90
    ("mma.sync", r"\bmma\.sync\b"),  # sm_80 on (m16n8k16); sm_75 has m16n8k8
)
LOAD_KINDS = (("TMA", r"cp\.async\.bulk\.tensor"), ("cp.async", r"\bcp\.async\.c[ag]\b"))


def _first_kind(ptx: str, kinds: tuple[tuple[str, str], ...]) -> str:
    return next((name for name, pattern in kinds if re.search(pattern, ptx)), "none")


def mma_kind(ptx: str) -> str:
    """Which tensor-core instruction the PTX uses: "tcgen05", "wgmma", "mma.sync" or "none"."""
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
        loop=_loop(compiled, arch),
    )


def _loop(compiled: Any, arch: int) -> LoopProfile:
    profile = loop_profile(
        sass_of(compiled.asm["cubin"]), compiled.asm.get("ttgir", ""), compiled.metadata.num_warps
    )
    loop_bound(profile, compiled.metadata.num_warps, ARCHS[arch].peak)
    return profile
