"""Autotuned launch configs: pick the fastest of a few candidates once per shape bucket, on disk.

An op offers a short list of candidate configs for one shape bucket (its dtype, head dim or
width class, sequence-length bucket and arch), every one of them compiled by the compile check
(`fastgpt selftest --compile-only`: no spills past the budget, shared memory fits). The first
candidate is the pinned one: the interpreter, CPU tensors and `FASTGPT_AUTOTUNE=0` always get
it, so tests and CPU runs never time anything. On a GPU each bucket is timed once (every
candidate, the fastest kept) and the choice is written to a JSON file keyed by GPU name, Triton
version, op and bucket, so that tuning is paid once per machine and software stack:

    $FASTGPT_AUTOTUNE_CACHE, else ~/.cache/fastgpt/autotune/configs.json
    {"version": 1,
     "devices": {"NVIDIA H100 80GB HBM3|triton 3.6.0":
                 {"attention.forward|bf16|D=64|T<=1024|sm_90":
                  {"config": {"BLOCK_M": 128, ...}, "ms": [0.41, 0.37]}}}}

Depends on torch and triton only, like the rest of kernels/.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ._dispatch import triton_interpreter_enabled

CACHE_ENV = "FASTGPT_AUTOTUNE_CACHE"  # path of the JSON file
SWITCH_ENV = "FASTGPT_AUTOTUNE"  # "0": the pinned config on a GPU too
CACHE_VERSION = 1
# Sequence-length buckets: a length is tuned as the smallest bucket that holds it (the last one
# holds everything longer). Tile choices change with the number of tiles a head has, not with
# each length.
SEQ_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

Config = dict[str, int]
# Set by the compile check (`fastgpt selftest --compile-only`, which launches on a stub driver
# that compiles and runs nothing): then `choose` launches every candidate, so that each one is
# compiled and judged (spills, shared memory) although only the pinned one would run here.
COMPILE_EVERY_CANDIDATE = False


def seq_bucket(length: int) -> int:
    """The bucket of a sequence length: the smallest of SEQ_BUCKETS >= length (the largest
    for longer ones). Raises ValueError for a length below 1."""
    if length < 1:
        raise ValueError(f"sequence length must be >= 1, got {length}")
    return next((b for b in SEQ_BUCKETS if length <= b), SEQ_BUCKETS[-1])


def bucket_key(op: str, dtype: torch.dtype, size_class: str, seq_len: int, arch: str) -> str:
    """ "attention.forward|bf16|D=64|T<=1024|sm_90": what one tuned choice is valid for.
    size_class names the head dim or width class ("D=64", "N<=8192")."""
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return f"{op}|{DTYPE_NAMES[dtype]}|{size_class}|T<={seq_bucket(seq_len)}|{arch}"


def cache_path() -> Path:
    """$FASTGPT_AUTOTUNE_CACHE, else configs.json under ~/.cache/fastgpt/autotune."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "fastgpt" / "autotune" / "configs.json"


def tuning_device_key(device: torch.device) -> str | None:
    """ "GPU name|triton version" for a CUDA device that tunes; None where the pinned config
    runs (the interpreter, CPU tensors, FASTGPT_AUTOTUNE=0)."""
    device = torch.device(device)
    if device.type != "cuda" or triton_interpreter_enabled():
        return None
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return None
    import triton

    return f"{torch.cuda.get_device_name(device)}|triton {triton.__version__}"


def arch_name(device: torch.device) -> str:
    """ "sm_90" for a CUDA device of compute capability 9.0; "cpu" otherwise."""
    device = torch.device(device)
    if device.type != "cuda" or triton_interpreter_enabled():
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


class TuningCache:
    """The tuned choices in one JSON file, read once and rewritten whole (atomically: a
    temporary file renamed over it) after each new choice. A missing file is empty; one that
    is not this format is ignored with its contents left alone until the next choice replaces
    it (tuning again is only slower)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._devices: dict[str, dict[str, Any]] | None = None

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._devices is None:
            try:
                payload = json.loads(self.path.read_text(encoding="utf-8"))
            except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
                payload = {}
            devices = payload.get("devices") if isinstance(payload, dict) else None
            ok = isinstance(devices, dict) and payload.get("version") == CACHE_VERSION
            self._devices = devices if ok else {}
        return self._devices

    def get(self, device_key: str, key: str) -> Config | None:
        """The stored config of `key` on `device_key`, or None."""
        entry = self._load().get(device_key, {}).get(key)
        config = entry.get("config") if isinstance(entry, dict) else None
        return dict(config) if isinstance(config, dict) else None

    def put(
        self, device_key: str, key: str, config: Mapping[str, int], ms: list[float | None]
    ) -> None:
        """Store a choice and every candidate's time in candidate order (None: it failed to
        launch), and write the file."""
        devices = self._load()
        devices.setdefault(device_key, {})[key] = {"config": dict(config), "ms": ms}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": CACHE_VERSION, "devices": devices}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".autotune-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


_CACHES: dict[Path, TuningCache] = {}  # one per file, so a process reads its file once


def default_cache() -> TuningCache:
    path = cache_path()
    if path not in _CACHES:
        _CACHES[path] = TuningCache(path)
    return _CACHES[path]


def _bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn on the GPU (Triton's do_bench: warmed up, cache flushed)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=25))


def tracing(x: torch.Tensor) -> bool:
    """True while nothing may be timed: torch.compile tracing (fake tensors: a triton_op's
    launcher is traced so) or a CUDA graph being captured (timing would synchronize)."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(x):
        return True
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def choose(
    key: str,
    candidates: Sequence[Mapping[str, int]],
    launch: Callable[[Config], object],
    device_key: str | None,
    cache: TuningCache | None = None,
    timer: Callable[[Callable[[], object]], float] = _bench_ms,
    no_timing: bool = False,
) -> Config:
    """The config to launch for bucket `key`.

    - device_key None (pinned): candidates[0]; with COMPILE_EVERY_CANDIDATE the others are
      launched first, so that the compile check compiles them.
    - else the cached choice for (device_key, key) if it is still a candidate,
    - else, with `no_timing` (e.g. `tracing()`: nothing may run or be timed), candidates[0]
      untimed and not stored (an eager call, e.g. the warm-up before a compiled graph's
      capture, tunes the bucket),
    - else the fastest candidate by `timer(lambda: launch(config))` (milliseconds), stored.

    Tuning launches every candidate on the caller's tensors: `launch` must only write outputs
    that the real launch overwrites. A candidate that fails to launch (out of resources) is
    skipped; if all fail, the first one's error is raised. Raises ValueError for no
    candidates."""
    if not candidates:
        raise ValueError(f"no candidate configs for {key}")
    if device_key is None or len(candidates) == 1:
        if COMPILE_EVERY_CANDIDATE:
            for config in candidates[1:]:
                launch(dict(config))
        return dict(candidates[0])
    cache = default_cache() if cache is None else cache
    stored = cache.get(device_key, key)
    if stored is not None and stored in [dict(c) for c in candidates]:
        return stored
    if no_timing:
        return dict(candidates[0])
    times: list[float] = []
    first_error: Exception | None = None
    for config in candidates:
        try:
            times.append(timer(lambda config=config: launch(dict(config))))
        except Exception as exc:  # e.g. triton's OutOfResources on this GPU
            first_error = first_error or exc
            times.append(float("inf"))
    if all(t == float("inf") for t in times):
        raise first_error
    best = dict(candidates[times.index(min(times))])
    cache.put(device_key, key, best, [t if t != float("inf") else None for t in times])
    return best
