"""`fastgpt selftest`: check the GPU path.

fastgpt selftest                              # on a GPU: every op, the model, compile, training
fastgpt selftest --bench                      # ... then `fastgpt bench --quick` into --out
fastgpt selftest --dry-run                    # list the GPU checks; runs nothing
fastgpt selftest --compile-only               # no GPU needed: compile every kernel for sm_90,sm_80
fastgpt selftest --compile-only --subset ci   # CI's representative subset
fastgpt selftest --compile-only --report-dir benchmarks/results/compile   # rewrite the reports
fastgpt selftest --compile-only --subset ci --update-budget  # record instructions per iteration

The GPU run prints a pass/fail table and writes selftest.json to --out (default:
benchmarks/results/<gpu-name>/). The compile check prints one row per kernel specialization
and exits 1 when one fails to compile, overflows shared memory, spills past the committed
budget, runs a 16-bit dot without the arch's tensor-core instruction, or grows a main loop's SASS
instructions more than 10% over the budget. Each row carries the cycle model of its main loop.
See fastgpt/selftest/ and benchmarks/results/compile/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastgpt.cli import command_error
from fastgpt.options import add_options, comma_separated, options_from_args

COMMAND = "selftest"


def _arch(value: str) -> int:
    from fastgpt.selftest.analysis import parse_arch

    return parse_arch(value)


@dataclass
class SelftestOptions:
    """Which check `fastgpt selftest` runs (the GPU checks, or --compile-only), and where its
    results go."""

    compile_only: bool = False
    """No GPU needed: compile every kernel specialization for --arch and judge registers,
    spills, shared memory and tensor-core use."""
    dry_run: bool = False
    """List what would run (checks or compile cases)."""
    out: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Where selftest.json (and with --bench the benchmark results) go (default:
    benchmarks/results/<gpu-name>/; --compile-only: no JSON unless given)."""
    bench: bool = False
    """After the checks, run `fastgpt bench --quick`."""
    small: bool = False
    """The tests' small sizes (on CPU: with TRITON_INTERPRET=1 --device cpu)."""
    device: str = "cuda"
    """Device of the GPU checks."""
    only: tuple[str, ...] = field(default=(), metadata={"metavar": "NAME[,NAME]"})
    """Only these: compile-check ops (--compile-only), or GPU check groups (attention,
    attention_varlen, layer_norm, gelu, bias_gelu, cross_entropy, model, compile, train,
    generate)."""
    dtypes: tuple[str, ...] = field(default=(), metadata={"metavar": "fp16,bf16,fp32"})
    """Only these dtypes (the GPU checks that run in one dtype, or the compiled cases)."""


@dataclass
class CompileCheckOptions:
    """What `fastgpt selftest --compile-only` compiles and judges, and where the reports go."""

    arch: tuple[int, ...] = field(
        default=(90, 80),
        metadata={
            "type": comma_separated(_arch),
            "metavar": "ARCH[,ARCH]",
            "default_text": "sm_90,sm_80",
        },
    )
    """Target archs: sm_75 (T4), sm_80 (A100), sm_86 (RTX 30xx, A10), sm_89 (RTX 40xx, L4),
    sm_90 (H100/H200), sm_100 (B200), sm_120 (RTX 50xx); an arch the Triton in use cannot compile
    for is reported and skipped (Triton 3.6 and 3.9 compile for all seven)."""
    subset: Literal["full", "ci"] = "full"
    """full: every specialization; ci: head dims 64 and 128, widths 768 and 50257."""
    head_dims: tuple[int, ...] = field(default=(), metadata={"metavar": "D[,D]"})
    """Only these attention head dims."""
    widths: tuple[int, ...] = field(default=(), metadata={"metavar": "N[,N]"})
    """Only these row widths."""
    budget: str | None = field(default=None, metadata={"metavar": "FILE"})
    """Spill and instruction budget (default: the committed one)."""
    update_budget: bool = False
    """Write this run's SASS instructions per loop iteration into the budget file (for its
    Triton version and archs), then judge against it."""
    report_dir: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Write <arch>-triton-<version>.md reports there."""
    from_json: str | None = field(default=None, metadata={"metavar": "FILE"})
    """Compile nothing: judge the records of a JSON file written by --out against the budget,
    print them and (with report_dir) rewrite the reports."""
    quiet: bool = False
    """No progress line per compiled kernel on stderr, and of each arch's table only the
    failing rows (the summary as always)."""
    jobs: int = field(
        default_factory=lambda: min(2, os.cpu_count() or 1),
        metadata={"default_text": "up to 2"},
    )
    """Compile in this many processes."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, SelftestOptions)
    add_options(parser, CompileCheckOptions, "compile check (--compile-only)")


