"""Tables of the selftest: plain-text for the terminal, Markdown for the committed reports."""

from __future__ import annotations

from collections.abc import Sequence

from fastgpt.selftest import arch_plan
from fastgpt.selftest.analysis import ARCHS, LoopProfile
from fastgpt.selftest.compile_check import Record
from fastgpt.selftest.sweep import TUTORIAL_PASS, SweepOptions

COMPILE_COLUMNS = (
    "kernel",
    "specialization",
    "config",
    "regs",
    "spill B",
    "smem KB / limit",
    "MMA",
    "loads",
    "warps/SM",
    "loop instr/warp",
    "tensor ops/warp",
    "MUFU/warp",
    "KB loaded",
    "cycles: bound (by)",
    "peak",
    "vs tutorial",
    "status",
)


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell, one line per row."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def compile_row(index: int, record: Record, versus: str = "-") -> list[object]:
    """One record as COMPILE_COLUMNS cells; versus: its "vs tutorial" cell (`tutorial_ratios`)."""
    kernel = record.kernel.removeprefix("_").removesuffix("_kernel")
    spec = f"{record.pass_name} {_params(record.params)}"
    if record.pass_name == TUTORIAL_PASS:
        status = "reference" + (f" (did not compile: {record.error})" if record.error else "")
    else:
        status = "ok" if record.ok else "FAIL: " + "; ".join(record.problems)
    usage = record.usage
    if usage is None:
        return [kernel, spec, record.config, *["-"] * (len(COMPILE_COLUMNS) - 4), status]
    limit = ARCHS[record.arch].smem_per_block / 1024
    same = f" (= #{record.same_binary_as})" if record.same_binary_as is not None else ""
    return [
        kernel,
        spec,
        record.config,
        "?" if usage.registers is None else usage.registers,
        usage.spill_bytes,
        f"{usage.shared_bytes / 1024:.1f} / {limit:.0f}",
        usage.mma,
        usage.pipelined,
        "?" if usage.warps_per_sm is None else f"{usage.warps_per_sm} ({usage.limiter})",
        *_loop_cells(usage.loop),
        versus,
        status + same if record.ok else status,
    ]


def _loop_cells(loop: LoopProfile | None) -> list[object]:
    """instructions (a trailing * where the kernel has no loop: the whole kernel), tensor-core
    instructions by shape, MUFU, KB loaded per block, bound cycles and limiter, % of peak."""
    if loop is None:
        return ["-"] * 6
    mark = "" if loop.found else "*"
    tensor = " + ".join(f"{n}x {shape}" for shape, n in loop.mma.items()) or "0"
    bound = f"{loop.cycles['bound']:.0f} ({loop.limiter})"
    return [
        f"{loop.instructions}{mark}",
        tensor,
        loop.mufu,
        f"{loop.bytes_loaded / 1024:.1f}",
        bound,
        f"{loop.peak_fraction:.0%}",
    ]


def _tile_elements(record: Record) -> int | None:
    """BLOCK_M x BLOCK_N of a record's config: the score elements one iteration computes."""
    sizes = dict(part.split("=") for part in record.config.split() if "=" in part)
    if "BLOCK_M" not in sizes or "BLOCK_N" not in sizes:
        return None
    return int(sizes["BLOCK_M"]) * int(sizes["BLOCK_N"])


def tutorial_ratios(records: Sequence[Record]) -> dict[int, str]:
    """{id(record): cell} for each attention forward with a tutorial record of the same arch,
    head dim and causality: its bound cycles and its instructions (per warp x warps) per score
    element (BLOCK_M x BLOCK_N of an iteration), each as a multiple of the tutorial's."""

    def per_element(record: Record) -> tuple[float, float] | None:
        usage, elements = record.usage, _tile_elements(record)
        if usage is None or usage.loop is None or not elements:
            return None
        loop = usage.loop
        return loop.cycles["bound"] / elements, loop.instructions * usage.num_warps / elements

    references = {}
    for r in records:
        if r.pass_name == TUTORIAL_PASS and per_element(r):
            references[(r.arch, r.params.get("D"), r.params.get("causal"))] = per_element(r)
    cells = {}
    for r in records:
        key = (r.arch, r.params.get("D"), r.params.get("causal"))
        ours = per_element(r) if r.pass_name == "forward" and r.op == "attention" else None
        if ours and key in references and r.params.get("dtype") in ("fp16", "bf16"):
            bound, instructions = (a / b for a, b in zip(ours, references[key], strict=True))
            cells[id(r)] = f"{bound:.2f}x (instr {instructions:.2f}x)"
    return cells


