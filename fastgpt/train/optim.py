"""AdamW and the learning-rate schedule.

LR schedule: linear warmup from lr/warmup_steps to lr over `warmup_steps` steps, then cosine
decay to `min_lr` at `lr_decay_steps` (default: the last step), flat after that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastgpt.train.config import TrainConfig


def make_optimizer(
    params: Sequence[nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of 2+ dimensions (matrices, embeddings) and none
    on biases and LayerNorm gains, which a decay would only pull toward zero for no benefit."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": ps, "weight_decay": wd}
        for ps, wd in ((decay, weight_decay), (no_decay, 0.0))
        if ps
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def lr_multiplier(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based) as a fraction of the peak: linear
    warmup (step+1)/warmup_steps, then cosine from 1 down to min_ratio at decay_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The LR schedule of one run: warmup steps, the step the cosine ends, min_lr / lr."""

    warmup_steps: int
    decay_steps: int
    min_ratio: float

    @classmethod
    def of(cls, config: TrainConfig, total_steps: int) -> Schedule:
        decay = config.lr_decay_steps or total_steps
        warmup = config.warmup_steps if config.warmup_steps is not None else round(0.05 * decay)
        min_lr = config.min_lr if config.min_lr is not None else config.lr / 10
        return cls(warmup, decay, min_lr / config.lr)

    def __call__(self, step: int) -> float:
        """The LR multiplier of 0-based step `step`."""
        return lr_multiplier(step, self.warmup_steps, self.decay_steps, self.min_ratio)


def lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Schedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """The scheduler that sets `optimizer`'s LR to lr × schedule(step) at each step."""
    # A plain function, not the Schedule object: LambdaLR would save an object's fields in its
    # state dict, and a resumed run would take the checkpoint's schedule, not its own.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))