def run(args: argparse.Namespace) -> int:
    options = options_from_args(SelftestOptions, args)
    if options.compile_only:
        return _compile_only(options, options_from_args(CompileCheckOptions, args))
    return _gpu(options)


# --- compile check -----------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import torch
    import triton

    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _compile_only(options: SelftestOptions, check: CompileCheckOptions) -> int:
    from fastgpt.selftest import compile_check

    # The sweep needs the kernels compiled, never interpreted (and the GPU configs they pick);
    # the environment is put back after, for a caller that goes on interpreting (a test).
    with compile_check.environment(TRITON_INTERPRET=None):
        return _run_compile_only(options, check)


def _sweep_options(options: SelftestOptions, check: CompileCheckOptions):
    """The sweep's SweepOptions from the command's options."""
    from fastgpt.selftest import sweep

    return sweep.SweepOptions(
        ops=options.only,
        dtypes=options.dtypes,
        head_dims=check.head_dims,
        widths=check.widths,
        subset=check.subset,
    )


def _run_compile_only(options: SelftestOptions, check: CompileCheckOptions) -> int:
    from fastgpt.selftest import compile_check, report, sweep

    sweep_options = _sweep_options(options, check)
    unknown = [d for d in options.dtypes if d not in sweep.DTYPES]
    if unknown:
        return command_error(COMMAND, f"unknown dtype {unknown[0]!r}; dtypes: fp16, bf16, fp32")
    versions = _versions()
    started = time.perf_counter()
    try:
        budget = compile_check.load_budget(check.budget or compile_check.BUDGET_FILE)
        if options.dry_run:
            return _list_compile_plan(sweep_options, check.arch)
        if check.from_json:
            payload = json.loads(Path(check.from_json).read_text(encoding="utf-8"))
            records = compile_check.records_from_json(payload)
            records = [r for r in records if r.arch in check.arch]
            versions = {k: payload.get(k, "?") for k in versions}
            for record in records:
                compile_check.judge(record, budget)
        else:
            archs = _targetable(check.arch)
            records = compile_check.run_compile_check(
                archs, sweep_options, budget, check.jobs, progress=not check.quiet
            )
            if check.update_budget:
                budget = _update_budget(check, budget, records)
    except BrokenPipeError:  # the reader left (`| head`): the CLI stops quietly
        raise
    except (ValueError, RuntimeError, ImportError, OSError) as exc:
        return command_error(COMMAND, exc)
    wall = time.perf_counter() - started
    for arch in check.arch:
        _print_skipped(sweep_options, arch)
    if not records:
        return command_error(COMMAND, "nothing to compile: the filters match no case")
    versus = report.tutorial_ratios(records)
    rows = [report.compile_row(i, r, versus.get(id(r), "-")) for i, r in enumerate(records)]
    for arch in sorted({r.arch for r in records}, key=list(check.arch).index):
        mine = [
            row
            for row, r in zip(rows, records, strict=True)
            if r.arch == arch and not (check.quiet and r.ok)
        ]
        print(f"\n{report.ARCHS[arch].name}" + (": failing rows (--quiet)" if check.quiet else ""))
        if mine or not check.quiet:
            print(report.text_table(report.COMPILE_COLUMNS, mine))
    print()
    print(report.compile_summary(records))
    how = f"judged from {check.from_json}" if check.from_json else f"{wall:.0f} s wall"
    print(f"triton {versions['triton']}, torch {versions['torch']}: {how}")
    _write_compile_results(options, check, records, versions, wall)
    failed = [r for r in records if not r.ok]
    if failed:
        print(f"{len(failed)} specializations FAIL", file=sys.stderr)
        return 1
    return 0


