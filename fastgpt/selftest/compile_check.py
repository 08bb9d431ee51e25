"""`fastgpt selftest --compile-only`: compile every kernel specialization for sm_90/sm_80 on
CPU and judge each against the arch's limits and the committed budget.

A specialization fails when
- it does not compile (Triton or ptxas raises),
- its shared memory exceeds what one block may use on the arch (the launch would fail with
  OutOfResources),
- ptxas reports more spill bytes (stores + loads, per thread) than the budget allows (default
  0; exceptions are listed, with their cost, in benchmarks/results/compile/budget.json),
- it has a tl.dot on fp16/bf16 operands that does not lower to the arch's tensor-core
  instruction (wgmma on sm_90, tcgen05 on sm_100, mma.sync on the others: `ArchLimits.mma`),
- its main loop runs more SASS instructions per iteration than the budget records for it, plus
  10% (`INSTRUCTION_TOLERANCE`); a specialization the budget does not list is not judged on it.

Each record also carries the cycle model of its main loop (`analysis.loop_bound`).

Every compile starts from an empty Triton cache, so ptxas really runs and reports. Archs (and,
with jobs > 1, slices of one arch's cases) compile in parallel worker processes.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastgpt.selftest.analysis import ARCHS, KernelUsage
from fastgpt.selftest.sweep import TUTORIAL_PASS, SweepOptions

# benchmarks/results/compile of the checkout, or of the installed fastgpt.benchmarks package
COMPILE_DIR = (
    Path(importlib.import_module("fastgpt.benchmarks").__file__).parent / "results" / "compile"
)
BUDGET_FILE = COMPILE_DIR / "budget.json"
INSTRUCTION_TOLERANCE = 0.10  # an iteration may grow 10% over its committed instruction count
CONFIG_KEYS = (
    "BLOCK_M",
    "BLOCK_N",
    "BLOCK_D",
    "BLOCK",
    "SINGLE_TILE",
    "HAS_RESIDUAL",
    "HAS_DRESIDUAL",
)


@dataclass
class Record:
    """One kernel compiled for one case on one arch."""

    arch: int
    op: str
    pass_name: str
    params: dict[str, Any]
    kernel: str
    config: str  # tile sizes, warps and stages as launched
    usage: KernelUsage | None = None
    same_binary_as: int | None = None  # index of the record whose binary this one reuses
    compile_s: float = 0.0
    error: str | None = None
    problems: list[str] = field(default_factory=list)
    triton: str = ""  # the version that compiled it

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["arch"] = ARCHS[self.arch].name
        return d


# --- budget ------------------------------------------------------------------------------


def load_budget(path: str | Path = BUDGET_FILE) -> dict[str, Any]:
    """The spill budget: {"spill_bytes": default allowance, "allow": [exceptions]}. Each
    exception names an "op" and optionally "kernel", "dtype", "head_dims", "archs", with its
    "max_spill_bytes" and the measured or estimated "cost". Raises ValueError for a missing or
    malformed file."""
    path = Path(path)
    try:
        budget = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"budget file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"budget file {path} is not valid JSON: {exc}") from None
    if not isinstance(budget.get("spill_bytes"), int):
        raise ValueError(f"budget file {path}: 'spill_bytes' (an integer) is missing")
    return budget


def allowed_spills(record: Record, budget: dict[str, Any]) -> int:
    """The spill bytes the budget allows this record (the largest matching exception)."""
    allowed = budget["spill_bytes"]
    for rule in budget.get("allow", []):
        matches = (
            rule.get("op") == record.op
            and rule.get("kernel", record.kernel) == record.kernel
            and rule.get("dtype", record.params.get("dtype")) == record.params.get("dtype")
            and record.params.get("D") in rule.get("head_dims", [record.params.get("D")])
            and ARCHS[record.arch].name in rule.get("archs", [ARCHS[record.arch].name])
        )
        if matches:
            allowed = max(allowed, int(rule["max_spill_bytes"]))
    return allowed


def budget_key(record: Record) -> str:
    """How the instruction budget names one specialization: kernel, pass, parameters (its
    `budget_case`), config and load staging (the TMA and cp.async forwards share a config)."""
    loads = record.usage.pipelined if record.usage else "?"
    return f"{budget_case(record)} {record.config} {loads}"


def budget_case(record: Record) -> str:
    """The start of the record's `budget_key` that names its case, whatever config compiled
    it: kernel, pass and parameters."""
    params = " ".join(f"{k}={v}" for k, v in record.params.items())
    return f"{record.kernel} {record.pass_name} {params}"


def _case_of_key(key: str) -> str:
    """The case part of a `budget_key`: the words before the config's first (a CONFIG_KEYS
    name=value, or the "w8" of the warps); the kernel and pass are the first two words."""
    words = key.split(" ")
    config_starts = (
        i
        for i, word in enumerate(words)
        if i >= 2 and ("=" not in word or word.split("=")[0] in CONFIG_KEYS)
    )
    return " ".join(words[: next(config_starts, len(words))])


def budget_section(triton_version: str) -> str:
    """The instruction budget's section for a Triton version: "triton 3.9" (major.minor)."""
    return "triton " + ".".join(triton_version.split(".")[:2])