def _params(params: dict) -> str:
    parts = []
    for key, value in params.items():
        if value is True:
            parts.append(key)
        elif value is not False:
            parts.append(f"{key}={value}" if key != "dtype" else str(value))
    return " ".join(parts)


def compile_summary(records: Sequence[Record]) -> str:
    """One line per arch: binaries compiled, failures, worst registers and spills."""
    lines = []
    for arch in sorted({r.arch for r in records}, reverse=True):
        mine = [r for r in records if r.arch == arch and r.pass_name != TUTORIAL_PASS]
        distinct = [r for r in mine if r.same_binary_as is None and r.usage is not None]
        failed = [r for r in mine if not r.ok]
        spilling = [r for r in distinct if r.usage.spill_bytes]
        regs = max((r.usage.registers or 0 for r in distinct), default=0)
        seconds = sum(r.compile_s for r in mine)
        lines.append(
            f"{ARCHS[arch].name}: {len(mine)} specializations, {len(distinct)} distinct binaries "
            f"compiled in {seconds:.0f} s of compile time; {len(failed)} failing; "
            f"{len(spilling)} binaries spill; most registers {regs}"
        )
    return "\n".join(lines)


def _chip(arch: int) -> str:
    peak = ARCHS[arch].peak
    return (
        f"{peak.chip}, {peak.sms} SMs at {peak.clock_ghz} GHz, {peak.tensor_flops_per_clock} "
        f"tensor FLOP/clock/SM, {peak.dram_gb_per_s:.0f} GB/s"
    )


def skipped_line(options: SweepOptions, arch: int) -> str:
    """ "sm_75: not compiled: ..." naming what the sweep leaves out on `arch` and why
    (`arch_plan.arch_notes`); "" when nothing."""
    notes = arch_plan.arch_notes(options, arch)
    return f"{ARCHS[arch].name}: {'; '.join(notes)}" if notes else ""


def compile_markdown(
    records: Sequence[Record],
    arch: int,
    versions: dict[str, str],
    command: str,
    skipped: str = "",
) -> str:
    """The committed report of one arch: the command, versions, summary, what the sweep skipped
    on the arch (`skipped_line`), every record."""
    mine = [r for r in records if r.arch == arch]
    index = {id(r): i for i, r in enumerate(records)}
    versus = tutorial_ratios(records)
    rows = [[index[id(r)], *compile_row(index[id(r)], r, versus.get(id(r), "-"))] for r in mine]
    name = ARCHS[arch].name
    return "\n".join(
        [
            f"# Compile report: {name}, Triton {versions['triton']}",
            "",
            f"Written by `{command}` (no GPU: a stub driver, the project's launchers, Triton's "
            f"bundled ptxas). torch {versions['torch']}, Python {versions['python']}.",
            "",
            "Registers and spill bytes (stores + loads) are per thread, from `ptxas -v`; shared "
            "memory is per block against the most one block may use; MMA is the tensor-core "
            "instruction in the PTX; loads say whether global loads are staged asynchronously "
            "(cp.async / TMA); warps/SM is the occupancy estimate and what limits it. `(= #i)` "
            "marks a specialization that reuses row i's binary.",
            "",
            "The cycle model (benchmarks/results/compile/README.md has its formulas and the "
            f"chip's numbers: {_chip(arch)}), per iteration of the main loop (SASS, per warp; "
            "`*`: no loop, the whole kernel): instructions, tensor-core instructions by shape, "
            "MUFU (exp2) instructions, KB loaded per block, the bound = max(tensor, issue, exp, "
            "memory) in SM cycles and what sets it, and the fraction of the chip's peak at that "
            "bound (tensor FLOP/s, or DRAM bandwidth for kernels without tensor cores). `vs "
            "tutorial`: bound cycles and instructions per score element against Triton's "
            "tutorial forward (fp16, same arch, head dim and causality; its rows are marked "
            "reference). Not measured on a GPU.",
            "",
            compile_summary(mine),
            "",
            *([skipped, ""] if skipped else []),
            markdown_table(("#", *COMPILE_COLUMNS), rows),
            "",
        ]
    )
