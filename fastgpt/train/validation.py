"""Evaluation during training: the validation loss, a task's extra metrics, a text sample.

Every `eval_every` steps (and at the last step) rank 0 computes the validation loss over
`eval_batches` batches, the extra metrics of `metrics_fn` and a text sample from `sample_fn`,
in eval mode and without moving the training RNGs (when an evaluation runs must not change
the dropout masks after it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastgpt.train.checkpoint import rng_state, set_rng_state

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device` when dtype is given, else a no-op."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode, without gradients; its mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def evaluate_loss(
    model: nn.Module,
    loader: Iterable,
    loss_fn: LossFn,
    max_batches: int | None = None,
    amp_dtype: torch.dtype | None = None,
) -> float:
    """Mean of loss_fn over the first `max_batches` batches of `loader` (all when None), in
    eval mode (the model's mode is restored); NaN for an empty loader."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with eval_mode(model):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            with autocast_context(device, amp_dtype):
                total += float(loss_fn(model, batch).float())
            count += 1
    return total / count if count else float("nan")


class Evaluator:
    """Validation loss, `metrics_fn(model, loader) -> {name: value}` extras and
    `sample_fn(model) -> str` of one model, as an "eval" record."""

    def __init__(
        self,
        val_data: Dataset | None,
        loss_fn: LossFn,
        batch_size: int,
        collate_fn: Callable,
        seed: int,
        max_batches: int | None,
        amp_dtype: torch.dtype | None,
        metrics_fn: Callable[[nn.Module, Iterable], dict[str, float]] | None = None,
        sample_fn: Callable[[nn.Module], str] | None = None,
    ):
        self.val_data = val_data if val_data is not None and len(val_data) > 0 else None
        self.loss_fn, self.metrics_fn, self.sample_fn = loss_fn, metrics_fn, sample_fn
        self.batch_size, self.collate_fn, self.seed = batch_size, collate_fn, seed
        self.max_batches, self.amp_dtype = max_batches, amp_dtype

    def loader(self) -> DataLoader:
        return DataLoader(
            self.val_data,
            batch_size=self.batch_size,
            collate_fn=self.collate_fn,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        """{"val_loss": ..., extras..., "sample": ...} (keys present as configured); the
        training RNG states are left as they were."""
        saved = rng_state()  # a sample may be drawn at random
        try:
            return self._measure(model)
        finally:
            set_rng_state(saved)

    def _measure(self, model: nn.Module) -> dict[str, Any]:
        record: dict[str, Any] = {"val_loss": None}
        device = next(model.parameters()).device
        if self.val_data is not None:
            loader = self.loader()
            record["val_loss"] = evaluate_loss(
                model, loader, self.loss_fn, self.max_batches, self.amp_dtype
            )
            if self.metrics_fn is not None:
                with eval_mode(model), autocast_context(device, self.amp_dtype):
                    record.update(self.metrics_fn(model, loader))
        if self.sample_fn is not None:
            # A --compile model's graphs are for the training shapes; a sample's cached
            # generation (a new length each step) runs eagerly instead of recompiling per token.
            with (
                eval_mode(model),
                autocast_context(device, self.amp_dtype),
                torch.compiler.set_stance("force_eager"),
            ):
                record["sample"] = str(self.sample_fn(model))
        return record
