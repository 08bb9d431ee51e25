"""checkpoint.pt: what it holds, when it is written, and writing it so a crash never tears it.

A checkpoint holds the model, optimizer and scheduler states, the step, the data position,
the number of tokens seen, the RNG states of every rank and, in fp16, the loss scaler's state
and the steps it skipped, so that `--resume` continues bit-for-bit on CPU (the Trainer builds
the state and applies it: `trainer_state.TrainerState`).
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fastgpt.errors import MissingFileError, UsageError
from fastgpt.files import write_atomically
from fastgpt.train.distributed import DistInfo

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "fastgpt-train-v1"


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: Python, NumPy, torch CPU and each CUDA device, in
    tensors and plain Python values only, so that checkpoint.pt loads with weights_only=True."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),  # uint32 (624,)
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through `write_atomically`: readers see the old checkpoint or the new one.
    torch's C++ writer reports a full disk as "unexpected pos ...": the room is judged from
    what it left."""
    write_atomically(path, lambda tmp: torch.save(obj, tmp), check_room=True)


class Checkpointer:
    """Decides when to save (every `save_every` steps and at the last one, unless disabled),
    gathers every rank's RNG states, and writes and reads checkpoint.pt."""

    def __init__(self, out_dir: Path, enabled: bool, save_every: int, dist_info: DistInfo):
        self.path = Path(out_dir) / CHECKPOINT_NAME
        self.enabled = enabled
        self.save_every = save_every
        self.dist = dist_info
        self.saved_step: int | None = None  # the step the file holds, once this run wrote it

    def due(self, step: int, last: bool) -> bool:
        return self.enabled and (last or (self.save_every > 0 and step % self.save_every == 0))

    def save(self, state: dict[str, Any], path: str | Path | None = None) -> Path:
        """Write `state` plus the RNG states of every rank (gathered: under DDP every rank must
        call this; rank 0 writes) atomically to `path` (default: out_dir/checkpoint.pt)."""
        path = Path(path) if path is not None else self.path
        rngs = [rng_state()]
        if self.dist.world_size > 1:
            rngs = [None] * self.dist.world_size
            dist.all_gather_object(rngs, rng_state())
        if self.dist.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"format": CHECKPOINT_FORMAT, **state, "rng": rngs}, path)
            self.saved_step = state.get("step")
        return path

    @staticmethod
    def read(path: str | Path) -> dict[str, Any]:
        """The state a checkpoint file holds; MissingFileError (a FileNotFoundError) /
        UsageError naming the file when it is missing, torn, or not one of ours (it is read
        inside the training loop, where only a UsageError counts as bad input)."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(
                f"cannot resume: no checkpoint at {path} (train once without {{resume}} first)"
            )
        # weights_only: a pickle that would run code is refused, never executed. A torn file,
        # or one not torch's, fails as one of these (a text file: often a ValueError).
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(
                f"{path}: cannot read it as a training checkpoint ({first_line})"
            ) from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"{path} is not a fastgpt training checkpoint")
        missing = [key for key in ("model", "optimizer", "step", "rng") if key not in state]
        if missing:
            raise UsageError(f"{path}: an incomplete training checkpoint (no {', '.join(missing)})")
        if type(state["step"]) is not int or state["step"] < 0:
            raise UsageError(f"{path}: step must be an integer >= 0, got {state['step']!r}")
        return state

    def restore_rng(self, state: dict[str, Any], fallback_seed: int) -> None:
        """This rank's RNG states from `state`; with another number of ranks, a fresh but
        reproducible stream per rank from `fallback_seed`."""
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            seed_everything(fallback_seed + self.dist.rank)