def allowed_instructions(record: Record, budget: dict[str, Any]) -> int | None:
    """The committed SASS instructions per loop iteration of this record, or None if unlisted."""
    section = budget.get("instructions_per_iteration", {}).get(budget_section(record.triton), {})
    return section.get(ARCHS[record.arch].name, {}).get(budget_key(record))


def record_instructions(records: list[Record], budget: dict[str, Any]) -> dict[str, Any]:
    """The budget with the instructions per iteration of `records` (fresh binaries) written in.
    The run replaces what it covered: in its Triton version's section and each of its archs,
    every entry of a case (`budget_case`) it compiled goes, whatever its config (a tile or a
    tuning candidate since changed), before the run's own are written. Other cases (ops,
    dtypes, head dims the run left out), archs and Triton versions keep theirs."""
    table = {
        section: {arch: dict(entries) for arch, entries in archs.items()}
        if isinstance(archs, dict)
        else archs
        for section, archs in budget.get("instructions_per_iteration", {}).items()
    }
    covered: dict[tuple[str, str], set[str]] = {}
    for record in records:
        if record.pass_name != TUTORIAL_PASS:
            where = (budget_section(record.triton), ARCHS[record.arch].name)
            covered.setdefault(where, set()).add(budget_case(record))
    for (section_name, arch_name), cases in covered.items():
        arch = table.setdefault(section_name, {}).setdefault(arch_name, {})
        for key in [key for key in arch if _case_of_key(key) in cases]:
            del arch[key]
    for record in records:
        if record.usage is None or record.usage.loop is None or record.pass_name == TUTORIAL_PASS:
            continue
        section = table.setdefault(budget_section(record.triton), {})
        arch = section.setdefault(ARCHS[record.arch].name, {})
        arch[budget_key(record)] = record.usage.loop.instructions
    for section in table.values():
        if isinstance(section, dict):
            for arch, entries in section.items():
                section[arch] = dict(sorted(entries.items()))
    return {**budget, "instructions_per_iteration": table}


def judge(record: Record, budget: dict[str, Any]) -> None:
    """Fill record.problems with every rule of the module docstring that it breaks. Triton's
    tutorial (the cycle model's reference) is not ours: it is never judged."""
    if record.pass_name == TUTORIAL_PASS:
        return
    if record.error is not None:
        record.problems.append(f"compile failed: {record.error}")
        return
    usage, limits = record.usage, ARCHS[record.arch]
    if usage.registers is None:
        record.problems.append("ptxas reported no register count")
    if usage.shared_bytes > limits.smem_per_block:
        record.problems.append(
            f"shared memory {usage.shared_bytes} B > {limits.smem_per_block} B per block"
        )
    allowed = allowed_spills(record, budget)
    if usage.spill_bytes > allowed:
        record.problems.append(f"spills {usage.spill_bytes} B > budget {allowed} B")
    if usage.dot_16bit and usage.mma != limits.mma:
        record.problems.append(f"16-bit dot lowered to {usage.mma}, not {limits.mma}")
    committed = allowed_instructions(record, budget)
    if committed is not None and usage.loop is not None:
        limit = int(committed * (1 + INSTRUCTION_TOLERANCE))
        if usage.loop.instructions > limit:
            record.problems.append(
                f"{record.kernel}: {usage.loop.instructions} SASS instructions per loop "
                f"iteration > budget {committed} + {INSTRUCTION_TOLERANCE:.0%} = {limit}"
            )


# --- compiling ---------------------------------------------------------------------------


def _config_text(kwargs: dict[str, Any], usage: KernelUsage | None) -> str:
    parts = [
        f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in kwargs.items() if k in CONFIG_KEYS
    ]
    if usage is not None:
        parts.append(f"w{usage.num_warps} s{usage.num_stages}")
    return " ".join(parts)