def _print_skipped(options, arch: int) -> None:
    """One line naming the ops the sweep does not compile for `arch`, and why (none: nothing)."""
    from fastgpt.selftest import report

    line = report.skipped_line(options, arch)
    if line:
        print(line)


def _targetable(archs) -> list[int]:
    """The archs the Triton in use compiles for; one stderr line for each other, which is
    skipped. ValueError when none is left."""
    from fastgpt.selftest import analysis, compile_check

    with compile_check.environment(TRITON_INTERPRET=None):
        reasons = {arch: analysis.triton_can_target(arch) for arch in archs}
    for reason in filter(None, reasons.values()):
        print(f"skipped: {reason}", file=sys.stderr)
    usable = [arch for arch, reason in reasons.items() if reason is None]
    if not usable:
        raise ValueError("the Triton in use compiles for none of --arch")
    return usable


def _update_budget(check: CompileCheckOptions, budget: dict, records) -> dict:
    """Write the records' instructions per iteration into the budget file; the updated budget,
    against which every record is judged again."""
    from fastgpt.selftest import compile_check

    path = Path(check.budget or compile_check.BUDGET_FILE)
    budget = compile_check.record_instructions(records, budget)
    path.write_text(json.dumps(budget, indent=2) + "\n", encoding="utf-8")
    print(f"wrote the instructions per iteration of {len(records)} records into {path}")
    for record in records:
        record.problems.clear()
        compile_check.judge(record, budget)
    return budget


