"""The next-token loss of pretraining (instruction and classification losses live with their
tasks, in fastgpt/instruction.py and fastgpt/classification.py)."""

from __future__ import annotations

import torch
from torch import nn

from fastgpt.segments import document_segment_ids, pack_batch


def next_token_loss(model: nn.Module, batch, document_start_id: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction, fp32. `batch` is (inputs, targets), or
    (inputs, targets, segment_ids), or a dict with "input_ids", "targets" and optionally
    "segment_ids", each (B, T) long. The model computes it (`GPTModel.forward(..., targets=)`):
    on the triton backend without ever forming the (B·T, vocab) logits, else from the logits
    upcast to fp32.

    document_start_id (pretraining's --document-mask: <|endoftext|>): a batch without
    segment_ids gets them from its inputs, a new document at each such token
    (`fastgpt.segments.document_segment_ids`), so each document attends only within itself.
    The runs of the segment ids are found where the batch is (the host, from a DataLoader),
    so the step does not wait on the device (`fastgpt.segments.pack_batch`)."""
    if isinstance(batch, dict):
        inputs, targets = batch["input_ids"], batch["targets"]
        segment_ids = batch.get("segment_ids")
    else:
        inputs, targets, *rest = batch
        segment_ids = rest[0] if rest else None
    device = next(model.parameters()).device
    if segment_ids is None and document_start_id is not None:
        segment_ids = document_segment_ids(inputs, document_start_id)  # (B, T), where inputs are
    targets = targets.to(device, non_blocking=True)
    if segment_ids is None:  # the plain call, as every other caller makes it
        return model(inputs.to(device, non_blocking=True), targets=targets)
    packed = pack_batch(segment_ids, inputs, device)  # on the host: no device sync
    return model(inputs.to(device, non_blocking=True), targets=targets, segment_ids=packed)
