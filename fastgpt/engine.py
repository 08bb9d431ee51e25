"""The training engine shared by `fastgpt pretrain`, `finetune-classify` and `finetune-instruct`.

    trainer = Trainer(model, train_set, val_set, loss_fn, TrainConfig(out_dir="runs/x"))
    final_metrics = trainer.fit()

One optimizer step, in order:

    for each of grad_accum micro-batches (DDP gradient sync only on the last one):
        loss = loss_fn(model, batch)           bf16 autocast on CUDA, fp32 on CPU
        (loss / grad_accum).backward()         gradients of the mean over the whole step
    loss averaged over ranks; gradient norm clipped to grad_clip
    loss or norm not finite -> NonFiniteLossError naming the step, BEFORE optimizer.step()
    AdamW step (weight decay on matrices and embeddings only); LR schedule step

LR schedule: linear warmup from lr/warmup_steps to lr over `warmup_steps` steps, then cosine
decay to `min_lr` at `lr_decay_steps` (default: the last step), flat after that.

Data order: each epoch is a permutation of the training set drawn from (seed, epoch) alone, cut
into steps of batch_size × grad_accum × world_size examples (the remainder is dropped for that
epoch). Rank r takes examples [r·batch_size, (r+1)·batch_size) of every micro-batch of
batch_size × world_size, so N ranks see exactly the examples one process would with a
batch N times larger. The data position is therefore just (epoch, step within the epoch), and a
checkpoint holding it plus the model, optimizer, scheduler and every RNG state resumes
bit-for-bit on CPU.

Every `eval_every` steps (and at the last step) rank 0 computes the validation loss over
`eval_batches` batches, the extra metrics of `metrics_fn` and a text sample from `sample_fn`.
Throughput is reported as tokens/s (input tokens of all ranks per second of training time,
evaluation excluded) and as model FLOPs utilization

    MFU = tokens/s · flops_per_token / (peak_flops_per_gpu · world_size)

with flops_per_token = 6·N + 12·L·T·d (`fastgpt.model.flops_per_token`: forward + backward)
and the GPU's dense bf16 peak from PEAK_FLOPS (None on CPU or an unknown GPU).

Files written by rank 0 into out_dir: metrics.jsonl (one JSON object per log line: "kind" is
"train" or "eval"), checkpoint.pt (written to a temporary name and renamed, so a crash never
leaves a torn checkpoint), and loss.png (train and validation loss against tokens seen).

Multi-GPU: run the same command under `torchrun --nproc_per_node N`. WORLD_SIZE > 1 makes the
trainer join the process group (NCCL on CUDA, gloo on CPU) and wrap the model in
DistributedDataParallel.

The file, top to bottom: TrainConfig (every option, with units); joining torchrun's process
group; the pieces a step uses (loss, autocast, evaluation, AdamW groups, LR schedule, peak
FLOP/s, RNG states, atomic save); the Trainer (set-up, fit, checkpoints, plot, then the data
order, one step and evaluation/logging that fit calls); and the command-line options the three
training commands share (add_training_arguments -> TrainConfig, build_model_from_args).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
CHECKPOINT_FORMAT = "fastgpt-train-v1"

PEAK_FLOPS: dict[str, float] = {
    # Dense bf16 tensor-core peak per GPU (FLOP/s), from the vendors' data sheets.
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient norm was NaN or infinite; no parameter was updated."""


