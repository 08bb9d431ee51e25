"""What a run reports: run.json, metrics.jsonl, loss.png, and throughput as tokens/s and MFU.

run.json, written before the first step, records how each run was started: {"runs": [one record
per invocation, oldest first]}, a resumed run appending its own to those of the runs before it.
A record holds the command line, every option's value, the step it started at and the
checkpoint it resumed from, the device, GPU, number of ranks and precision, the versions of
fastgpt, torch, triton and Python, and the git commit of fastgpt's code when it runs from a
checkout (`environment`).

metrics.jsonl has one JSON object per line; "kind" is "train" (the mean loss of a log interval,
lr, gradient norm, tokens/s, MFU) or "eval" (train and validation loss, the task's extra
metrics, a text sample). Throughput counts the input tokens of all ranks per second of training
time (evaluation excluded), and

    MFU = tokens/s · flops_per_token / (peak_flops_per_gpu · world_size)

with flops_per_token = 6·N + 12·L·T·d (`fastgpt.model.flops_per_token`: forward + backward) and
the GPU's dense bf16 peak from `fastgpt.devices.GPU_SPECS` (None on CPU or an unknown GPU).
"""

from __future__ import annotations

import collections
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch

from fastgpt.errors import UsageError
from fastgpt.files import write_atomically

METRICS_NAME = "metrics.jsonl"
RUN_RECORD_NAME = "run.json"
PLOT_NAME = "loss.png"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file ([] when it does not exist); UsageError naming the
    file and line when one is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record = exc
            if not isinstance(record, dict):
                raise UsageError(
                    f"{path}, line {number}: not a metrics record (a JSON object); restore the "
                    "file or start the run over with --overwrite"
                )
            records.append(record)
    return records


class MetricsLog:
    """metrics.jsonl and run.json of one run, written by rank 0 only (`enabled`), and the
    `loggers` (sinks) every record also goes to; `history` keeps this run's records on every
    rank.

    An earlier run's metrics.jsonl or run.json (resumed or overwritten) is never replaced before
    this run has something to put in its place: the new file is written beside it as
    NAME.partial and replaces it at `commit()` (the trainer commits with every checkpoint and at
    the end); a run that fails first leaves it byte-identical."""

    def __init__(self, out_dir: Path, enabled: bool, loggers: Sequence[str] = ()):
        self.path = Path(out_dir) / METRICS_NAME
        self.run_path = Path(out_dir) / RUN_RECORD_NAME
        self.enabled = enabled
        self.loggers = tuple(loggers)
        self.sinks: list[MetricsSink] = []
        self.history: list[dict[str, Any]] = []
        self._file = None
        self._pending: list[Path] = []  # files of an earlier run this run's .partial replaces

    def open(self, keep_up_to: int | None, run_record: dict[str, Any] | None = None) -> None:
        """Start the sinks, write `run_record` to run.json (unless None), start metrics.jsonl.
        When resuming, keep the records up to step `keep_up_to` (those logged after the
        checkpoint are dropped, they will be logged again) and the run.json records of the runs
        that started before it: run.json lists every run that led to the checkpoint, oldest
        first."""
        if not self.enabled:
            return
        kept, runs = [], []
        if keep_up_to is not None:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_up_to]
            runs = [r for r in read_run_records(self.run_path) if r["start_step"] < keep_up_to]
        self.sinks = open_sinks(self.loggers, self.path.parent, run_record or {}, keep_up_to)
        if run_record is not None:
            with open(self._target(self.run_path), "w", encoding="utf-8") as f:
                json.dump({"runs": [*runs, run_record]}, f, indent=2, default=str)
                f.write("\n")
        self._file = open(self._target(self.path), "w", encoding="utf-8")  # noqa: SIM115
        for record in kept:
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def _target(self, path: Path) -> Path:
        """Where this run writes `path`: beside an earlier run's file, or in its place."""
        if not path.exists():
            return path
        self._pending.append(path)
        return _partial(path)

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        for sink in self.sinks:
            sink.log(record)

    def commit(self) -> None:
        """Put this run's files in the place of the earlier ones (metrics.jsonl is written to
        from then on as it is: the open file moves with the rename)."""
        if self._file is not None:
            for path in self._pending:
                os.replace(_partial(path), path)
            self._pending = []

    def close(self, completed: bool = True) -> None:
        """Close the file and the sinks; a run that did not complete drops its partial files
        (the earlier run's stay as they were)."""
        if self._file is None:
            return
        if completed:
            self.commit()
        self._file.close()
        self._file = None
        for path in self._pending:
            _partial(path).unlink(missing_ok=True)
        self._pending = []
        for sink in self.sinks:
            sink.close(completed)
        self.sinks = []


