"""The Trainer's part of checkpoint.pt: the state it saves, and `--resume` applying it.

    state_dict()               model, optimizer, scheduler, step, data position, tokens seen,
                               the log/eval intervals, fp16's loss scaler, the run's identity
    load_state_dict(state)     refuses a checkpoint of another run or model, then restores all
                               of that (the LR schedule is this run's from the resumed step on)

The file itself (when it is written, atomic writes, reading it, every rank's RNG states) is
`checkpoint.Checkpointer`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastgpt.errors import UsageError
from fastgpt.train.metrics import Interval


class TrainerState:
    """The checkpoint methods of `loop.Trainer`, which it inherits; they read and set the
    Trainer's model, optimizer, scheduler, scaler, batches, intervals, step and tokens_seen."""

    def state_dict(self) -> dict[str, Any]:
        """What checkpoint.pt holds (the Checkpointer adds every rank's RNG states)."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            **self.batches.state_dict(),
            "tokens_seen": self.tokens_seen,
            "world_size": self.dist.world_size,
            "train_config": self.config.to_dict(),
            "run": self.run_info,
            "intervals": {
                "log": self._since_log.state_dict(),
                "eval": self._since_eval.state_dict(),
            },
        }
        if self.scaler.is_enabled():  # plain numbers: loads with weights_only=True
            state["scaler"] = self.scaler.state_dict()
            state["skipped_steps"] = self.skipped_steps
        model_config = getattr(self.model, "config", None)
        if model_config is not None and hasattr(model_config, "to_dict"):
            state["model_config"] = model_config.to_dict()
        return state

    def _differences(self, state: dict[str, Any]) -> list[str]:
        """What differs between a checkpoint's run and this one: "task pretrain vs
        finetune-classify", "emb_dim 64 vs 32", ... ([] when nothing is recorded)."""
        ours: dict[str, Any] = dict(self.run_info)
        theirs: dict[str, Any] = dict(state.get("run") or {})
        data = theirs.get("data")
        if isinstance(data, str) and data != "default" and not Path(data).is_absolute():
            # older checkpoints kept the path as given: resolve it as run_info does now
            theirs["data"] = str(Path(data).expanduser().resolve())
        model_config = getattr(self.model, "config", None)
        if "model_config" in state and hasattr(model_config, "to_dict"):
            ours.update(model_config.to_dict())
            theirs.update(state["model_config"])
        return [
            f"{key} {theirs[key]} vs {ours[key]}"
            for key in ours
            if key in theirs and theirs[key] != ours[key] and key != "drop_rate"
        ]

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write checkpoint.pt (or `path`) atomically, and put this run's metrics.jsonl in
        place of an earlier run's. Under DDP every rank must call it."""
        saved = self.checkpointer.save(self.state_dict(), path)
        self.metrics.commit()
        return saved

    def load_state_dict(self, state: dict[str, Any], path: Path | str = "checkpoint") -> None:
        """Continue from a checkpoint's state (`path` names it in errors). The LR schedule is
        this run's (--lr, --max-steps, --lr-decay-steps, ...) from the first resumed step on;
        with unchanged options that is exactly the checkpoint's."""
        differences = self._differences(state)
        if differences:
            raise UsageError(
                f"{path} is of another run: {'; '.join(differences)} (checkpoint vs this run); "
                "resume with the options that run started with"
            )
        mismatch = tensor_mismatch(state["model"], self.model.state_dict())
        try:
            if mismatch:
                raise ValueError(mismatch)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as exc:  # names, shapes or parameter groups differ
            raise UsageError(
                f"{path} does not match this run's model (resume with the options the run "
                f"started with: {{model}}, {{context_length}}, {{lora_rank}}, ...): {exc}"
            ) from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.scheduler.base_lrs = [self.config.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.config.lr
            group["lr"] = self.config.lr * self.schedule(self.step)
        self.tokens_seen = state["tokens_seen"]
        if self.scaler.is_enabled() and "scaler" in state:  # else fp16 starts at a fresh scale
            self.scaler.load_state_dict(state["scaler"])
            self.skipped_steps = state["skipped_steps"]
        intervals = state.get("intervals", {})  # absent in older checkpoints
        self._since_log = Interval.from_state(intervals.get("log"))
        self._since_eval = Interval.from_state(intervals.get("eval"))
        self.batches.load_state_dict(state)
        self.checkpointer.restore_rng(state, self.config.seed + 1000 * self.step)


def tensor_mismatch(saved: dict[str, Any], ours: dict[str, Any]) -> str:
    """One short line on how two state dicts differ ("" when names and shapes agree)."""
    missing = [k for k in ours if k not in saved]
    unexpected = [k for k in saved if k not in ours]
    misshaped = [k for k in ours if k in saved and saved[k].shape != ours[k].shape]
    parts = [
        f"{len(keys)} {what} (e.g. {keys[0]})"
        for keys, what in (
            (missing, "missing"),
            (unexpected, "unexpected"),
            (misshaped, "mis-shaped"),
        )
        if keys
    ]
    return ", ".join(parts) + " tensors" if parts else ""
