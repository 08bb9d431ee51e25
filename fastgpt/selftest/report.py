"""Tables of the selftest: plain-text for the terminal, Markdown for the committed reports."""

from __future__ import annotations

from collections.abc import Sequence

from fastgpt.selftest.analysis import ARCHS
from fastgpt.selftest.compile_check import Record

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


def compile_row(index: int, record: Record) -> list[object]:
    """One record as COMPILE_COLUMNS cells."""
    kernel = record.kernel.removeprefix("_").removesuffix("_kernel")
    spec = f"{record.pass_name} {_params(record.params)}"
    status = "ok" if record.ok else "FAIL: " + "; ".join(record.problems)
    usage = record.usage
    if usage is None:
        return [kernel, spec, record.config, "-", "-", "-", "-", "-", "-", status]
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
        status + same if record.ok else status,
    ]


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
        mine = [r for r in records if r.arch == arch]
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


def compile_markdown(
    records: Sequence[Record], arch: int, versions: dict[str, str], command: str
) -> str:
    """The committed report of one arch: the command, versions, summary, every record."""
    mine = [r for r in records if r.arch == arch]
    index = {id(r): i for i, r in enumerate(records)}
    rows = [[index[id(r)], *compile_row(index[id(r)], r)] for r in mine]
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
            compile_summary(mine),
            "",
            markdown_table(("#", *COMPILE_COLUMNS), rows),
            "",
        ]
    )
