"""Timing, memory, environment and hardware-limit measurement shared by every benchmark.

Every number a benchmark reports is either a time measured here or a ratio to something
measured in the same run:

- `time_ms(fn)`: median milliseconds of `fn()`. On CUDA through `triton.testing.do_bench`
  (CUDA events, warm-up, L2 cache flushed before each run); on CPU with `time.perf_counter`.
- `peak_memory_mb(fn)`: the highest `torch.cuda.max_memory_allocated` while `fn()` runs once,
  inputs included (None on CPU, where PyTorch keeps no such counter).
- `cpu_peak_bytes(fn)`: on CPU, the peak of live tensor bytes allocated while `fn()` runs once,
  from the profiler's allocation records.
- `measure_hardware_limits(device)`: device-to-device copy bandwidth (GB/s, bytes read plus
  bytes written) and dense matmul throughput (TFLOP/s; bf16 on CUDA, fp32 on CPU). These are the
  denominators of "% of copy bandwidth", "% of matmul TFLOP/s" and MFU.
- `environment(device)`: GPU (or CPU) name, torch/triton/python versions, git commit, UTC date;
  `short_commit` shortens a hex commit for headers and tables.
- The formulas: `memory_bound_bytes`, `attention_flops`, `mfu`.

Spec-sheet numbers (`fastgpt.devices.GPU_SPECS`) are kept only as clearly labelled references
next to the measured ones; nothing is computed against them unless the report says "spec".
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastgpt.devices import gpu_spec
from fastgpt.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout, when run from one


def results_root() -> Path:
    """Where `fastgpt bench` writes by default: ./benchmarks/results under the current folder
    (never inside the installed package)."""
    return Path.cwd() / "benchmarks" / "results"


DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass
class RunOptions:
    """What a suite runs: `quick` picks the small grids; `dtypes` (e.g. ("bf16",)) narrows the
    kernel benchmarks' dtypes (None: the grid's own); `checkpoint(records)` is called after
    every case with all records so far, so a run cut short still leaves its results."""

    quick: bool = False
    dtypes: tuple[str, ...] | None = None
    checkpoint: Callable[[list[dict[str, Any]]], None] | None = None

    def save(self, records: list[dict[str, Any]]) -> None:
        if self.checkpoint is not None:
            self.checkpoint(records)


class SuiteSkipped(Exception):
    """Raised by a suite that cannot run here at all (e.g. the hf suite without transformers):
    `run_benchmarks` prints the reason on one line and writes no results for the suite; a suite
    named in `only` that skips so fails the run."""


class SuitesFailed(Exception):
    """Raised by `run_benchmarks` once every suite has run and its results are written, when a
    whole suite did not run: an import failed (every row skipped with an ImportError, or the
    suite's own import), or a suite named in `only` was skipped. The message is one line."""


# --- formulas ------------------------------------------------------------------------------


def memory_bound_bytes(mode: str, numel: int, element_size: int) -> int:
    """Bytes a memory-bound elementwise/row op must move, the Triton tutorial's convention.

    forward reads x and writes y (2 tensors), backward reads x and dy and writes dx (3 tensors),
    forward+backward is the sum (5). Per-row statistics, weights and bias are O(rows + width)
    and left out. numel is the element count of x; element_size its bytes per element."""
    tensors = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}
    if mode not in tensors:
        raise ValueError(f"mode must be one of {tuple(tensors)}, got {mode!r}")
    return tensors[mode] * numel * element_size


def attention_flops(
    batch: int, heads: int, seq_len: int, head_dim: int, causal: bool, mode: str
) -> float:
    """FLOPs of attention, the FlashAttention papers' convention.

    forward: two matmuls (q·kᵀ and p·v) of 2·T·T·D each per head -> 4·B·H·T²·D, halved when
    causal (half the score matrix is masked). backward: 2.5× forward (five matmuls instead of
    two). forward+backward: 3.5× forward."""
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
    if mode not in factor:
        raise ValueError(f"mode must be one of {tuple(factor)}, got {mode!r}")
    flops = 4.0 * batch * heads * seq_len * seq_len * head_dim
    if causal:
        flops /= 2
    return flops * factor[mode]


