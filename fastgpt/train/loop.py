"""The training loop shared by pretraining, classification and instruction fine-tuning.

    trainer = Trainer(model, train_set, val_set, loss_fn, TrainConfig(out_dir="runs/x"))
    final_metrics = trainer.fit()

One optimizer step, in order:

    for each of grad_accum micro-batches (DDP gradient sync only on the last one):
        loss = loss_fn(model, batch)           autocast per precision (auto: 16-bit on CUDA only)
        (loss / grad_accum).backward()         gradients of the mean over the whole step (fp16:
                                               of the loss times the loss scale, then unscaled)
    loss averaged over ranks; gradient norm clipped to grad_clip
    loss or norm not finite -> NonFiniteLossError naming the step, BEFORE optimizer.step()
        (fp16: a non-finite norm is an overflow of the loss scale instead: the step is skipped,
        counted in metrics.jsonl, and the scale halved; `torch.amp.GradScaler`)
    AdamW step (weight decay on matrices and embeddings only); LR schedule step

Host-device syncs: with a fused AdamW (CUDA's), a step's loss and gradient norm stay on the
device except on a reporting step (`_reports`: a log, eval or checkpoint step, the last, the
run's first), which copies those of every step since the previous report to the host at once.
In between, the non-finite guard runs on the device: fused AdamW's `found_inf` skips a
non-finite step and every step after it, and the next report raises for the first of them, so
the parameters are still those before it. Otherwise (CPU, where reading a value costs no wait)
every step reports.

The loop itself only sequences the components it delegates to: the data order
(`batches.BatchOrder`), the optimizer and schedule (`optim`), evaluation (`evaluation.Evaluator`),
metrics and throughput (`metrics`), checkpoints (`checkpoint.Checkpointer` writes the file,
`trainer_state.TrainerState` the state in it) and torchrun's process group (`distributed`).
Rank 0 writes into out_dir: run.json (before the first step), metrics.jsonl, checkpoint.pt,
loss.png.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, default_collate

from fastgpt.devices import peak_flops, resolve_device, resolve_dtype
from fastgpt.errors import NonFiniteLossError, StopRequested, UsageError
from fastgpt.train.batches import BatchOrder
from fastgpt.train.checkpoint import Checkpointer, seed_everything
from fastgpt.train.config import TrainConfig, check_out_dir_is_free
from fastgpt.train.distributed import init_distributed
from fastgpt.train.metrics import (
    PLOT_NAME,
    DivergenceWatch,
    Interval,
    MetricsLog,
    Throughput,
    environment,
    save_loss_plot,
)
from fastgpt.train.optim import Schedule, lr_scheduler, make_optimizer
from fastgpt.train.stop_signals import StopSignals
from fastgpt.train.trainer_state import TrainerState
from fastgpt.train.validation import Evaluator, LossFn, autocast_context


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


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _flops_of(model: nn.Module) -> Callable[[int], float] | None:
    """Training FLOPs per token as a function of the sequence length, for a GPTModel."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "n_layers"):
        return None
    from fastgpt.model import flops_per_token

    return lambda seq_len: flops_per_token(config, seq_len)