class MetricsSink(Protocol):
    """Where `--logger` sends each record metrics.jsonl gets (rank 0 only)."""

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self, completed: bool) -> None: ...


def _values(record: dict[str, Any]) -> Iterator[tuple[str, float | str]]:
    """("<kind>/<key>", value) of every number and text of a record but its step: "train/loss",
    "eval/val_loss", "eval/sample", "warning/message"."""
    kind = record.get("kind", "record")
    for key, value in record.items():
        if key in ("kind", "step") or value is None or isinstance(value, bool):
            continue
        if isinstance(value, (int, float, str)):
            yield f"{kind}/{key}", value


class TensorBoardSink:
    """Event files in out_dir/tensorboard: numbers as scalars, texts (samples, warnings) as
    text, at the record's step. A resumed run hides the earlier events after its checkpoint's
    step (TensorBoard's purge_step), as metrics.jsonl drops them."""

    def __init__(self, out_dir: Path, resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = resumed_at + 1 if resumed_at is not None else None
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step", 0)
        for name, value in _values(record):
            if isinstance(value, str):
                self.writer.add_text(name, value, step)
            else:
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self, completed: bool) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run named after out_dir (project WANDB_PROJECT or "fastgpt", files
    in WANDB_DIR or out_dir; WANDB_MODE=offline keeps it on disk), its config the run record of
    run.json, each record logged at its step. Each invocation, resumed or not, is a run of its
    own."""

    def __init__(self, out_dir: Path, run_record: dict[str, Any]):
        import wandb

        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "fastgpt"),
                name=out_dir.name,
                dir=os.environ.get("WANDB_DIR", str(out_dir)),
                config=json.loads(json.dumps(run_record, default=str)),
            )
        except wandb.Error as exc:  # not logged in, no network, ...
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(
                f"{{loggers}} wandb: {first_line} (log in with `wandb login`, or set "
                "WANDB_MODE=offline)"
            ) from None

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(dict(_values(record)), step=record.get("step", 0))

    def close(self, completed: bool) -> None:
        self.run.finish(exit_code=0 if completed else 1)


def open_sinks(
    loggers: Sequence[str], out_dir: Path, run_record: dict[str, Any], resumed_at: int | None
) -> list[MetricsSink]:
    """A sink per name of `loggers` ("tensorboard", "wandb"; TrainConfig checked the names and
    that their packages are installed)."""
    sinks: list[MetricsSink] = []
    for name in loggers:
        if name == "tensorboard":
            sinks.append(TensorBoardSink(out_dir, resumed_at))
        else:
            sinks.append(WandbSink(out_dir, run_record))
    return sinks


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def read_run_records(path: str | Path) -> list[dict[str, Any]]:
    """The run records of a run.json ([] when it does not exist), oldest first; UsageError
    naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        runs = json.loads(path.read_text(encoding="utf-8"))["runs"]
        if not all(isinstance(r, dict) and type(r["start_step"]) is int for r in runs):
            raise ValueError
    except (ValueError, KeyError, TypeError):  # JSONDecodeError is a ValueError
        raise UsageError(
            f"{path}: not a run record of fastgpt; restore the file or start the run over with "
            "--overwrite"
        ) from None
    return runs


def git_checkout(folder: Path) -> dict[str, Any] | None:
    """{"commit": hash, "dirty": whether tracked files differ from it} of the git checkout whose
    tracked files include `folder`'s; None outside one (an installed package inside a project's
    ignored .venv is not that project's code), or without git."""

    def git(*args: str) -> str:
        command = ["git", "-C", str(folder), *args]
        run = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True)
        return run.stdout

    try:
        git("ls-files", "--error-unmatch", ".")  # fails unless git tracks files in folder
        commit = git("rev-parse", "HEAD").strip()
        changes = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # no git, not tracked, too slow
        return None
    return {"commit": commit, "dirty": bool(changes.strip())}


def environment(device: torch.device, world_size: int) -> dict[str, Any]:
    """What a run ran on and with: the command line, the versions of fastgpt, torch, triton and
    Python, the git commit of fastgpt's code when it runs from a checkout, the device (and
    GPU), the number of ranks."""
    import fastgpt

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "command": shlex.join(sys.argv),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "fastgpt": fastgpt.__version__,
            "torch": torch.__version__,
            "triton": triton_version,
            "python": platform.python_version(),
        },
        "git": git_checkout(Path(fastgpt.__file__).parent),
        "device": str(device),
        "gpu": gpu,
        "world_size": world_size,
    }