def throughput(amount: float, ms: float) -> float:
    """amount per second, given milliseconds: bytes -> B/s, FLOPs -> FLOP/s."""
    if ms <= 0:
        raise ValueError(f"time must be positive, got {ms} ms")
    return amount / (ms * 1e-3)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilization, a fraction in [0, 1]:

        MFU = tokens/s × training FLOPs per token / peak FLOP/s

    with the FLOPs per token of `fastgpt.model.flops_per_token` (6·N + 12·L·T·d, PaLM/nanoGPT)
    and the peak the dense matmul throughput measured in the same run."""
    if peak_flops_per_s <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops_per_s}")
    return tokens_per_s * flops_per_token / peak_flops_per_s


# --- timing --------------------------------------------------------------------------------


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], Any],
    device: torch.device | str,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    grad_to_none: list[torch.Tensor] | None = None,
    min_reps: int = 3,
) -> float:
    """Median wall time of one `fn()` call in milliseconds.

    CUDA: `triton.testing.do_bench` (CUDA events around each call, L2 flushed before each,
    `grad_to_none` grads reset so backward does not accumulate). CPU: perf_counter around each
    call, repeated for about rep_ms and at least `min_reps` times after about warmup_ms."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(
                fn,
                warmup=warmup_ms,
                rep=rep_ms,
                grad_to_none=grad_to_none,
                return_mode="median",
            )
        )
    return _time_cpu_ms(fn, warmup_ms, rep_ms, grad_to_none, min_reps)


def _time_cpu_ms(fn, warmup_ms, rep_ms, grad_to_none, min_reps) -> float:
    def one_call() -> float:
        if grad_to_none is not None:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    first = one_call()  # also the warm-up of caches and lazy initialisation
    n_warmup = int(warmup_ms / max(first, 1e-3))
    for _ in range(min(n_warmup, 1000)):
        one_call()
    n_rep = max(min_reps, min(int(rep_ms / max(first, 1e-3)), 1000))
    return statistics.median(one_call() for _ in range(n_rep))


def time_steps_ms(
    step: Callable[[], Any], device: torch.device | str, warmup: int, reps: int
) -> float:
    """Median milliseconds of a long step (a training step, a whole generation) called
    `warmup` times untimed (compilation happens there), then `reps` times, each timed alone.
    CUDA events on GPU, perf_counter on CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], Any], device: torch.device | str) -> float | None:
    """Peak allocated CUDA memory in MiB while `fn()` runs once (everything alive counts, inputs
    included). None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of CPU tensor memory live at one time while `fn()` runs once, counted from
    what was live when it began (tensors made before are not counted; freeing one of them
    lowers the count).

    Counted from the profiler's memory records (`torch.profiler`, `profile_memory=True`): every
    allocation and free of PyTorch's CPU allocator in order. That sees every tensor, also those
    made inside a custom op, a compiled graph (inductor allocates outside the dispatcher) or the
    Triton interpreter, which a TorchDispatchMode watching op outputs would miss."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    ]
    events.sort(key=lambda e: e.start_ns())  # stable: records of one instant keep their order
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA (or CPU allocator) out-of-memory errors."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device | str) -> None:
    """Release cached blocks after a benchmark so the next starts from a clean allocator."""
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# --- hardware limits -------------------------------------------------------------------------


def measure_copy_bandwidth_gbps(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes), counting bytes read plus bytes
    written (2·nbytes per copy), as the memory-bound benchmarks count their traffic."""
    device = torch.device(device)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda dst=dst, src=src: dst.copy_(src), device, warmup_ms=50, rep_ms=200)
    del src, dst
    free_memory(device)
    return throughput(2 * nbytes, ms) / 1e9


def measure_matmul_tflops(
    device: torch.device | str, n: int = 8192, dtype: torch.dtype = torch.bfloat16
) -> float:
    """Dense n×n×n matmul throughput in TFLOP/s (2·n³ FLOPs per matmul)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    ms = time_ms(
        lambda a=a, b=b, out=out: torch.matmul(a, b, out=out), device, warmup_ms=100, rep_ms=300
    )
    del a, b, out
    free_memory(device)
    return throughput(2.0 * n**3, ms) / 1e12


