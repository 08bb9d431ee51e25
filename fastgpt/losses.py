"""The next-token loss of pretraining (instruction and classification losses live with their
tasks, in fastgpt/instruction.py and fastgpt/classification.py)."""

from __future__ import annotations

import torch
from torch import nn


def next_token_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction, fp32. `batch` is (inputs, targets) or a
    dict with "input_ids" and "targets", each (B, T) long. The model computes it
    (`GPTModel.forward(..., targets=)`): on the triton backend without ever forming the
    (B·T, vocab) logits, else from the logits upcast to fp32."""
    if isinstance(batch, dict):
        inputs, targets = batch["input_ids"], batch["targets"]
    else:
        inputs, targets = batch
    device = next(model.parameters()).device
    inputs = inputs.to(device, non_blocking=True)
    return model(inputs, targets=targets.to(device, non_blocking=True))
