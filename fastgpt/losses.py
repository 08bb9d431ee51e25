"""The next-token loss of pretraining (instruction and classification losses live with their
tasks, in fastgpt/instruction.py and fastgpt/classification.py)."""

from __future__ import annotations

import torch
from torch import nn

from fastgpt.segments import document_segment_ids


def next_token_loss(model: nn.Module, batch, document_start_id: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction, fp32. `batch` is (inputs, targets), or
    (inputs, targets, segment_ids), or a dict with "input_ids", "targets" and optionally
    "segment_ids", each (B, T) long. The model computes it (`GPTModel.forward(..., targets=)`):
    on the triton backend without ever forming the (B·T, vocab) logits, else from the logits
    upcast to fp32.

    document_start_id (pretraining's --document-mask: <|endoftext|>): a batch without
    segment_ids gets them from its inputs, a new document at each such token
    (`fastgpt.segments.document_segment_ids`), so each document attends only within itself."""
    if isinstance(batch, dict):
        inputs, targets = batch["input_ids"], batch["targets"]
        segment_ids = batch.get("segment_ids")
    else:
        inputs, targets, *rest = batch
        segment_ids = rest[0] if rest else None
    device = next(model.parameters()).device
    inputs = inputs.to(device, non_blocking=True)
    if segment_ids is not None:
        segment_ids = segment_ids.to(device, non_blocking=True)
    elif document_start_id is not None:
        segment_ids = document_segment_ids(inputs, document_start_id)  # (B, T)
    targets = targets.to(device, non_blocking=True)
    if segment_ids is None:  # the plain call, as every other caller makes it
        return model(inputs, targets=targets)
    return model(inputs, targets=targets, segment_ids=segment_ids)
