"""The next-token loss of pretraining (instruction and classification losses live with their
tasks, in fastgpt/instruction.py and fastgpt/classification.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def next_token_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction. `batch` is (inputs, targets) or a dict with
    "input_ids" and "targets", each (B, T) long; half-precision logits are upcast to fp32 for
    the loss (a softmax over 50k classes wants fp32)."""
    if isinstance(batch, dict):
        inputs, targets = batch["input_ids"], batch["targets"]
    else:
        inputs, targets = batch
    device = next(model.parameters()).device
    logits = model(inputs.to(device, non_blocking=True))  # (B, T, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.flatten(0, 1), targets.to(device, non_blocking=True).flatten())