@dataclass
class Throughput:
    """tokens/s and MFU of an interval of training steps."""

    peak_flops: float | None  # per GPU; None: no MFU
    flops_per_token: Callable[[int], float] | None  # of the sequence length
    world_size: int = 1

    def __call__(self, tokens: int, seconds: float, seq_len: int) -> tuple[float, float | None]:
        """(tokens/s, MFU or None) for `tokens` trained on in `seconds`."""
        tokens_per_s = tokens / seconds if seconds > 0 else 0.0
        if not (self.peak_flops and self.flops_per_token and seq_len):
            return tokens_per_s, None
        flops = tokens_per_s * self.flops_per_token(seq_len)
        return tokens_per_s, flops / (self.peak_flops * self.world_size)


class Interval:
    """Sums over the steps since the last log line (or evaluation)."""

    def __init__(self):
        self.loss, self.steps, self.tokens, self.time = 0.0, 0, 0, 0.0
        self.norm: float | None = None

    def add(self, loss: float, tokens: int, seconds: float, grad_norm: float) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens
        self.time += seconds
        if math.isfinite(grad_norm):  # fp16: a skipped step's overflowing norm is not kept
            self.norm = grad_norm  # the last step's

    @property
    def mean_loss(self) -> float:
        return self.loss / max(1, self.steps)

    def state_dict(self) -> dict[str, float]:
        """The sums, plain numbers (a checkpoint keeps them)."""
        return dict(vars(self))

    @classmethod
    def from_state(cls, state: dict[str, float] | None) -> Interval:
        """An interval holding `state_dict()`'s sums (None: an empty one)."""
        interval = cls()
        interval.__dict__.update(state or {})
        return interval


class DivergenceWatch:
    """Warns once (stderr and a "warning" record in metrics.jsonl) when, after warmup, the
    training loss has grown far above where it started: a learning rate too high for the model
    trains on silently otherwise, to a validation loss of 1e18. Both ends are means over
    `window` steps: on a small batch one step's loss is noise (a classifier at 0.59 shows 1.24
    on one batch of two examples without diverging)."""

    FACTOR = 2.0  # "far above": twice the mean of the first steps' losses

    def __init__(self, warmup_steps: int, window: int = 20):
        self.warmup_steps = warmup_steps
        self.window = window
        self.first: list[float] = []  # the first `window` losses
        self.recent: collections.deque[float] = collections.deque(maxlen=window)
        self.warned = False

    def check(self, step: int, loss: float, metrics: MetricsLog, bar) -> None:
        if len(self.first) < self.window:
            self.first.append(loss)
        self.recent.append(loss)
        if self.warned or step <= self.warmup_steps or len(self.recent) < self.window:
            return
        start, now = sum(self.first) / len(self.first), sum(self.recent) / len(self.recent)
        if now <= self.FACTOR * start:
            return
        self.warned = True
        over = f"over the last {self.window} steps " if self.window > 1 else ""
        message = (
            f"step {step}: the training loss {over}{now:.4g} is over {self.FACTOR:g}x its "
            f"first value {start:.4g}: the run is diverging (try a lower --lr)"
        )
        metrics.log({"kind": "warning", "step": step, "message": message})
        if metrics.enabled:
            bar.write(f"warning: {message}", file=sys.stderr)


def save_loss_plot(metrics_path: Path, path: Path) -> Path | None:
    """loss.png: training loss (the mean of each log interval) and validation loss against
    tokens seen, from metrics.jsonl; None when it holds nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:  # the mean of each log interval; a lone point needs a marker to be seen
        ax.plot([r["tokens_seen"] for r in train], [r["loss"] for r in train],
                marker="o" if len(train) == 1 else None, label="training loss")  # fmt: skip
    else:  # log_every longer than the run: the means between evaluations
        ax.plot([r["tokens_seen"] for r in evals], [r["train_loss"] for r in evals],
                marker="o", label="training loss")  # fmt: skip
    with_val = [r for r in evals if r.get("val_loss") is not None]
    if with_val:
        ax.plot([r["tokens_seen"] for r in with_val], [r["val_loss"] for r in with_val],
                marker="o", linestyle="--", label="validation loss")  # fmt: skip
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (cross-entropy, nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix[1:]))
    finally:
        plt.close(fig)
    return path
