"""`fastgpt selftest`: check the GPU path.

fastgpt selftest                              # on a GPU: every op, the model, compile, training
fastgpt selftest --bench                      # ... then `fastgpt bench --quick` into --out
fastgpt selftest --dry-run                    # list the GPU checks; runs nothing
fastgpt selftest --compile-only               # no GPU needed: compile every kernel for sm_90,sm_80
fastgpt selftest --compile-only --subset ci   # CI's representative subset
fastgpt selftest --compile-only --report-dir benchmarks/results/compile   # rewrite the reports

The GPU run prints a pass/fail table and writes selftest.json to --out (default:
benchmarks/results/<gpu-name>/). The compile check prints one row per kernel specialization
and exits 1 when one fails to compile, overflows shared memory, spills past the committed
budget, or (sm_90) runs a 16-bit dot without wgmma. See fastgpt/selftest/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from fastgpt.cli import command_error

COMMAND = "selftest"


def _csv(convert):
    def parse(value: str):
        try:
            return tuple(convert(v) for v in value.split(",") if v.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _arch(value: str) -> int:
    from fastgpt.selftest.analysis import parse_arch

    return parse_arch(value)


def _switch(group, flag: str, help_text: str) -> None:
    group.add_argument(flag, action="store_true", help=help_text)


def _unset(group, flag: str, metavar: str, help_text: str) -> None:
    """An option that is None unless given."""
    group.add_argument(flag, default=None, metavar=metavar, help=help_text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _switch(
        parser,
        "--compile-only",
        "no GPU needed: compile every kernel specialization for --arch and judge "
        "registers, spills, shared memory and tensor-core use",
    )
    _switch(parser, "--dry-run", "list what would run (checks or compile cases)")
    _unset(
        parser,
        "--out",
        "DIR",
        "where selftest.json (and with --bench the benchmark results) go "
        "(default: benchmarks/results/<gpu-name>/; --compile-only: no JSON unless given)",
    )
    _switch(parser, "--bench", "after the checks, run `fastgpt bench --quick`")
    _switch(
        parser, "--small", "the tests' small sizes (on CPU: with TRITON_INTERPRET=1 --device cpu)"
    )
    parser.add_argument("--device", default="cuda", help="device of the GPU checks (cuda)")
    _add_compile_arguments(parser.add_argument_group("compile check (--compile-only)"))


def _add_compile_arguments(group) -> None:
    group.add_argument(
        "--arch",
        type=_csv(_arch),
        default=(90, 80),
        metavar="ARCH[,ARCH]",
        help="target archs: sm_90 (H100/H200), sm_80 (A100) (default: sm_90,sm_80)",
    )
    group.add_argument(
        "--subset",
        choices=("full", "ci"),
        default="full",
        help="full: every specialization; ci: head dims 64 and 128, widths 768 and 50257",
    )
    group.add_argument(
        "--only", type=_csv(str), default=(), metavar="OP[,OP]", help="only these ops"
    )
    group.add_argument("--dtypes", type=_csv(str), default=(), metavar="fp16,bf16,fp32")
    group.add_argument("--head-dims", type=_csv(int), default=(), metavar="D[,D]")
    group.add_argument("--widths", type=_csv(int), default=(), metavar="N[,N]")
    _unset(group, "--budget", "FILE", "spill budget (default: the committed one)")
    _unset(group, "--report-dir", "DIR", "write <arch>-triton-<version>.md reports there")
    _unset(
        group,
        "--from-json",
        "FILE",
        "compile nothing: judge the records of a JSON file written by --out against the "
        "budget, print them and (with --report-dir) rewrite the reports",
    )
    _switch(group, "--quiet", "no progress line per compiled kernel on stderr")
    group.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="compile in this many processes (default: up to 2)",
    )


def run(args: argparse.Namespace) -> int:
    if args.compile_only:
        return _compile_only(args)
    return _gpu(args)


# --- compile check -----------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import torch
    import triton

    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _compile_only(args: argparse.Namespace) -> int:
    from fastgpt.selftest import compile_check

    # The sweep needs the kernels compiled, never interpreted (and the GPU configs they pick);
    # the environment is put back after, for a caller that goes on interpreting (a test).
    with compile_check.environment(TRITON_INTERPRET=None):
        return _run_compile_only(args)


def _run_compile_only(args: argparse.Namespace) -> int:
    from fastgpt.selftest import compile_check, report, sweep

    options = sweep.SweepOptions(
        ops=args.only,
        dtypes=args.dtypes,
        head_dims=args.head_dims,
        widths=args.widths,
        subset=args.subset,
    )
    unknown = [d for d in args.dtypes if d not in sweep.DTYPES]
    if unknown:
        return command_error(COMMAND, f"unknown dtype {unknown[0]!r}; dtypes: fp16, bf16, fp32")
    versions = _versions()
    started = time.perf_counter()
    try:
        budget = compile_check.load_budget(args.budget or compile_check.BUDGET_FILE)
        if args.dry_run:
            return _list_compile_plan(options, args.arch)
        if args.from_json:
            payload = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
            records = compile_check.records_from_json(payload)
            records = [r for r in records if r.arch in args.arch]
            versions = {k: payload.get(k, "?") for k in versions}
            for record in records:
                compile_check.judge(record, budget)
        else:
            records = compile_check.run_compile_check(
                list(args.arch), options, budget, args.jobs, progress=not args.quiet
            )
    except (ValueError, RuntimeError, ImportError, OSError) as exc:
        return command_error(COMMAND, exc)
    wall = time.perf_counter() - started
    if not records:
        return command_error(COMMAND, "nothing to compile: the filters match no case")
    rows = [report.compile_row(i, r) for i, r in enumerate(records)]
    for arch in args.arch:
        print(f"\n{report.ARCHS[arch].name}")
        mine = [row for row, r in zip(rows, records, strict=True) if r.arch == arch]
        print(report.text_table(report.COMPILE_COLUMNS, mine))
    print()
    print(report.compile_summary(records))
    how = f"judged from {args.from_json}" if args.from_json else f"{wall:.0f} s wall"
    print(f"triton {versions['triton']}, torch {versions['torch']}: {how}")
    _write_compile_results(args, records, versions, wall)
    failed = [r for r in records if not r.ok]
    if failed:
        print(f"{len(failed)} specializations FAIL", file=sys.stderr)
        return 1
    return 0


def _write_compile_results(args: argparse.Namespace, records, versions, wall: float) -> None:
    """The markdown reports (--report-dir) and the JSON records (--out)."""
    from fastgpt.selftest import report

    if args.report_dir:
        folder = Path(args.report_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for arch in args.arch:
            name = f"{report.ARCHS[arch].name}-triton-{versions['triton']}.md"
            text = report.compile_markdown(records, arch, versions, _command_line(args))
            (folder / name).write_text(text, encoding="utf-8")
            print(f"wrote {folder / name}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"compile-triton-{versions['triton']}.json"
        payload = {**versions, "wall_s": round(wall, 1), "records": [r.as_dict() for r in records]}
        path.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
        print(f"wrote {path}")


def _command_line(args: argparse.Namespace) -> str:
    """The options that shaped a compile sweep, as a command to rerun it."""
    parts = ["fastgpt selftest --compile-only", "--arch " + ",".join(f"sm_{a}" for a in args.arch)]
    if args.subset != "full":
        parts.append(f"--subset {args.subset}")
    for flag, values in (
        ("--only", args.only),
        ("--dtypes", args.dtypes),
        ("--head-dims", args.head_dims),
        ("--widths", args.widths),
    ):
        if values:
            parts.append(f"{flag} " + ",".join(map(str, values)))
    return " ".join([*parts, f"--report-dir {args.report_dir}"])


def _list_compile_plan(options, archs) -> int:
    """Print the cases per arch without compiling (the plan is made under the stub driver,
    since configs may depend on the arch)."""
    from fastgpt.selftest import analysis, stub_driver, sweep

    for arch in archs:
        with stub_driver.compiling_for(arch, lambda *a: None):
            cases = sweep.plan(options)
        print(f"{analysis.ARCHS[arch].name}: {len(cases)} launcher calls")
        for case in cases:
            print(f"  {case.op} {case.pass_name} {case.label}")
    return 0


# --- GPU checks --------------------------------------------------------------------------


def _gpu(args: argparse.Namespace) -> int:
    from fastgpt.selftest import gpu_check, report

    sizes = gpu_check.SMALL if args.small else gpu_check.GPU
    checks = gpu_check.plan(sizes, args.device)
    if args.dry_run:
        print(f"fastgpt selftest: {len(checks)} checks at {sizes.name} sizes on {args.device}")
        print(report.text_table(("group", "check"), [(c.group, c.name) for c in checks]))
        if args.bench:
            print("then: fastgpt bench --quick (same results folder)")
        return 0
    import torch

    from fastgpt.kernels._dispatch import triton_interpreter_enabled

    device = torch.device(args.device)
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
        return command_error(COMMAND, f"unsupported device {args.device!r}: use cuda or cpu")
    out = Path(args.out) if args.out else _default_out(device)
    print(f"fastgpt selftest: {len(checks)} checks at {sizes.name} sizes on {_device_name(device)}")
    started = time.perf_counter()
    results = gpu_check.run_checks(checks)
    wall = time.perf_counter() - started
    rows = [(r.group, r.name, r.status, f"{r.seconds:.1f}") for r in results]
    print()
    print(report.text_table(("group", "check", "status", "s"), rows))
    failed = [r for r in results if r.status != "pass"]
    print(f"{len(results) - len(failed)}/{len(results)} passed in {wall:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        **_versions(),
        "device": _device_name(device),
        "sizes": sizes.name,
        "wall_s": round(wall, 1),
        "results": [r.as_dict() for r in results],
    }
    (out / "selftest.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    print(f"wrote {out / 'selftest.json'}")
    if args.bench:
        from fastgpt.benchmarks.harness import SuitesFailed
        from fastgpt.benchmarks.run import run_benchmarks

        try:
            run_benchmarks(quick=True, out_dir=out, device=device)
        except SuitesFailed as exc:
            return command_error("selftest", exc, code=1)
    return 1 if failed else 0


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (Triton interpreter)"


def _default_out(device) -> Path:
    from fastgpt.benchmarks.run import default_out_dir

    return Path(default_out_dir(device))