def measure_hardware_limits(device: torch.device | str, quick: bool = False) -> dict[str, Any]:
    """Measured copy bandwidth and matmul throughput of `device`, the denominators of every
    "% of hardware" column. CUDA: 1 GiB copy and bf16 8192³ matmul. CPU: fp32 (the dtype CPU
    benchmarks run in) with smaller sizes."""
    device = torch.device(device)
    if device.type == "cuda":
        copy_bytes = (256 << 20) if quick else (1 << 30)
        n, dtype = 8192, torch.bfloat16
    else:
        copy_bytes = (64 << 20) if quick else (256 << 20)
        n, dtype = (1024 if quick else 2048), torch.float32
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    return {
        "copy_bandwidth_gbps": measure_copy_bandwidth_gbps(device, copy_bytes),
        "copy_bytes": copy_bytes,
        "matmul_tflops": measure_matmul_tflops(device, n, dtype),
        "matmul_shape": [n, n, n],
        "matmul_dtype": dtype_name,
    }


# --- environment -----------------------------------------------------------------------------


def git_commit(path: Path = REPO_ROOT) -> str:
    """The checked-out commit hash (with "-dirty" when tracked files changed) when the code runs
    from a git checkout, else the installed package's version ("fastgpt 0.1.0")."""
    from fastgpt import __version__

    unknown = f"fastgpt {__version__}"
    if not (path / ".git").exists():
        return unknown
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return unknown
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = "-dirty" if status.returncode == 0 and status.stdout.strip() else ""
        return commit.stdout.strip() + dirty
    except (OSError, subprocess.SubprocessError):
        return unknown


def refuse_tracked_default(folder: Path) -> None:
    """UsageError when `folder`, a command's default results folder, holds files git tracks:
    committed results are replaced only when --out names the folder."""
    if tracked := tracked_files(folder):
        raise UsageError(
            f"--out: the default results folder {folder} holds files git tracks "
            f"({', '.join(tracked[:3])}{', ...' if len(tracked) > 3 else ''}): pass --out "
            f"{folder} to replace them, or another folder"
        )


def tracked_files(folder: Path) -> list[str]:
    """The files under `folder` that git tracks, as git names them, when `folder` lies in a git
    checkout; [] outside one, for a folder that does not exist, or without git."""
    if not folder.is_dir():
        return []
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--", "."], cwd=folder, capture_output=True, text=True,
            timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [n for n in listing.stdout.split("\0") if n] if listing.returncode == 0 else []


def short_commit(commit: str) -> str:
    """A git commit for a header or table: a hex hash cut to 12 characters ("-dirty" kept);
    anything else ("fastgpt 0.1.0", "unknown") whole."""
    match = re.fullmatch(r"([0-9a-f]{12})[0-9a-f]*(-dirty)?", commit)
    if match is None:
        return commit
    return match.group(1) + (match.group(2) or "")


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def slugify(name: str) -> str:
    """A folder-safe name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


def results_slug(device: torch.device | str) -> str:
    """The results folder name of a device: the GPU name, or "cpu-<cpu name>"."""
    device = torch.device(device)
    name = slugify(device_name(device))
    return name if device.type == "cuda" else f"cpu-{name}"[:80].rstrip("-")


def spec_sheet(gpu_name: str) -> dict[str, Any] | None:
    """The spec-sheet reference for a GPU name (`fastgpt.devices.GPU_SPECS`, the one table of
    vendor peaks; labelled with the board it matched), or None. For reference only: the
    benchmarks divide by the limits they measure themselves."""
    spec = gpu_spec(gpu_name)
    if spec is None:
        return None
    return {"source": "vendor spec sheet, dense", **dataclasses.asdict(spec)}


def environment(device: torch.device | str) -> dict[str, Any]:
    """Where and when the numbers were taken; stored with every results file."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    env: dict[str, Any] = {
        "device_type": device.type,
        "device_name": device_name(device),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_name": cpu_name(),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_sm_count"] = props.multi_processor_count
        env["spec_sheet_reference"] = spec_sheet(env["gpu_name"])
    return env
