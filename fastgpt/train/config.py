"""TrainConfig: every option of the training loop, with its unit and default, written once.

The training commands turn these fields into their command-line options (`fastgpt.options`):
`batch_size` is `--batch-size`, `out_dir` is `--out`, `save_checkpoint` is `--no-checkpoint`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastgpt.devices import resolve_device
from fastgpt.errors import ConfigError, require
from fastgpt.files import check_writable_folder


@dataclass
class TrainConfig:
    """Everything the Trainer needs besides the model, data and loss."""

    out_dir: str = field(default="runs/train", metadata={"flag": "--out", "metavar": "DIR"})
    """Output folder: the model, metrics.jsonl, loss.png, checkpoint.pt (created)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    epochs: int | None = field(
        default=None, metadata={"default_note": "unless --max-steps is given"}
    )
    """Passes over the training data; given max_steps alone, only that counts, and with both,
    whichever ends first (neither: 1 epoch)."""
    batch_size: int = 8
    """Sequences per micro-batch and rank (GPU)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (each loss scaled by 1/grad_accum)."""
    lr: float = 4e-4
    """Peak learning rate of AdamW."""
    min_lr: float | None = None
    """Learning rate at the end of the cosine decay (default lr/10)."""
    warmup_steps: int | None = None
    """Linear warmup steps (default 5% of the decay steps)."""
    lr_decay_steps: int | None = None
    """Step at which the cosine reaches min_lr (default: the last step of this run)."""
    weight_decay: float = 0.1
    """AdamW weight decay, on weight matrices and embeddings only."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this, 0 = off (the norm is still checked)."""
    eval_every: int = 50
    """Validate (and sample) every N steps and at the last step; 0 = only at the last."""
    eval_batches: int | None = 10
    """Validation batches per evaluation."""
    log_every: int = 10
    """Log the training loss, tokens/s and MFU to metrics.jsonl every N steps."""
    save_every: int = 500
    """Write checkpoint.pt every N steps, at the end, and where Ctrl-C or SIGTERM stops the
    run (at the end of the step it is in); 0 = only at the end and on a stop."""
    save_checkpoint: bool = field(default=True, metadata={"flag": "--no-checkpoint"})
    """Write checkpoint.pt at all; it holds the optimizer state too."""
    seed: int = 123
    """Seed of the data order, splits, initialization and every RNG at the start."""
    overwrite: bool = False
    """Replace the run out_dir holds: this run writes into a hidden folder inside it
    (.overwrite-PID) and, once finished, moves its files out of it and deletes the earlier
    run's others; a run that fails or is stopped deletes that folder and leaves the earlier
    run's files untouched."""
    resume: bool | str = field(
        default=False, metadata={"nargs": "?", "const": True, "metavar": "CHECKPOINT"}
    )
    """Continue from out_dir's checkpoint.pt (or the file given): model, optimizer, step,
    data position and RNG states; the LR schedule is this run's options (the same ones continue
    exactly: keep lr, warmup and lr_decay_steps, or max_steps when that is unset)."""
    num_workers: int = 0
    """DataLoader worker processes for the training batches."""
    device: str = "auto"
    """cuda, cuda:1, cpu, or auto (cuda:LOCAL_RANK when CUDA is available, else cpu)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Autocast dtype (the weights stay fp32): auto = bf16 on a GPU that has it, fp16 on one that
    does not (T4, V100), fp32 on CPU. fp16 scales the loss (torch.amp.GradScaler): a step whose
    gradient overflows is skipped and the scale halved; metrics.jsonl counts them."""
    progress: bool = True
    """Show a progress bar."""
    plot: bool = True
    """Save loss.png at the end."""
    loggers: list[str] = field(
        default_factory=list, metadata={"flag": "--logger", "metavar": "tensorboard|wandb"}
    )
    """Also send every record of metrics.jsonl to TensorBoard (event files in out_dir/tensorboard)
    or Weights & Biases (a run named after out_dir, files in out_dir/wandb; the WANDB_*
    variables apply); give it twice for both. metrics.jsonl and loss.png are written either way."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "log_every"):
            require(self, name, getattr(self, name) >= 1, ">= 1")
        for name in ("max_steps", "epochs", "eval_batches", "lr_decay_steps"):
            value = getattr(self, name)
            require(self, name, value is None or value >= 1, ">= 1 (or None)")
        for name in ("eval_every", "save_every", "num_workers", "warmup_steps"):
            value = getattr(self, name)
            require(self, name, value is None or value >= 0, ">= 0")
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1
        require(self, "lr", 0 < self.lr < math.inf, "> 0 and finite")
        if self.min_lr is not None:
            require(self, "min_lr", 0 <= self.min_lr <= self.lr, f"in [0, lr={self.lr}]")
        for name in ("weight_decay", "grad_clip"):
            require(self, name, getattr(self, name) >= 0, ">= 0")
        require(self, "seed", 0 <= self.seed < 2**64, "in [0, 2**64)")  # torch's seed range
        require(self, "out_dir", bool(str(self.out_dir).strip()), "a folder name")
        betas_ok = len(self.betas) == 2 and all(0 <= beta < 1 for beta in self.betas)
        require(self, "betas", betas_ok, "two numbers in [0, 1)")  # AdamW's own check, earlier
        resolve_device(self.device)  # an unknown or absent device fails before any work
        check_writable_folder(Path(self.out_dir), "out_dir")
        if self.overwrite and self.resume:
            raise ConfigError("overwrite", "and {resume} exclude each other: continue or replace")
        self.betas = tuple(self.betas)
        self.loggers = list(dict.fromkeys(self.loggers))
        for name in self.loggers:
            check_logger_installed(name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The package each --logger needs (optional extras of the same names in pyproject.toml).
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_logger_installed(name: str) -> None:
    """ConfigError unless `name` is a logger whose package is installed: one line naming the
    option and what to install, before any work."""
    if name not in LOGGER_PACKAGES:
        raise ConfigError("loggers", f"{name!r} is not a logger: use tensorboard or wandb")
    package = LOGGER_PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        raise ConfigError("loggers", f"{name} needs the {package} package: pip install {package}")


# What a training command leaves in its output folder (see the README's table).
RUN_FILES = (
    "checkpoint.pt", "metrics.jsonl", "run.json", "loss.png", "model.safetensors", "config.json",
    "lora.safetensors", "lora.json", "adapter_model.safetensors", "adapter_config.json",
    "labels.json", "classifier.json", "metrics.json", "test_responses.json",
    "vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json",
)  # fmt: skip


def check_out_dir_is_free(config: TrainConfig) -> list[str]:
    """ConfigError when out_dir holds another run's files and this run neither resumes nor
    overwrites it: nothing a user already has is replaced without being asked. Returns the
    names of the run files out_dir holds (RUN_FILES' order)."""
    out = Path(config.out_dir)
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not (config.resume or config.overwrite):
        raise ConfigError(
            "out_dir",
            f"{out} holds another run ({', '.join(held)}): continue it with {{resume}}, replace "
            "it with {overwrite}, or choose another {out_dir}",
        )
    return held