# --- configuration -----------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything the Trainer needs besides the model, data and loss."""

    out_dir: str = "runs/train"
    """Folder for metrics.jsonl, checkpoint.pt and loss.png (created)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: run `epochs` epochs)."""
    epochs: int | None = None
    """Stop after this many passes over the training set (None: only max_steps counts; with
    neither given, 1 epoch)."""
    batch_size: int = 8
    """Examples per micro-batch on each rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (each loss scaled by 1/grad_accum)."""
    lr: float = 4e-4
    """Peak learning rate."""
    min_lr: float | None = None
    """Learning rate at the end of the cosine decay (None: lr / 10)."""
    warmup_steps: int | None = None
    """Linear warmup steps (None: 5% of lr_decay_steps, rounded)."""
    lr_decay_steps: int | None = None
    """Step at which the cosine reaches min_lr (None: the last step of this run)."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to parameters with 2 or more dimensions only."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping; the norm is still checked)."""
    eval_every: int = 50
    """Evaluate every this many steps, and at the last step (0: only at the last step)."""
    eval_batches: int | None = 10
    """Validation batches per evaluation (None: the whole validation set)."""
    log_every: int = 10
    """Write a training-loss line to metrics.jsonl every this many steps."""
    save_every: int = 500
    """Write checkpoint.pt every this many steps (0: only at the end)."""
    save_checkpoint: bool = True
    """Write checkpoint.pt at all (periodically and at the end)."""
    seed: int = 123
    """Seed of the data order and of every RNG at the start of training."""
    resume: bool | str = False
    """True: continue from out_dir/checkpoint.pt; a path: from that checkpoint. The LR schedule
    is this run's: to continue exactly, keep lr, warmup and the decay end (lr_decay_steps, or
    max_steps when that is unset) as they were."""
    num_workers: int = 0
    """DataLoader worker processes for the training batches."""
    device: str = "auto"
    """"auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), or a torch device."""
    precision: str = "auto"
    """"auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16" or "fp32"."""
    progress: bool = True
    """Show a tqdm progress bar."""
    plot: bool = True
    """Save loss.png at the end."""

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "epochs", "eval_batches", "lr_decay_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {value}")
        for name in ("eval_every", "save_every", "num_workers", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be > 0 and finite, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        for name in ("weight_decay", "grad_clip", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        resolve_device(self.device)  # an unknown or absent device fails before any work
        if Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise ValueError(f"--out {self.out_dir} is a file, not a folder")
        self.betas = tuple(self.betas)


def resolve_device(spec: str | None, local_rank: int = 0) -> torch.device:
    """The device of a --device option: "auto" or None is cuda:local_rank when CUDA is
    available, else cpu; otherwise cpu, cuda or cuda:N. ValueError for another name, or a CUDA
    device this machine does not have."""
    if spec in (None, "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {spec!r} is not a device: use cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: no CUDA GPU is available (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
    return device


# --- distributed set-up ------------------------------------------------------------------


@dataclass
class DistInfo:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False  # whether we initialized the process group (and destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1 (NCCL on CUDA,
    gloo on CPU; MASTER_ADDR/PORT, RANK, LOCAL_RANK come from the environment)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, False)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True)


def is_main_process() -> bool:
    """True outside torchrun and on rank 0 (the rank that prints and writes files); before the
    process group exists (or after it is destroyed), torchrun's RANK variable tells."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


# --- pieces ------------------------------------------------------------------------------


def next_token_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction. `batch` is (inputs, targets) or a dict with
    "input_ids" and "targets", each (B, T) long; half-precision logits are upcast
    to fp32 for the loss."""
    if isinstance(batch, dict):
        inputs, targets = batch["input_ids"], batch["targets"]
    else:
        inputs, targets = batch
    device = next(model.parameters()).device
    logits = model(inputs.to(device, non_blocking=True))  # (B, T, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # a softmax over 50k classes wants fp32
    return F.cross_entropy(logits.flatten(0, 1), targets.to(device, non_blocking=True).flatten())


