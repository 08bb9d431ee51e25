"""Nothing a user was handed is executed: a checkpoint.pt whose pickle would run code is
refused with a one-line error, and the code never runs (torch.load with weights_only=True)."""

from __future__ import annotations

import os

import pytest
import torch

from fastgpt.train.checkpoint import CHECKPOINT_FORMAT, Checkpointer


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls os.system("touch <marker>")
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "step": 1, "evil": _RunsACommand(marker)}, path)
    with pytest.raises(ValueError, match=r"checkpoint.pt: cannot read it as a training checkpoint"):
        Checkpointer.read(path)
    assert not marker.exists()


def test_a_checkpoints_rng_states_load_without_pickled_objects(tmp_path):
    """What the Checkpointer writes loads with weights_only=True and restores every RNG."""
    import random

    import numpy as np

    from fastgpt.train.checkpoint import rng_state, set_rng_state
    from fastgpt.train.distributed import DistInfo

    checkpointer = Checkpointer(tmp_path, True, 1, DistInfo())
    np.random.randn()  # a cached Gaussian is part of NumPy's state
    path = checkpointer.save({"step": 3})
    draws = (random.random(), np.random.randn(), torch.rand(2).tolist())
    state = Checkpointer.read(path)
    set_rng_state(state["rng"][0])
    assert (random.random(), np.random.randn(), torch.rand(2).tolist()) == draws
    assert state["step"] == 3 and set(rng_state()) <= set(state["rng"][0])