def _short_error(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: " + (" | ".join(lines)[:300] if lines else "(no message)")


def _print_progress(arch: int, case, kernel: str, record: Record) -> None:
    """One stderr line per fresh binary: what compiled, how long it took, what it uses."""
    usage = record.usage
    found = "FAILED" if usage is None else f"regs {usage.registers} spill {usage.spill_bytes}"
    print(
        f"[{ARCHS[arch].name}] {case.op} {case.pass_name} {case.label}: {kernel} "
        f"{record.compile_s:.1f}s {found}",
        file=sys.stderr,
        flush=True,
    )


def compile_slice(
    arch: int, options: SweepOptions, part: int = 0, parts: int = 1, progress: bool = False
) -> list[Record]:
    """Compile cases part, part + parts, ... of the plan for sm_`arch`; their records (not yet
    judged). Runs in this process; `run_compile_check` spreads slices over workers. progress:
    one line per fresh binary on stderr."""
    import triton
    from triton.runtime.jit import JITFunction

    from fastgpt.selftest import analysis, arch_plan, stub_driver, sweep

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    records: list[Record] = []
    first_record: dict[int, int] = {}  # id(compiled kernel) -> its first record
    current: list[sweep.Case] = []

    def on_compile(kernel, kwargs, compiled, log, error):
        case = current[0]
        record = Record(arch, case.op, case.pass_name, dict(case.params), kernel, "")
        record.triton = triton.__version__
        record.compile_s = round(time.perf_counter() - started[0], 2)
        if error is not None:
            record.error = _short_error(error)
        elif id(compiled) in first_record:
            index = first_record[id(compiled)]
            record.same_binary_as = index
            record.usage = records[index].usage
            record.compile_s = 0.0
        else:
            record.usage = analysis.analyse(compiled, log, arch)
            first_record[id(compiled)] = len(records)
        record.config = _config_text(kwargs, record.usage)
        records.append(record)
        if progress and record.same_binary_as is None:
            _print_progress(arch, case, kernel, record)
        started[0] = time.perf_counter()

    started = [time.perf_counter()]
    with stub_driver.compiling_for(arch, on_compile), _every_candidate_compiled():
        # The plan is made under the stub: configs may depend on the target arch.
        cases = arch_plan.plan(options, arch)
        if not isinstance(_a_project_kernel(), JITFunction):
            raise RuntimeError(
                "the kernels were defined for Triton's interpreter: unset TRITON_INTERPRET"
            )
        for case in cases[part::parts]:
            current[:] = [case]
            started[0] = time.perf_counter()
            try:
                case.launch()
            except Exception as exc:  # the launcher itself failed, before any compile
                record = Record(arch, case.op, case.pass_name, dict(case.params), "launcher", "")
                record.error = _short_error(exc)
                records.append(record)
    return records


@contextmanager
def _every_candidate_compiled() -> Iterator[None]:
    """Launchers that autotune launch each of their candidate configs in the block (so each is
    compiled and judged), then the flag is put back: the check may run inside a process whose
    kernels go on running (the CLI in a test)."""
    autotune = importlib.import_module("fastgpt.kernels._autotune")
    saved, autotune.COMPILE_EVERY_CANDIDATE = autotune.COMPILE_EVERY_CANDIDATE, True
    try:
        yield
    finally:
        autotune.COMPILE_EVERY_CANDIDATE = saved


def _a_project_kernel():
    """One of the project's kernels, to tell a JITFunction from an interpreted one."""
    import importlib

    return importlib.import_module("fastgpt.kernels.normalization")._layer_norm_forward_kernel


def _worker(task: tuple[int, SweepOptions, int, int, bool]) -> list[Record]:
    return compile_slice(*task)


@contextmanager
def environment(**changes: str | None) -> Iterator[None]:
    """Set (a string) or unset (None) environment variables for the block, then put back what
    was there: the check runs inside other processes too (the CLI in a test), whose kernels
    must go on running as they did before it."""
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            _set_env(name, value)
        yield
    finally:
        for name, value in saved.items():
            _set_env(name, value)


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def run_compile_check(
    archs: list[int],
    options: SweepOptions,
    budget: dict[str, Any],
    jobs: int = 1,
    progress: bool = False,
) -> list[Record]:
    """Compile the planned cases for each arch (in `jobs` processes) and judge every record."""
    per_arch = max(1, jobs // len(archs))
    tasks = [
        (arch, options, part, per_arch, progress) for arch in archs for part in range(per_arch)
    ]
    # An empty cache: every binary compiles, so ptxas prints its log. Set before any worker
    # starts (they inherit the environment) and before this process compiles anything.
    with (
        tempfile.TemporaryDirectory(prefix="fastgpt-compile-check-") as cache,
        environment(TRITON_CACHE_DIR=cache, TRITON_INTERPRET=None),
    ):
        if jobs <= 1:
            results = [_worker(task) for task in tasks]
        else:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks))) as pool:
                results = pool.map(_worker, tasks)
    records: list[Record] = []
    for chunk in results:  # re-number "same binary" links into the merged list
        offset = len(records)
        for record in chunk:
            if record.same_binary_as is not None:
                record.same_binary_as += offset
            records.append(record)
    for record in records:
        judge(record, budget)
    return records


def records_from_json(payload: dict[str, Any]) -> list[Record]:
    """The records of a JSON file written by `--out`, not yet judged (judge them against the
    current budget with `judge`). Raises ValueError for a file that holds no records."""
    from fastgpt.selftest.analysis import parse_arch

    if not isinstance(payload.get("records"), list):
        raise ValueError("not a compile-check JSON file: no 'records' list")
    records = []
    for d in payload["records"]:
        usage = KernelUsage.from_dict(d["usage"]) if d.get("usage") else None
        fields = {k: v for k, v in d.items() if k not in ("arch", "usage", "problems")}
        fields.setdefault("triton", payload.get("triton", ""))
        records.append(Record(arch=parse_arch(d["arch"]), usage=usage, **fields))
    return records
