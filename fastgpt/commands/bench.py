"""`fastgpt bench`: benchmark our kernels, a training step and generation against PyTorch,
and Hugging Face's GPT-2 with and without our kernels patched in (suite "hf").

fastgpt bench                          # everything (on a GPU: run suites separately if slow)
fastgpt bench --quick                  # a few shapes of each suite
fastgpt bench --only attention         # one suite; also "layernorm,gelu"
fastgpt bench --out my-results/        # default: benchmarks/results/<gpu-name>/
                                       #   (in a checkout: unless git tracks files there)
fastgpt bench --report-only --out DIR  # rebuild summary.md and plots from DIR/*.json

Tables go to stdout; `<suite>.json`, `<suite>.png` and `summary.md` to the results folder
(suites run separately are merged into one summary.md). Every number is timed in the same run
as the PyTorch baselines and the hardware limits it is compared with. Without a GPU only the
torch backend is measured on CPU: Triton kernels are never timed through the interpreter.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from fastgpt.cli import command_error
from fastgpt.errors import UsageError
from fastgpt.options import add_options, options_from_args


def _suites(text: str) -> list[str]:
    """--only: a comma-separated list of known suites (ValueError names an unknown one)."""
    from fastgpt.benchmarks.run import parse_only

    return parse_only(text)


def _dtypes(text: str) -> tuple[str, ...] | None:
    """--dtypes: a comma-separated list of bf16, fp16, fp32."""
    from fastgpt.benchmarks.run import parse_dtypes

    return parse_dtypes(text)


@dataclass
class BenchOptions:
    """What `fastgpt bench` measures, where, and where its results go."""

    only: list[str] | None = field(
        default=None, metadata={"type": _suites, "metavar": "SUITE[,SUITE...]"}
    )
    """Run only these suites (comma-separated): layernorm, gelu, attention, loss, train,
    generate, hf (default: all)."""
    quick: bool = False
    """A few shapes per suite."""
    out: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Results folder (default: ./benchmarks/results/<gpu-name>/ under the current folder, or
    cpu-<cpu-name>/; a default folder holding files git tracks is refused: name it here to
    replace them)."""
    dtypes: tuple[str, ...] | None = field(
        default=None, metadata={"type": _dtypes, "metavar": "DTYPE[,DTYPE...]"}
    )
    """Kernel benchmarks only in these dtypes: bf16, fp16, fp32 (default: bf16 and fp16 on GPU,
    bf16 alone with --quick; fp32 on CPU)."""
    device: str | None = None
    """cuda, cuda:1, cpu (default: cuda if available, else cpu)."""
    report_only: bool = False
    """Measure nothing: rebuild summary.md and the plots from the JSON files in --out (e.g.
    after suites ran separately or a run was cut short)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, BenchOptions)


def run(args: argparse.Namespace) -> int:
    from fastgpt.benchmarks.harness import SuitesFailed, refuse_tracked_default
    from fastgpt.benchmarks.run import default_out_dir, run_benchmarks
    from fastgpt.devices import resolve_device
    from fastgpt.files import check_writable_folder

    options = options_from_args(BenchOptions, args)
    device = resolve_device(options.device)
    out = Path(options.out) if options.out is not None else default_out_dir(device)
    if options.out is None:
        refuse_tracked_default(out)
    if options.report_only:
        from fastgpt.benchmarks.report import load_results, write_all

        if not load_results(out):
            raise UsageError(f"--report-only: {out} holds no <suite>.json files (see --out)")
        written = write_all(out)
        print(f"rebuilt {', '.join(sorted(p.name for p in written.values()))} in {out}")
        return 0
    check_writable_folder(out, "out")
    try:
        run_benchmarks(
            only=options.only,
            quick=options.quick,
            out_dir=out,
            device=device,
            dtypes=options.dtypes,
        )
    except SuitesFailed as exc:  # what did run is written; the run as a whole failed
        return command_error("bench", exc, code=1)
    return 0