def batch_token_count(batch) -> tuple[int, int]:
    """(input tokens, sequence length) of a batch: its "input_ids", its first element, or
    itself when it is a tensor."""
    if isinstance(batch, dict):
        tensor = batch.get("input_ids", next(iter(batch.values())))
    elif isinstance(batch, (list, tuple)):
        tensor = batch[0]
    else:
        tensor = batch
    if not isinstance(tensor, torch.Tensor):
        return 0, 0
    return tensor.numel(), tensor.shape[-1] if tensor.dim() else 1


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast on `device` when dtype is given, else a no-op."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    max_batches: int | None = None,
    amp_dtype: torch.dtype | None = None,
) -> float:
    """Mean of loss_fn over the first `max_batches` batches of `loader` (all when None), in
    eval mode (the model's mode is restored); NaN for an empty loader."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            with autocast_context(device, amp_dtype):
                total += float(loss_fn(model, batch).float())
            count += 1
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


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


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of the CUDA device from PEAK_FLOPS; None on CPU or if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_FLOPS[key]
    return None


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: Python, NumPy, torch CPU and each CUDA device."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename it over `path` (atomic on
    POSIX): readers see the old checkpoint or the new one, never half of one."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- the trainer -------------------------------------------------------------------------


class Trainer:
    """Trains `model` on `train_data` with `loss_fn`; see the module docstring.

    train_data / val_data: map-style datasets (val_data may be None). collate_fn turns a list
    of items into a batch (default: torch's default_collate). loss_fn(model, batch) -> scalar
    mean loss. metrics_fn(model, val_loader) -> dict of extra evaluation metrics.
    sample_fn(model) -> str, a text sample shown and logged at each evaluation. params: the
    parameters to optimize (default: those with requires_grad; only they get an optimizer
    state).
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        val_data: Dataset | None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        config: TrainConfig,
        collate_fn: Callable | None = None,
        metrics_fn: Callable[[nn.Module, Iterable], dict[str, float]] | None = None,
        sample_fn: Callable[[nn.Module], str] | None = None,
        params: Iterable[nn.Parameter] | None = None,
    ):
        self.config = config
        self.loss_fn = loss_fn
        self.collate_fn = collate_fn or default_collate
        self.metrics_fn = metrics_fn
        self.sample_fn = sample_fn
        self.train_data = train_data
        self.val_data = val_data if val_data is not None and len(val_data) > 0 else None
        self.out_dir = Path(config.out_dir)

        self.dist = init_distributed()
        self.device = resolve_device(config.device, self.dist.local_rank)
        use_bf16 = config.precision == "bf16" or (
            config.precision == "auto" and self.device.type == "cuda"
        )
        self.amp_dtype = torch.bfloat16 if use_bf16 else None

        self.model = model.to(self.device)
        params = list(params) if params is not None else None
        if params is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no parameters to train: every parameter has requires_grad=False")
        self.params = params
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model: nn.Module = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.train_model = self.model

        # Data: a step takes batch_size × grad_accum × world_size examples.
        self.examples_per_step = config.batch_size * config.grad_accum * self.dist.world_size
        n = len(train_data)
        self.steps_per_epoch = n // self.examples_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {n} examples, fewer than one optimizer step needs "
                f"(batch_size {config.batch_size} × grad_accum {config.grad_accum} × "
                f"{self.dist.world_size} ranks = {self.examples_per_step}); lower --batch-size "
                "or --grad-accum, or use more data"
            )
        limits = [config.max_steps] if config.max_steps else []
        if config.epochs:
            limits.append(config.epochs * self.steps_per_epoch)
        self.total_steps = min(limits)

        fused = self.device.type == "cuda" and all(p.is_cuda for p in params)
        self.optimizer = make_optimizer(
            params, config.lr, config.weight_decay, config.betas, fused=fused
        )
        decay_steps = config.lr_decay_steps or self.total_steps
        warmup = (
            config.warmup_steps if config.warmup_steps is not None else round(0.05 * decay_steps)
        )
        min_ratio = (config.min_lr if config.min_lr is not None else config.lr / 10) / config.lr
        self.warmup_steps, self.decay_steps = warmup, decay_steps
        self.lr_at = lambda step: lr_multiplier(step, warmup, decay_steps, min_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_at)

        self.step = 0  # optimizer steps done
        self.epoch = 0  # data position: the epoch and step within it of the NEXT step
        self.step_in_epoch = 0
        self.tokens_seen = 0  # input tokens of all ranks trained on so far
        self.peak_flops = peak_flops(self.device)
        config_of_model = getattr(self.model, "config", None)
        self._flops_per_token: Callable[[int], float] | None = None
        if config_of_model is not None and hasattr(config_of_model, "n_layers"):
            from fastgpt.model import flops_per_token

            self._flops_per_token = lambda seq_len: flops_per_token(config_of_model, seq_len)
        self.history: list[dict[str, Any]] = []  # this run's metric records

    # --- public ---------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def fit(self) -> dict[str, Any]:
        """Train until max_steps / epochs; returns the last metrics (step, tokens_seen,
        train_loss, val_loss and the metrics_fn extras). Raises NonFiniteLossError."""
        from tqdm.auto import tqdm

        cfg = self.config
        if cfg.resume:
            path = self.checkpoint_path if cfg.resume is True else Path(cfg.resume)
            self.load_checkpoint(path)
        else:
            seed_everything(cfg.seed + self.dist.rank)  # dropout differs between ranks
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._open_metrics(keep_up_to=self.step if cfg.resume else None)
            self._print_plan()

        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="training",
            unit="step",
            disable=not (cfg.progress and self.is_main),
            dynamic_ncols=True,
        )
        final: dict[str, Any] = {"step": self.step, "tokens_seen": self.tokens_seen}
        # Sums over the steps since the last log line and since the last evaluation.
        new_sums = lambda: {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0, "norm": 0.0}
        interval, since_eval = new_sums(), new_sums()
        batches = self._train_batches()
        saved_step = None  # the step checkpoint.pt holds, once this run wrote one
        try:
            while self.step < self.total_steps:
                started = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]  # the LR this step uses
                micro_batches = next(batches)
                loss, grad_norm, tokens, seq_len = self._train_step(micro_batches)
                elapsed = time.perf_counter() - started
                self.tokens_seen += tokens
                for sums in (interval, since_eval):
                    sums["loss"] += loss
                    sums["steps"] += 1
                    sums["tokens"] += tokens
                    sums["time"] += elapsed
                    sums["norm"] = grad_norm  # the last step's
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / elapsed:,.0f}")

                last = self.step == self.total_steps
                if self.step % cfg.log_every == 0 or last:
                    record = self._train_record(interval, seq_len, lr)
                    final.update(record)
                    interval = new_sums()
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                    train_loss = since_eval["loss"] / max(1, since_eval["steps"])
                    speed = self._throughput(since_eval["tokens"], since_eval["time"], seq_len)
                    since_eval = new_sums()
                    if self.is_main:
                        # Evaluation (a sample may be drawn at random) must not move the
                        # training RNGs: when it runs would change the dropout masks after it.
                        saved = rng_state()
                        try:
                            final.update(self._evaluate(train_loss, speed, bar))
                        finally:
                            set_rng_state(saved)
                if cfg.save_checkpoint and (
                    (cfg.save_every and self.step % cfg.save_every == 0) or last
                ):
                    self.save_checkpoint()
                    saved_step = self.step
        except BaseException as exc:
            if self.dist.created_group:  # leave no process group behind on an error
                dist.destroy_process_group()
            if isinstance(exc, KeyboardInterrupt) and self.is_main and saved_step is not None:
                bar.close()
                saved = f"{self.checkpoint_path} holds step {saved_step}"
                hint = f"stopped at step {self.step}; {saved}: continue with --resume"
                print(hint, file=sys.stderr)
            raise
        finally:
            bar.close()
            if self.is_main:
                self._close_metrics()
        if self.is_main and cfg.plot:
            self.save_plot()
        final.update(step=self.step, tokens_seen=self.tokens_seen, epoch=self.epoch)
        if self.dist.created_group:
            dist.barrier()
            dist.destroy_process_group()
        return final

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write model, optimizer, scheduler, step, data position and the RNG states of every
        rank to `path` (default out_dir/checkpoint.pt) atomically. Under DDP every rank must
        call it (the RNG states are gathered); rank 0 writes."""
        path = Path(path) if path is not None else self.checkpoint_path
        rngs = [rng_state()]
        if self.dist.world_size > 1:
            rngs = [None] * self.dist.world_size
            dist.all_gather_object(rngs, rng_state())
        if not self.is_main:
            return path
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "examples_per_step": self.examples_per_step,
            "tokens_seen": self.tokens_seen,
            "rng": rngs,
            "world_size": self.dist.world_size,
            "train_config": dataclasses.asdict(self.config),
        }
        model_config = getattr(self.model, "config", None)
        if model_config is not None and hasattr(model_config, "to_dict"):
            state["model_config"] = model_config.to_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(state, path)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything `save_checkpoint` wrote (RNG states of this rank included)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"cannot resume: no checkpoint at {path} (train once without --resume first)"
            )
        try:  # our own file: it holds Python/NumPy RNG states, which weights_only would refuse
            state = torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # torn, or not torch's
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(
                f"{path}: cannot read it as a training checkpoint ({first_line})"
            ) from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a fastgpt training checkpoint")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as exc:  # shapes, names or parameter groups differ
            raise ValueError(
                f"{path} does not match this run's model "
                f"(resume with the options the run started with: --model, --context-length, "
                f"--lora-rank, ...): {' '.join(str(exc).split())}"
            ) from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        # The schedule is this run's (--lr, --max-steps, --lr-decay-steps, ...) from the first
        # resumed step on; with unchanged options that is exactly the checkpoint's.
        self.scheduler.base_lrs = [self.config.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.config.lr
            group["lr"] = self.config.lr * self.lr_at(self.step)
        self.tokens_seen = state["tokens_seen"]
        self.epoch = state["epoch"]
        if state["examples_per_step"] == self.examples_per_step:
            self.step_in_epoch = state["step_in_epoch"]
        else:  # a different global batch: continue after the examples already seen
            seen = state["step_in_epoch"] * state["examples_per_step"]
            self.step_in_epoch = seen // self.examples_per_step
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:  # another number of ranks: a fresh but reproducible stream per rank
            seed_everything(self.config.seed + 1000 * self.step + self.dist.rank)

    def save_plot(self, path: str | Path | None = None) -> Path | None:
        """loss.png: training loss (the mean of each log interval) and validation loss against
        tokens seen, from metrics.jsonl."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = read_metrics(self.out_dir / METRICS_NAME)
        train = [r for r in records if r.get("kind") == "train"]
        evals = [r for r in records if r.get("kind") == "eval"]
        if not train and not evals:
            return None
        path = Path(path) if path is not None else self.out_dir / PLOT_NAME
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:  # the mean of each log interval
            ax.plot([r["tokens_seen"] for r in train], [r["loss"] for r in train],
                    label="training loss")  # fmt: skip
        elif evals:  # log_every longer than the run: the means between evaluations
            ax.plot([r["tokens_seen"] for r in evals], [r["train_loss"] for r in evals],
                    marker="o", label="training loss")  # fmt: skip
        with_val = [r for r in evals if r.get("val_loss") is not None]
        if with_val:
            ax.plot([r["tokens_seen"] for r in with_val], [r["val_loss"] for r in with_val],
                    marker="o", linestyle="--", label="validation loss")  # fmt: skip
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (cross-entropy, nats)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        os.replace(tmp, path)
        return path

    # --- data ----------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of training-set indices for `epoch`: a function of (seed, epoch)
        only, so a resumed run draws exactly the same batches."""
        rng = np.random.default_rng([self.config.seed, epoch])
        return rng.permutation(len(self.train_data))

    def _rank_batches(self, epoch: int, first_step: int) -> Iterator[list[int]]:
        """This rank's micro-batch index lists for steps first_step.. of `epoch`, made as they
        are needed (an epoch of a large corpus has millions of windows)."""
        cfg, world, rank = self.config, self.dist.world_size, self.dist.rank
        order = self.epoch_order(epoch)
        micro = cfg.batch_size * world  # examples per micro-batch over all ranks
        for step in range(first_step, self.steps_per_epoch):
            for k in range(cfg.grad_accum):
                start = (step * cfg.grad_accum + k) * micro + rank * cfg.batch_size
                yield order[start : start + cfg.batch_size].tolist()

    def _train_batches(self) -> Iterator[list[Any]]:
        """Yields the micro-batches of each step, from the current data position on."""
        accum = self.config.grad_accum
        while True:
            epoch, first = self.epoch, self.step_in_epoch
            # Its own generator: a DataLoader otherwise draws its workers' base seed from the
            # global torch RNG, and a resumed run (one loader more) would drift from a straight one.
            seed = self.config.seed * 1_000_003 + epoch * 1009 + first
            loader = DataLoader(
                self.train_data,
                batch_sampler=self._rank_batches(epoch, first),
                collate_fn=self.collate_fn,
                num_workers=self.config.num_workers,
                pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(seed),
            )
            group: list[Any] = []
            for batch in loader:
                group.append(batch)
                if len(group) == accum:
                    yield group
                    group = []
            self.epoch, self.step_in_epoch = epoch + 1, 0

    def _val_loader(self) -> DataLoader:
        return DataLoader(
            self.val_data,
            batch_size=self.config.batch_size,
            collate_fn=self.collate_fn,
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    # --- one step ------------------------------------------------------------------------

    def _train_step(self, micro_batches: list[Any]) -> tuple[float, float, int, int]:
        """Forward/backward over the micro-batches, the finiteness check and the optimizer
        step. Returns (mean loss over all ranks, gradient norm before clipping, tokens of all
        ranks, sequence length)."""
        cfg = self.config
        model = self.train_model
        model.train()
        accum = len(micro_batches)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        tokens, seq_len = 0, 0
        for k, batch in enumerate(micro_batches):
            # Under DDP, all-reduce the gradients only once, on the cycle's last backward.
            sync = k == accum - 1 or self.dist.world_size == 1
            with contextlib.nullcontext() if sync else model.no_sync():
                with autocast_context(self.device, self.amp_dtype):
                    loss = self.loss_fn(model, batch)
                (loss / accum).backward()
            loss_sum += loss.detach()
            n_tokens, seq_len = batch_token_count(batch)
            tokens += n_tokens
        mean_loss = loss_sum / accum
        if self.dist.world_size > 1:
            dist.all_reduce(mean_loss)  # SUM (gloo has no AVG)
            mean_loss /= self.dist.world_size
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        loss_value, norm_value = torch.stack([mean_loss, grad_norm.double()]).tolist()  # 1 sync
        attempted = self.step + 1
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"step {attempted}: non-finite training loss {loss_value} or gradient norm "
                f"{norm_value}; stopped before the optimizer step, parameters are unchanged "
                f"(try a lower --lr or a smaller --grad-clip; resume from the last checkpoint)"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = attempted
        self.step_in_epoch += 1
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return loss_value, norm_value, tokens * self.dist.world_size, seq_len

    # --- evaluation and logging ----------------------------------------------------------

    def _throughput(self, tokens: int, seconds: float, seq_len: int) -> tuple[float, float | None]:
        """(tokens/s, MFU or None): see the module docstring for the formula."""
        tokens_per_s = tokens / seconds if seconds > 0 else 0.0
        mfu = None
        if self.peak_flops and self._flops_per_token and seq_len:
            flops = tokens_per_s * self._flops_per_token(seq_len)
            mfu = flops / (self.peak_flops * self.dist.world_size)
        return tokens_per_s, mfu

    def _evaluate(
        self, train_loss: float, speed: tuple[float, float | None], bar
    ) -> dict[str, Any]:
        """Rank 0: validation loss over eval_batches, metrics_fn extras and a sample_fn text;
        printed above the bar and logged as a "kind": "eval" record, which is returned without
        "kind" and "sample". train_loss: mean since the last evaluation; speed: (tokens/s,
        MFU or None) over the same steps."""
        cfg = self.config
        record: dict[str, Any] = {
            "kind": "eval",
            "step": self.step,
            "epoch": self.epoch,
            "tokens_seen": self.tokens_seen,
            "train_loss": train_loss,
            "val_loss": None,
        }
        line = f"step {self.step}/{self.total_steps}  train loss {train_loss:.4f}"
        if self.val_data is not None:
            loader = self._val_loader()
            val_loss = evaluate_loss(
                self.model, loader, self.loss_fn, cfg.eval_batches, self.amp_dtype
            )
            record["val_loss"] = val_loss
            line += f"  val loss {val_loss:.4f}"
            if self.metrics_fn is not None:
                with torch.no_grad(), autocast_context(self.device, self.amp_dtype):
                    was_training = self.model.training
                    self.model.eval()
                    try:
                        extras = dict(self.metrics_fn(self.model, loader))
                    finally:
                        self.model.train(was_training)
                record.update(extras)
                line += "".join(f"  val {k} {v:.4f}" for k, v in extras.items())
        if self.sample_fn is not None:
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad(), autocast_context(self.device, self.amp_dtype):
                    record["sample"] = str(self.sample_fn(self.model))
            finally:
                self.model.train(was_training)
        tokens_per_s, mfu = speed
        line += f"  {tokens_per_s:,.0f} tok/s" + (f"  MFU {100 * mfu:.1f}%" if mfu else "")
        bar.write(line)
        if "sample" in record:
            bar.write(f"  sample: {record['sample']!r}")
        self._log(record)
        return {k: v for k, v in record.items() if k not in ("kind", "sample")}

    def _train_record(self, interval: dict[str, float], seq_len: int, lr: float) -> dict:
        """Log a "kind": "train" record for the steps of `interval` (summed loss, steps,
        tokens, seconds; the last gradient norm) on rank 0; return its loss, tokens/s, MFU."""
        tokens_per_s, mfu = self._throughput(interval["tokens"], interval["time"], seq_len)
        record = {
            "kind": "train",
            "step": self.step,
            "epoch": self.epoch,
            "tokens_seen": self.tokens_seen,
            "loss": interval["loss"] / max(1, interval["steps"]),
            "lr": lr,
            "grad_norm": interval["norm"],
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
        }
        if self.is_main:
            self._log(record)
        return {"train_loss": record["loss"], "tokens_per_s": tokens_per_s, "mfu": mfu}

    def _open_metrics(self, keep_up_to: int | None) -> None:
        path = self.out_dir / METRICS_NAME
        kept = []
        if keep_up_to is not None:  # resuming: drop what was logged after the checkpoint
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= keep_up_to]
        with open(path, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
        self._metrics_file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in fit)

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()

    def _close_metrics(self) -> None:
        file = getattr(self, "_metrics_file", None)
        if file is not None:
            file.close()
            self._metrics_file = None

    def _print_plan(self) -> None:
        cfg = self.config
        trainable = sum(p.numel() for p in self.params)
        total = sum(p.numel() for p in self.model.parameters())
        where = f"{self.device}" + (
            f" × {self.dist.world_size} ranks" if self.dist.world_size > 1 else ""
        )
        precision = "bf16 autocast" if self.amp_dtype is not None else "fp32"
        resumed = f", resuming at step {self.step}" if self.step else ""
        print(
            f"training {trainable:,} of {total:,} parameters on {where} ({precision}): "
            f"{self.total_steps} steps of {self.examples_per_step} examples "
            f"({self.steps_per_epoch} steps per epoch){resumed}; lr {cfg.lr:g}, warmup "
            f"{self.warmup_steps}, cosine to step {self.decay_steps}; output in {self.out_dir}"
        )


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file ([] when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- command-line options shared by every training command -------------------------------


def add_training_arguments(parser: argparse.ArgumentParser, default_epochs: int = 1) -> None:
    """The options of pretrain, finetune-classify and finetune-instruct (argparse). Commands
    change defaults with parser.set_defaults(...), except the epochs: `default_epochs` is how
    many a run without --epochs and --max-steps trains (--max-steps alone replaces it)."""
    command = parser.prog.split()[-1] if parser.prog else "train"
    data = parser.add_argument_group("data and model")
    data.add_argument(
        "--data",
        metavar="PATH",
        default=None,
        help="training data file or folder (default: the command's book data set, downloaded once)",
    )
    data.add_argument(
        "--init",
        metavar="gpt2|PATH",
        default=None,
        help="start from these weights: a GPT-2 name (gpt2, gpt2-medium, ...) or "
        "a checkpoint folder (default: a freshly initialized --model)",
    )
    data.add_argument(
        "--model",
        metavar="PRESET|config.json",
        default=None,
        help="architecture of a fresh model: a preset (gpt2-small, gpt2-medium, "
        "gpt2-large, gpt2-xl, tiny) or a config.json (default gpt2-small; ignored "
        "with --init)",
    )
    data.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="dropout rate (default: the model's, 0.1 for GPT-2)",
    )
    data.add_argument(
        "--backend",
        choices=("auto", "triton", "torch"),
        default="auto",
        help="kernels: triton (ours), torch (references), auto (triton on CUDA)",
    )
    data.add_argument(
        "--out",
        metavar="DIR",
        default=f"runs/{command}",
        help="output folder: model, metrics.jsonl, loss.png, checkpoint.pt (default %(default)s)",
    )

    loop = parser.add_argument_group("training")
    loop.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"passes over the training data (default {default_epochs} unless --max-steps is "
        "given; with both, whichever ends first)",
    )
    parser.set_defaults(default_epochs=default_epochs)
    loop.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many optimizer steps"
    )
    loop.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="sequences per micro-batch and GPU (default %(default)s)",
    )
    loop.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches accumulated per optimizer step (default %(default)s)",
    )
    loop.add_argument(
        "--lr", type=float, default=4e-4, help="peak learning rate of AdamW (default %(default)g)"
    )
    loop.add_argument(
        "--min-lr",
        type=float,
        default=None,
        help="learning rate at the end of the cosine decay (default lr/10)",
    )
    loop.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="linear warmup steps (default 5%% of the decay steps)",
    )
    loop.add_argument(
        "--lr-decay-steps",
        type=int,
        default=None,
        help="step where the cosine reaches --min-lr (default: the last step)",
    )
    loop.add_argument(
        "--weight-decay",
        type=float,
        default=0.1,
        help="AdamW weight decay on weight matrices and embeddings (default %(default)g)",
    )
    loop.add_argument(
        "--grad-clip",
        type=float,
        default=1.0,
        help="clip the gradient norm to this, 0 = off (default %(default)g)",
    )
    loop.add_argument(
        "--seed",
        type=int,
        default=123,
        help="seed of the data order, splits and initialization (default %(default)s)",
    )
    loop.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto = bf16 autocast on CUDA, fp32 on CPU",
    )
    loop.add_argument(
        "--device", default="auto", help="cuda, cuda:1, cpu, or auto (default: CUDA when available)"
    )
    loop.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader worker processes (default %(default)s)",
    )

    logs = parser.add_argument_group("evaluation, logging and checkpoints")
    logs.add_argument(
        "--eval-every",
        type=int,
        default=50,
        help="validate (and sample) every N steps and at the end; 0 = only at the "
        "end (default %(default)s)",
    )
    logs.add_argument(
        "--eval-batches",
        type=int,
        default=10,
        help="validation batches per evaluation (default %(default)s)",
    )
    logs.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="log the training loss, tokens/s and MFU every N steps (default %(default)s)",
    )
    logs.add_argument(
        "--save-every",
        type=int,
        default=500,
        help="write checkpoint.pt every N steps (and at the end); 0 = only at the "
        "end (default %(default)s)",
    )
    logs.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="never write checkpoint.pt (it holds the optimizer state too)",
    )
    logs.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from --out's checkpoint.pt (or the file given): model, "
        "optimizer, step, data position and RNG states; the LR schedule is this run's "
        "options (the same ones continue exactly)",
    )
    logs.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the options of `add_training_arguments`. Raises ValueError."""
    epochs, max_steps = args.epochs, args.max_steps
    if epochs is None and max_steps is None:
        epochs = getattr(args, "default_epochs", 1)
    return TrainConfig(
        out_dir=str(args.out),
        max_steps=max_steps,
        epochs=epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup_steps,
        lr_decay_steps=args.lr_decay_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        log_every=args.log_every,
        save_every=args.save_every,
        save_checkpoint=not args.no_checkpoint,
        seed=args.seed,
        resume=args.resume,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
        progress=not args.no_progress,
    )


