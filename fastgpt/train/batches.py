"""The order the training examples are seen in, and where a run is in it.

Each epoch is a permutation of the training set drawn from (seed, epoch) alone, cut into steps
of batch_size × grad_accum × world_size examples (the remainder is dropped for that epoch).
Rank r takes examples [r·batch_size, (r+1)·batch_size) of every micro-batch of
batch_size × world_size, so N ranks see exactly the examples one process would with a batch N
times larger. The data position is therefore just (epoch, step within the epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastgpt.errors import UsageError


class BatchOrder:
    """Yields each step's micro-batches from the current data position on, and keeps that
    position (`epoch`, `step_in_epoch`) for checkpoints."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        seed: int,
    ):
        self.dataset, self.seed = dataset, seed
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.world_size, self.rank = world_size, rank
        self.examples_per_step = batch_size * grad_accum * world_size
        self.steps_per_epoch = len(dataset) // self.examples_per_step
        if self.steps_per_epoch == 0:
            raise UsageError(
                f"the training set has {len(dataset)} examples, fewer than one optimizer step "
                f"needs ({{batch_size}} {batch_size} × {{grad_accum}} {grad_accum} × "
                f"{world_size} ranks = {self.examples_per_step}); lower {{batch_size}} or "
                "{grad_accum}, or use more data"
            )
        self.epoch = 0  # the epoch and step within it of the NEXT step
        self.step_in_epoch = 0

    def advance(self) -> None:
        """One optimizer step was taken."""
        self.step_in_epoch += 1
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "examples_per_step": self.examples_per_step,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state` was; with another global batch size, after the examples
        already seen in that epoch."""
        self.epoch = state["epoch"]
        seen = state["step_in_epoch"] * state["examples_per_step"]
        self.step_in_epoch = seen // self.examples_per_step
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of training-set indices for `epoch`: a function of (seed, epoch)
        only, so a resumed run draws exactly the same batches."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def _rank_batches(self, epoch: int, first_step: int) -> Iterator[list[int]]:
        """This rank's micro-batch index lists for steps first_step.. of `epoch`, made as they
        are needed (an epoch of a large corpus has millions of windows)."""
        order = self.epoch_order(epoch)
        micro = self.batch_size * self.world_size  # examples per micro-batch over all ranks
        for step in range(first_step, self.steps_per_epoch):
            for k in range(self.grad_accum):
                start = (step * self.grad_accum + k) * micro + self.rank * self.batch_size
                yield order[start : start + self.batch_size].tolist()

    def steps(
        self, collate_fn: Callable, num_workers: int = 0, pin_memory: bool = False
    ) -> Iterator[list[Any]]:
        """The micro-batches of each step, forever, from the current data position on."""
        while True:
            epoch, first = self.epoch, self.step_in_epoch
            # Its own generator: a DataLoader otherwise draws its workers' base seed from the
            # global torch RNG, and a resumed run (one loader more) would drift from a straight one.
            seed = self.seed * 1_000_003 + epoch * 1009 + first
            loader = DataLoader(
                self.dataset,
                batch_sampler=self._rank_batches(epoch, first),
                collate_fn=collate_fn,
                num_workers=num_workers,
                pin_memory=pin_memory,
                generator=torch.Generator().manual_seed(seed),
            )
            group: list[Any] = []
            for batch in loader:
                group.append(batch)
                if len(group) == self.grad_accum:
                    yield group
                    group = []
