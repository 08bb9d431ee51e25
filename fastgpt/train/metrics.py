"""What a run reports: metrics.jsonl, loss.png, and throughput as tokens/s and MFU.

metrics.jsonl has one JSON object per line; "kind" is "train" (the mean loss of a log interval,
lr, gradient norm, tokens/s, MFU) or "eval" (train and validation loss, the task's extra
metrics, a text sample). Throughput counts the input tokens of all ranks per second of training
time (evaluation excluded), and

    MFU = tokens/s · flops_per_token / (peak_flops_per_gpu · world_size)

with flops_per_token = 6·N + 12·L·T·d (`fastgpt.model.flops_per_token`: forward + backward) and
the GPU's dense bf16 peak from `fastgpt.devices.GPU_SPECS` (None on CPU or an unknown GPU).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastgpt.errors import UsageError

METRICS_NAME = "metrics.jsonl"
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
    """metrics.jsonl of one run, written by rank 0 only (`enabled`); `history` keeps this
    run's records on every rank.

    A metrics.jsonl of an earlier run (resumed or overwritten) is never truncated before this
    run has something to put in its place: the new file grows beside it as
    metrics.jsonl.partial and replaces it at `commit()` (the trainer commits with every
    checkpoint and at the end); a run that fails first leaves it byte-identical."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.path = Path(out_dir) / METRICS_NAME
        self.partial = self.path.with_name(METRICS_NAME + ".partial")
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self._file = None
        self._pending = False  # writing to the partial file

    def open(self, keep_up_to: int | None) -> None:
        """Start the file; when resuming, keep the records up to step `keep_up_to` (those
        logged after the checkpoint are dropped, they will be logged again)."""
        if not self.enabled:
            return
        kept = []
        if keep_up_to is not None:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_up_to]
        self._pending = self.path.exists()
        target = self.partial if self._pending else self.path
        self._file = open(target, "w", encoding="utf-8")  # noqa: SIM115 (closed in close)
        for record in kept:
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def commit(self) -> None:
        """Put this run's file in the place of the earlier one (it is written to from then on
        as it is: the open file moves with the rename)."""
        if self._pending and self._file is not None:
            os.replace(self.partial, self.path)
            self._pending = False

    def close(self, completed: bool = True) -> None:
        """Close the file; a run that did not complete drops its partial file (the earlier
        run's metrics.jsonl stays as it was)."""
        if self._file is None:
            return
        if completed:
            self.commit()
        self._file.close()
        self._file = None
        if self._pending:
            self.partial.unlink(missing_ok=True)
            self._pending = False


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
        self.loss, self.steps, self.tokens, self.time, self.norm = 0.0, 0, 0, 0.0, 0.0

    def add(self, loss: float, tokens: int, seconds: float, grad_norm: float) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens
        self.time += seconds
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
    trains on silently otherwise, to a validation loss of 1e18."""

    FACTOR = 2.0  # "far above": twice the first step's loss

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps
        self.first_loss: float | None = None
        self.warned = False

    def check(self, step: int, loss: float, metrics: MetricsLog, bar) -> None:
        if self.first_loss is None:
            self.first_loss = loss
            return
        if self.warned or step <= self.warmup_steps or loss <= self.FACTOR * self.first_loss:
            return
        self.warned = True
        message = (
            f"step {step}: the training loss {loss:.4g} is over {self.FACTOR:g}x its first "
            f"value {self.first_loss:.4g}: the run is diverging (try a lower --lr)"
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
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