class Trainer(TrainerState):
    """Trains `model` on `train_data` with `loss_fn`; see the module docstring.

    train_data / val_data: map-style datasets (val_data may be None). collate_fn turns a list
    of items into a batch (default: torch's default_collate). loss_fn(model, batch) -> scalar
    mean loss. metrics_fn(model, val_loader) -> dict of extra evaluation metrics.
    sample_fn(model) -> str, a text sample shown and logged at each evaluation. params: the
    parameters to optimize (default: those with requires_grad; only they get an optimizer
    state). run_info: what defines the run besides the model (e.g. {"task": "pretrain", "data":
    "corpus/"}), stored in checkpoints; --resume refuses a checkpoint of another run.
    options: every option of the command that runs the Trainer, by name, for run.json (default:
    the TrainConfig's fields).
    """

    checkpoint_on_stop = True
    """On SIGINT/SIGTERM, finish the step and save a checkpoint there (one rank only: under
    torchrun the ranks may stop at different steps); False for a run whose files will be
    discarded on a stop (the runner's staged --overwrite run)."""

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        val_data: Dataset | None,
        loss_fn: LossFn,
        config: TrainConfig,
        collate_fn: Callable | None = None,
        metrics_fn: Callable[[nn.Module, Iterable], dict[str, float]] | None = None,
        sample_fn: Callable[[nn.Module], str] | None = None,
        params: Iterable[nn.Parameter] | None = None,
        run_info: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
    ):
        self.config, self.loss_fn = config, loss_fn
        self.options = options if options is not None else config.to_dict()
        self.run_info = {**(run_info or {}), "training examples": len(train_data)}
        self.collate_fn = collate_fn or default_collate
        self.out_dir = Path(config.out_dir)
        self.dist = init_distributed()
        self.is_main = self.dist.is_main
        self.device = resolve_device(config.device, self.dist.local_rank)
        dtype = resolve_dtype(config.precision, self.device)
        self.amp_dtype = dtype if dtype != torch.float32 else None  # autocast to it, or none
        # fp16: the loss is scaled so that small gradients do not flush to zero in fp16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)
        self.skipped_steps = 0  # fp16: optimizer steps skipped for an overflowing gradient
        self.model = model.to(self.device)
        self.params = list(params if params is not None else trainable_parameters(self.model))
        if not self.params:
            raise UsageError("no parameters to train: every parameter has requires_grad=False")
        self.train_model = self._wrap_for_ranks(self.model)

        world, rank = self.dist.world_size, self.dist.rank
        self.batches = BatchOrder(
            train_data, config.batch_size, config.grad_accum, world, rank, config.seed
        )
        limits = [config.max_steps] if config.max_steps else []
        if config.epochs:
            limits.append(config.epochs * self.batches.steps_per_epoch)
        self.total_steps = min(limits)
        fused = self.device.type == "cuda" and all(p.is_cuda for p in self.params)
        self.optimizer = make_optimizer(
            self.params, config.lr, config.weight_decay, config.betas, fused=fused
        )
        self.schedule = Schedule.of(config, self.total_steps)
        self.scheduler = lr_scheduler(self.optimizer, self.schedule)

        self.step = 0  # optimizer steps done
        self.tokens_seen = 0  # input tokens of all ranks trained on so far
        self.evaluate = Evaluator(
            val_data, loss_fn, config.batch_size, self.collate_fn, config.seed,
            config.eval_batches, self.amp_dtype, metrics_fn, sample_fn,
        )  # fmt: skip
        self.metrics = MetricsLog(self.out_dir, enabled=self.is_main, loggers=config.loggers)
        self.checkpointer = Checkpointer(
            self.out_dir, config.save_checkpoint, config.save_every, self.dist
        )
        self.throughput = Throughput(peak_flops(self.device), _flops_of(self.model), world)
        self.divergence = DivergenceWatch(self.schedule.warmup_steps)

    def _wrap_for_ranks(self, model: nn.Module) -> nn.Module:
        if self.dist.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpointer.path

    @property
    def history(self) -> list[dict[str, Any]]:
        """This run's metric records."""
        return self.metrics.history

    # --- the loop --------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train until max_steps / epochs; returns the last metrics (step, tokens_seen,
        train_loss, val_loss and the metrics_fn extras). Raises NonFiniteLossError."""
        from tqdm.auto import tqdm

        self._start()
        show = self.config.progress and self.is_main
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not show, dynamic_ncols=True)  # fmt: skip
        self._final = {"step": self.step, "tokens_seen": self.tokens_seen}
        self._held: list[torch.Tensor] = []  # (2,) loss and norm of each unreported step
        self._skip: torch.Tensor | None = None  # () bool: a held step was not finite
        self._timings: list[tuple[int, float]] = []  # (tokens, seconds) of each unreported step
        self._reported_once = False
        steps = self.batches.steps(self.collate_fn, self.config.num_workers,
                                   pin_memory=self.device.type == "cuda")  # fmt: skip
        try:
            with StopSignals(defer=True) as stop:  # a signal stops at a step's end
                self._stop_signals = stop  # a pending stop makes the next step report
                while self.step < self.total_steps:
                    started = time.perf_counter()
                    lr = self.optimizer.param_groups[0]["lr"]  # the LR this step uses
                    reported, tokens, seq_len = self._train_step(next(steps))
                    elapsed = time.perf_counter() - started
                    self._after_step(reported, tokens, seq_len, lr, elapsed, bar)
                    # Stop where every step's loss has reached the host (and been checked);
                    # at the last step the run finishes.
                    if stop.signum is not None and self.step < self.total_steps and reported:
                        self._stop(stop.signum)
        except BaseException as exc:
            self.metrics.close(completed=False)  # an earlier run's metrics stay as they were
            self.dist.close()  # leave no process group behind on an error
            if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, StopRequested):
                self._say_where_it_stopped(bar)
            raise
        finally:
            bar.close()
        self.metrics.close()
        if self.is_main and self.config.plot:
            save_loss_plot(self.metrics.path, self.out_dir / PLOT_NAME)
        final = {**self._final, "step": self.step, "tokens_seen": self.tokens_seen,
                 "epoch": self.batches.epoch}  # fmt: skip
        if self.dist.created_group:
            dist.barrier()
        self.dist.close()
        return final

    def _after_step(self, reported, tokens, seq_len, lr, elapsed, bar) -> None:
        """Count the step; on a reporting step (`reported`: the (loss, norm) of each step since
        the previous one) add those steps to the intervals, and log, evaluate, warn and
        checkpoint when they are due."""
        self.tokens_seen += tokens
        self._timings.append((tokens, elapsed))
        bar.update(1)
        if not reported:  # its loss is still on the device
            return
        first = self.step - len(reported) + 1
        steps = zip(reported, self._timings, strict=True)
        for i, ((loss, grad_norm), (step_tokens, seconds)) in enumerate(steps):
            for interval in (self._since_log, self._since_eval):
                interval.add(loss, step_tokens, seconds, grad_norm)
            self.divergence.check(first + i, loss, self.metrics, bar)
        self._timings = []
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / elapsed:,.0f}")
        last = self.step == self.total_steps
        if self.step % self.config.log_every == 0 or last:
            self._final.update(self._log_train(self._since_log, seq_len, lr))
            self._since_log = Interval()
        if (self.config.eval_every and self.step % self.config.eval_every == 0) or last:
            self._final.update(self._log_eval(self._since_eval, seq_len, bar))
            self._since_eval = Interval()
        if self.checkpointer.due(self.step, last):
            self.save_checkpoint()

    def _start(self) -> None:
        """Refuse to overwrite another run unasked; resume from a checkpoint or seed every
        RNG; write run.json and open metrics.jsonl; print the plan."""
        cfg = self.config
        # Sums since the last log line and evaluation; a checkpoint keeps them, so that the
        # first line after --resume covers the same steps as without the stop.
        self._since_log, self._since_eval = Interval(), Interval()
        check_out_dir_is_free(cfg)
        # Every rank looks at out_dir before rank 0 writes there: else a slower rank would see
        # this run's own new metrics.jsonl as another run's.
        self.dist.barrier()
        resumed_from = None
        if cfg.resume:
            path = resumed_from = self.checkpoint_path if cfg.resume is True else Path(cfg.resume)
            self.load_state_dict(Checkpointer.read(path), path)
            if self.step >= self.total_steps:
                raise UsageError(
                    f"{path} holds step {self.step}, and this run ends at step "
                    f"{self.total_steps}: give a larger {{max_steps}} (or {{epochs}}) to continue"
                )
        else:
            seed_everything(cfg.seed + self.dist.rank)  # dropout differs between ranks
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            record = {"start_step": self.step, "resumed_from": resumed_from,
                      "options": self.options, "precision": self._precision_name(),
                      **environment(self.device, self.dist.world_size)}  # fmt: skip
            self.metrics.open(self.step if cfg.resume else None, record)
            print(self._plan())

    def _reports(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) copies its loss and gradient norm to the
        host (the step's one sync): a log, eval or checkpoint step, the last, the run's first
        (the divergence watch's reference), and every step when the optimizer cannot skip a
        step on the device (only fused AdamW takes `found_inf`) or when fp16's loss scaler
        reads every step's overflow on the host anyway; and once a stop is pending, so that the
        run stops (and checkpoints) where every step's loss has been checked."""
        cfg, last = self.config, step == self.total_steps
        return (
            not self._reported_once
            or not self.optimizer.defaults.get("fused")
            or self.scaler.is_enabled()
            or self._stop_signals.signum is not None
            or step % cfg.log_every == 0
            or bool(cfg.eval_every and step % cfg.eval_every == 0)
            or self.checkpointer.due(step, last)
            or last
        )

    def _train_step(self, micro_batches: list[Any]) -> tuple[list[tuple[float, float]], int, int]:
        """Forward/backward over the micro-batches, the finiteness check and the optimizer
        step. Returns ((mean loss over all ranks, gradient norm before clipping) of each step
        since the previous reporting step, or [] when this step does not report; tokens of all
        ranks, sequence length)."""
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
                self.scaler.scale(loss / accum).backward()  # fp16: times the loss scale
            loss_sum += loss.detach()
            n_tokens, seq_len = batch_token_count(batch)
            tokens += n_tokens
        mean_loss = loss_sum / accum
        if self.dist.world_size > 1:
            dist.all_reduce(mean_loss)  # SUM (gloo has no AVG)
            mean_loss /= self.dist.world_size
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        self.scaler.unscale_(self.optimizer)  # fp16: the true gradients, to clip and check
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        stats = torch.stack([mean_loss, grad_norm.double()])  # (2,) on the device
        reported: list[tuple[float, float]] = []
        overflow = False  # fp16: this step's gradient overflowed the loss scale
        if self._reports(self.step + 1):
            reported = torch.stack([*self._held, stats]).tolist()  # the one sync
            self._held, self._skip, self._reported_once = [], None, True
            self.optimizer.found_inf = None
            first = self.step + 2 - len(reported)  # the step of reported[0]
            for i, (loss_value, norm_value) in enumerate(reported):
                overflow = self.scaler.is_enabled() and not math.isfinite(norm_value)
                if not (math.isfinite(loss_value) and (math.isfinite(norm_value) or overflow)):
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step = first + i - 1  # the held steps from it on were skipped
                    raise NonFiniteLossError(self._non_finite_message(loss_value, norm_value))
        else:  # no sync: skip this step on the device if it, or a held one, is not finite
            bad = ~stats.isfinite().all()
            self._skip = bad if self._skip is None else self._skip | bad
            self.optimizer.found_inf = self._skip.float()
            self._held.append(stats)
        self.scaler.step(self.optimizer)  # fp16: no step where a gradient overflowed
        if self.scaler.is_enabled():  # fp16 reports every step (`_reports`)
            self._update_loss_scale(overflow, reported[-1][0])
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.batches.advance()
        return reported, tokens * self.dist.world_size, seq_len

    # --- reporting -------------------------------------------------------------------------

    def _log_train(self, interval: Interval, seq_len: int, lr: float) -> dict[str, Any]:
        """A "train" record for the steps of `interval`; returns its loss, tokens/s, MFU."""
        tokens_per_s, mfu = self.throughput(interval.tokens, interval.time, seq_len)
        self.metrics.log({
            "kind": "train", "step": self.step, "epoch": self.batches.epoch,
            "tokens_seen": self.tokens_seen, "loss": interval.mean_loss, "lr": lr,
            "grad_norm": interval.norm, "tokens_per_s": tokens_per_s, "mfu": mfu,
            **self._loss_scale_record(),
        })  # fmt: skip
        return {"train_loss": interval.mean_loss, "tokens_per_s": tokens_per_s, "mfu": mfu}

    def _loss_scale_record(self) -> dict[str, Any]:
        """fp16: the loss scale and the steps skipped so far ({} in bf16 and fp32)."""
        if not self.scaler.is_enabled():
            return {}
        return {"loss_scale": self.scaler.get_scale(), "skipped_steps": self.skipped_steps}

    def _log_eval(self, interval: Interval, seq_len: int, bar) -> dict[str, Any]:
        """Rank 0: evaluate, print a line above the bar, log an "eval" record; returns it
        without "kind" and "sample". Other ranks return {}."""
        if not self.is_main:
            return {}
        measured = self.evaluate(self.model)
        record = {"kind": "eval", "step": self.step, "epoch": self.batches.epoch,
                  "tokens_seen": self.tokens_seen, "train_loss": interval.mean_loss,
                  **measured}  # fmt: skip
        line = f"step {self.step}/{self.total_steps}  train loss {interval.mean_loss:.4f}"
        if record["val_loss"] is not None:
            line += f"  val loss {record['val_loss']:.4f}"
        extras = {k: v for k, v in measured.items() if k not in ("val_loss", "sample")}
        line += "".join(f"  val {k} {v:.4f}" for k, v in extras.items())
        tokens_per_s, mfu = self.throughput(interval.tokens, interval.time, seq_len)
        line += f"  {tokens_per_s:,.0f} tok/s" + (f"  MFU {100 * mfu:.1f}%" if mfu else "")
        bar.write(line)
        if "sample" in record:
            bar.write(f"  sample: {record['sample']!r}")
        self.metrics.log(record)
        return {k: v for k, v in record.items() if k not in ("kind", "sample")}

    def _plan(self) -> str:
        cfg = self.config
        trainable = sum(p.numel() for p in self.params)
        total = sum(p.numel() for p in self.model.parameters())
        ranks = f" × {self.dist.world_size} ranks" if self.dist.world_size > 1 else ""
        precision = self._precision_name()
        precision += " autocast" if self.amp_dtype is not None else ""
        precision += " with loss scaling" if self.scaler.is_enabled() else ""
        resumed = f", resuming at step {self.step}" if self.step else ""
        return (
            f"training {trainable:,} of {total:,} parameters on {self.device}{ranks} "
            f"({precision}): {self.total_steps} steps of {self.batches.examples_per_step} "
            f"examples ({self.batches.steps_per_epoch} steps per epoch){resumed}; lr "
            f"{cfg.lr:g}, warmup {self.schedule.warmup_steps}, cosine to step "
            f"{self.schedule.decay_steps}; output in {self.out_dir}"
        )

    def _precision_name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.amp_dtype]

    def _update_loss_scale(self, overflow: bool, loss: float) -> None:
        """fp16: halve the loss scale after an overflow (that step was skipped: the data and the
        LR schedule move on, the parameters do not), double it after growth_interval clean
        steps. NonFiniteLossError when the gradient overflows even below scale 1: no scale
        can help, the gradient itself is not finite."""
        self.scaler.update()
        if not overflow:
            return
        self.skipped_steps += 1
        if self.scaler.get_scale() < 1:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(self._non_finite_message(loss, math.inf))

    def _non_finite_message(self, loss: float, norm: float) -> str:
        saved = self.checkpointer.saved_step
        where = (
            f"resume from the checkpoint of step {saved}" if saved is not None else "start again"
        )
        return (
            f"step {self.step + 1}: non-finite training loss {loss} or gradient norm {norm}; "
            "stopped before the optimizer step, parameters are unchanged (try a lower {lr} or "
            f"a smaller {{grad_clip}}; {where})"
        )

    def _stop(self, signum: int) -> None:
        """Stop at this step's end: save a checkpoint (see checkpoint_on_stop), then raise
        StopRequested saying how to continue."""
        checkpointer = self.checkpointer
        saves = self.checkpoint_on_stop and checkpointer.enabled and self.dist.world_size == 1
        if saves and checkpointer.saved_step != self.step:
            self.save_checkpoint()
        saved = checkpointer.saved_step
        if saved == self.step:
            how = "continue with --resume"
        elif saved is not None:
            how = f"{self.checkpoint_path} holds step {saved}: continue with --resume"
        else:
            how = "no checkpoint was saved"
        raise StopRequested(signum, f"stopped at step {self.step}; {how}")

    def _say_where_it_stopped(self, bar) -> None:
        saved = self.checkpointer.saved_step
        if self.is_main and saved is not None:
            bar.close()
            print(
                f"stopped at step {self.step}; {self.checkpoint_path} holds step {saved}: "
                "continue with --resume",
                file=sys.stderr,
            )