def model_config_from_spec(spec: str, **overrides: Any):
    """GPTConfig from a preset name or a config.json path (or a folder holding one)."""
    from fastgpt.config import GPTConfig

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        config = GPTConfig.from_json(path)
        return dataclasses.replace(config, **overrides) if overrides else config
    if path.suffix == ".json":
        raise FileNotFoundError(f"model config not found: {path}")
    return GPTConfig.from_name(spec, **overrides)


def build_model_from_args(args: argparse.Namespace):
    """The model to train: --init weights (GPTModel.from_pretrained: a GPT-2 name or a
    checkpoint folder) or a fresh --model (preset or config.json, default gpt2-small; a given
    --context-length sets its context), seeded with --seed. --dropout overrides the rate."""
    from fastgpt.model import GPTModel

    seed = getattr(args, "seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    backend = getattr(args, "backend", "auto") or "auto"
    overrides: dict[str, Any] = {}
    if getattr(args, "dropout", None) is not None:
        overrides["drop_rate"] = args.dropout
    if getattr(args, "init", None):
        return GPTModel.from_pretrained(args.init, backend=backend, **overrides).train()
    if getattr(args, "context_length", None):
        overrides["context_length"] = args.context_length
    config = model_config_from_spec(getattr(args, "model", None) or "gpt2-small", **overrides)
    return GPTModel(config, backend=backend)
