"""`fastgpt bench`: benchmark our kernels, a training step and generation against PyTorch,
and Hugging Face's GPT-2 with and without our kernels patched in (suite "hf").

fastgpt bench                          # everything (on a GPU: run suites separately if slow)
fastgpt bench --quick                  # a few shapes of each suite
fastgpt bench --only attention         # one suite; also "layernorm,gelu"
fastgpt bench --out my-results/        # default: benchmarks/results/<gpu-name>/
fastgpt bench --report-only --out DIR  # rebuild summary.md and plots from DIR/*.json

Tables go to stdout; `<suite>.json`, `<suite>.png` and `summary.md` to the results folder
(suites run separately are merged into one summary.md). Every number is timed in the same run
as the PyTorch baselines and the hardware limits it is compared with. Without a GPU only the
torch backend is measured on CPU: Triton kernels are never timed through the interpreter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastgpt.cli import command_error
from fastgpt.errors import UsageError

SUITE_HELP = "layernorm, gelu, attention, loss, train, generate, hf"


def suites_arg(value: str) -> list[str]:
    """argparse type of --only: a comma-separated list of known suites."""
    from fastgpt.benchmarks.run import parse_only

    try:
        return parse_only(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def dtypes_arg(value: str) -> tuple[str, ...] | None:
    """argparse type of --dtypes: a comma-separated list of bf16, fp16, fp32."""
    from fastgpt.benchmarks.run import parse_dtypes

    try:
        return parse_dtypes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        type=suites_arg,
        default=None,
        metavar="SUITE[,SUITE...]",
        help=f"run only these suites (comma-separated): {SUITE_HELP} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="a few shapes per suite")
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="results folder (default: ./benchmarks/results/<gpu-name>/ under the current "
        "folder, or cpu-<cpu-name>/)",
    )
    parser.add_argument(
        "--dtypes",
        type=dtypes_arg,
        default=None,
        metavar="DTYPE[,DTYPE...]",
        help="kernel benchmarks only in these dtypes: bf16, fp16, fp32 "
        "(default: bf16 and fp16 on GPU, bf16 alone with --quick; fp32 on CPU)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cuda, cuda:1, cpu (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rebuild summary.md and the plots from the JSON files in --out "
        "(e.g. after suites ran separately or a run was cut short)",
    )


def run(args: argparse.Namespace) -> int:
    from fastgpt.benchmarks.harness import SuitesFailed
    from fastgpt.benchmarks.run import default_out_dir, run_benchmarks
    from fastgpt.devices import resolve_device
    from fastgpt.files import check_writable_folder

    device = resolve_device(args.device)
    out = Path(args.out) if args.out is not None else default_out_dir(device)
    if args.report_only:
        from fastgpt.benchmarks.report import load_results, write_all

        if not load_results(out):
            raise UsageError(f"--report-only: {out} holds no <suite>.json files (see --out)")
        written = write_all(out)
        print(f"rebuilt {', '.join(sorted(p.name for p in written.values()))} in {out}")
        return 0
    check_writable_folder(out, "out")
    try:
        run_benchmarks(
            only=args.only, quick=args.quick, out_dir=out, device=device, dtypes=args.dtypes
        )
    except SuitesFailed as exc:  # what did run is written; the run as a whole failed
        return command_error("bench", exc, code=1)
    return 0