def _write_compile_results(
    options: SelftestOptions, check: CompileCheckOptions, records, versions, wall: float
) -> None:
    """The markdown reports (--report-dir) and the JSON records (--out)."""
    from fastgpt.selftest import report

    if check.report_dir:
        folder = Path(check.report_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for arch in sorted({r.arch for r in records}, key=list(check.arch).index):
            name = f"{report.ARCHS[arch].name}-triton-{versions['triton']}.md"
            command = _command_line(options, check)
            skipped = report.skipped_line(_sweep_options(options, check), arch)
            text = report.compile_markdown(records, arch, versions, command, skipped)
            (folder / name).write_text(text, encoding="utf-8")
            print(f"wrote {folder / name}")
    if options.out:
        out = Path(options.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"compile-triton-{versions['triton']}.json"
        payload = {**versions, "wall_s": round(wall, 1), "records": [r.as_dict() for r in records]}
        path.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
        print(f"wrote {path}")


def _command_line(options: SelftestOptions, check: CompileCheckOptions) -> str:
    """The options that shaped a compile sweep, as a command to rerun it."""
    parts = ["fastgpt selftest --compile-only", "--arch " + ",".join(f"sm_{a}" for a in check.arch)]
    if check.subset != "full":
        parts.append(f"--subset {check.subset}")
    for flag, values in (
        ("--only", options.only),
        ("--dtypes", options.dtypes),
        ("--head-dims", check.head_dims),
        ("--widths", check.widths),
    ):
        if values:
            parts.append(f"{flag} " + ",".join(map(str, values)))
    return " ".join([*parts, f"--report-dir {check.report_dir}"])


def _list_compile_plan(options, archs) -> int:
    """Print the cases per arch without compiling (the plan is made under the stub driver,
    since configs may depend on the arch)."""
    from fastgpt.selftest import analysis, arch_plan, stub_driver

    for arch in archs:
        with stub_driver.compiling_for(arch, lambda *a: None):
            cases = arch_plan.plan(options, arch)
        print(f"{analysis.ARCHS[arch].name}: {len(cases)} launcher calls")
        _print_skipped(options, arch)
        for case in cases:
            print(f"  {case.op} {case.pass_name} {case.label}")
    return 0


# --- GPU checks --------------------------------------------------------------------------


def _gpu(options: SelftestOptions) -> int:
    from fastgpt.selftest import gpu_check, report

    sizes = gpu_check.SMALL if options.small else gpu_check.GPU
    try:
        checks, left_out = gpu_check.plan_and_left_out(
            sizes, options.device, options.only, options.dtypes
        )
    except ValueError as exc:
        return command_error(COMMAND, f"{exc} (--only, --dtypes)")
    for line in left_out:
        print(line)
    if not checks:
        why = "this GPU runs none of them" if left_out else "--only and --dtypes match no check"
        return command_error(COMMAND, f"nothing to check: {why}")
    if options.dry_run:
        print(f"fastgpt selftest: {len(checks)} checks at {sizes.name} sizes on {options.device}")
        print(report.text_table(("group", "check"), [(c.group, c.name) for c in checks]))
        if options.bench:
            print("then: fastgpt bench --quick (same results folder)")
        return 0
    import torch

    from fastgpt.kernels._dispatch import triton_interpreter_enabled

    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return command_error(
            COMMAND,
            "no CUDA GPU here; `fastgpt selftest --compile-only` checks the kernels without "
            "one, `--dry-run` lists the GPU checks",
        )
    if device.type == "cpu" and not triton_interpreter_enabled():
        return command_error(
            COMMAND, "on CPU the kernels need Triton's interpreter: set TRITON_INTERPRET=1"
        )
    if device.type not in ("cuda", "cpu"):
        return command_error(COMMAND, f"unsupported device {options.device!r}: use cuda or cpu")
    out = Path(options.out) if options.out else _default_out(device)
    if not options.out:  # selftest.json and --bench's results: as `fastgpt bench` does
        from fastgpt.benchmarks.harness import refuse_tracked_default

        refuse_tracked_default(out)
    failed = _run_gpu_checks(checks, sizes.name, device, out, left_out)
    if options.bench:
        from fastgpt.benchmarks.harness import SuitesFailed
        from fastgpt.benchmarks.run import run_benchmarks

        try:
            run_benchmarks(quick=True, out_dir=out, device=device)
        except SuitesFailed as exc:
            return command_error("selftest", exc, code=1)
    return 1 if failed else 0


def _run_gpu_checks(checks: list, sizes_name: str, device, out: Path, left_out: list[str]) -> list:
    """Run the checks, print their table, write selftest.json into `out` (with the `left_out`
    lines); returns the failed results. selftest.json is rewritten after every check: a run
    stopped by a timeout keeps what it finished ("complete": false)."""
    from fastgpt.selftest import gpu_check, report

    out.mkdir(parents=True, exist_ok=True)
    print(f"fastgpt selftest: {len(checks)} checks at {sizes_name} sizes on {_device_name(device)}")
    header = {
        **_versions(),
        "device": _device_name(device),
        "sizes": sizes_name,
        "left_out": left_out,
    }
    started = time.perf_counter()

    def save(results: list, complete: bool = False) -> None:
        payload = {
            **header,
            "complete": complete,
            "planned": len(checks),
            "wall_s": round(time.perf_counter() - started, 1),
            "results": [r.as_dict() for r in results],
        }
        staged = out / "selftest.json.partial"
        staged.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        staged.replace(out / "selftest.json")

    results = gpu_check.run_checks(checks, on_result=save)
    save(results, complete=True)
    rows = [(r.group, r.name, r.status, f"{r.seconds:.1f}") for r in results]
    print()
    print(report.text_table(("group", "check", "status", "s"), rows))
    failed = [r for r in results if r.status != "pass"]
    wall = time.perf_counter() - started
    print(f"{len(results) - len(failed)}/{len(results)} passed in {wall:.0f} s")
    print(f"wrote {out / 'selftest.json'}")
    return failed


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (Triton interpreter)"


def _default_out(device) -> Path:
    from fastgpt.benchmarks.run import default_out_dir

    return Path(default_out_dir(device))
