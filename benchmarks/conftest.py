"""pytest-benchmark suite: `pytest benchmarks/ --benchmark-only`.

pyproject.toml runs tests on two xdist workers (`-n 2`), under which pytest-benchmark refuses
to time anything; with --benchmark-only the hook below turns the workers off (`-n 0` does the
same by hand). The CI suite never collects this folder (testpaths = tests).

On CUDA every case runs our Triton kernels and PyTorch's baselines; on CPU only the torch
backend and PyTorch's own ops are timed, like `fastgpt bench`. `fastgpt bench` remains the
place for the reported numbers (CUDA events, L2 flushed, % of measured hardware limits); here
each call is timed on the host around a device synchronize.

This conftest only defines fixtures for this folder; it changes no environment variables, so
running `pytest tests benchmarks` leaves the test suite's own set-up (tests/conftest.py) alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from fastgpt.benchmarks import harness

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """`pytest benchmarks/ --benchmark-only`: run in one process (timings need the machine to
    themselves, and pytest-benchmark disables itself under xdist)."""
    if config.getoption("benchmark_only", default=False) and getattr(
        config.option, "numprocesses", None
    ):
        config.option.numprocesses = 0


@pytest.fixture
def bench_device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def environment() -> dict[str, Any]:
    """GPU (or CPU) name, torch/triton versions, git commit and UTC date of this session."""
    return harness.environment(DEVICE)


@pytest.fixture
def timed(benchmark, environment) -> Callable[..., Any]:
    """timed(fn, **extra_info): benchmark `fn()` with a device synchronize after each call;
    `extra_info` values that are callables of the median seconds are evaluated after the run
    (e.g. GB/s). Every record also carries `environment` (device, versions, commit, date)."""

    def run(fn: Callable[[], Any], **extra: Any) -> None:
        def call() -> None:
            fn()
            harness.synchronize(DEVICE)

        call()  # warm-up: compilation, autotuning, lazy initialisation
        benchmark(call)
        stats = getattr(benchmark, "stats", None)
        median_s = stats.stats.median if stats is not None else None
        for key, value in extra.items():
            if callable(value):
                value = value(median_s) if median_s else None
            benchmark.extra_info[key] = value
        benchmark.extra_info.update(environment)

    return run
