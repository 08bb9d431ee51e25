"""The one runner behind `fastgpt pretrain`, `finetune-classify` and `finetune-instruct`.

A training command is a `Task`: its own options (a dataclass), its defaults for the loop's
options, and what only it knows (data, how the model is adapted, loss, collate, metrics, sample,
what to save). The runner does the rest, in this order, each hook given what the one before
returned:

    options -> TrainConfig -> data = task.load_data()     (a bad file fails before any weights)
      -> model: --init weights or a fresh --model (seeded, shaped by task.model_overrides(data))
      -> parts = task.build(model, data)                  (TrainingParts: sets and functions)
      -> Trainer(model, parts..., task.loss).fit() -> rank 0: task.finish(model, parts, ...)

Bad input raises `UsageError` (the CLI prints one line, exit status 2). Up to the Trainer, where
options, data and the starting model are read, a ValueError / FileNotFoundError is bad input
too; from the Trainer on, only a UsageError is (the loop raises one for what it finds wrong with
--resume or the batch sizes), and any other exception is a bug, with its traceback (exit status
1). A non-finite loss is `NonFiniteLossError` (exit status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import nn
from torch.utils.data import Dataset

from fastgpt.errors import ConfigError, StopRequested, UsageError, require
from fastgpt.files import reports_disk_full
from fastgpt.kernels import DROPOUT_LEVELS, DROPOUT_RANGE, kernel_dropout_p
from fastgpt.lora import LoRAOptions
from fastgpt.options import add_options, explicit_options, options_from_args
from fastgpt.train.config import TrainConfig, check_out_dir_is_free
from fastgpt.train.distributed import is_main_process
from fastgpt.train.loop import Trainer
from fastgpt.train.out_folder import Staging, remove_leftovers
from fastgpt.train.stop_signals import StopSignals

if TYPE_CHECKING:
    from fastgpt.model_config import GPTConfig


@dataclass
class ModelOptions:
    """Which model a training command starts from."""

    init: str | None = field(default=None, metadata={"metavar": "gpt2|PATH"})
    """Start from these weights: a GPT-2 name (gpt2, gpt2-medium, ...) or a folder a command
    wrote (default: a freshly initialized --model)."""
    model: str | None = field(default=None, metadata={"metavar": "PRESET|config.json"})
    """Architecture of a fresh model: a preset (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl,
    gpt2-small-book, tiny) or a config.json (default gpt2-small; ignored with --init)."""
    dropout: float | None = None
    """Dropout rate (unset: the model's own, 0.1 for GPT-2)."""
    weight_init: Literal["gpt2", "book"] = "gpt2"
    """How a fresh model is initialized: gpt2 (N(0, 0.02), residual projections scaled by
    1/sqrt(2·n_layers)) or book (PyTorch's layer defaults drawn from the seed in the order of the
    book's GPTModel, which reproduces chapter 5's losses; needs an untied head, e.g. --model
    gpt2-small-book)."""
    backend: Literal["auto", "triton", "torch"] = "auto"
    """Kernels: triton (ours), torch (the references), auto (triton on CUDA)."""
    compile: bool = False
    """torch.compile the model (our kernels stay custom ops inside the graph; on CPU the torch
    backend's math is compiled by Inductor). The first steps pay the compile (tens of seconds
    for gpt2-small; again whenever a batch brings a new sequence length, until dynamic shapes
    take over); worth it for long runs, not for a few steps."""

    def __post_init__(self) -> None:
        ok = self.dropout is None or 0 <= self.dropout < 1
        require(self, "dropout", ok, "in [0, 1) (or unset: the model's own)")
        if self.dropout is not None:
            require_kernel_dropout(self.dropout, self.backend, "dropout", "")

    def check_before_data(self) -> None:
        """Check the drop_rate of --model (a preset or config.json) or of an --init folder
        holding a config.json before the data is read: tokenizing a large --data takes
        minutes. A GPT-2 name's config comes with its download, and a missing folder is
        reported, by `build_model` after the data (which checks every config again)."""
        from fastgpt.model_config import GPTConfig
        from fastgpt.weights import CONFIG_NAME, read_config

        folder = Path(self.init).expanduser() if self.init else None
        if folder is None:
            self.require_kernel_dropout_of(GPTConfig.from_spec(self.model or "gpt2-small"))
        elif (folder / CONFIG_NAME).is_file():
            self.require_kernel_dropout_of(read_config(folder)[0])

    def require_kernel_dropout_of(self, config: GPTConfig) -> None:
        """ConfigError naming --init or --model unless the attention kernels of --backend take
        the dropout rate of `config`, the GPTConfig it gave (without --dropout)."""
        if self.dropout is None:
            option, source = ("init", self.init) if self.init else ("model", self.model)
            what = f"{source or 'gpt2-small'}: its drop_rate "
            require_kernel_dropout(config.drop_rate, self.backend, option, what)


def require_kernel_dropout(rate: float, backend: str, field: str, what: str) -> None:
    """ConfigError naming `field` ("{what}must be ...") unless the attention kernels of
    `backend` take dropout `rate`: they drop at multiples of 1/DROPOUT_LEVELS."""
    if rate and backend != "torch":
        try:
            kernel_dropout_p(rate)
        except ValueError:
            raise ConfigError(
                field,
                f"{what}must be 0 or in {DROPOUT_RANGE} with --backend {backend}, got {rate!r}: "
                f"the attention kernels drop at multiples of 1/{DROPOUT_LEVELS} (--backend "
                "torch takes any rate in [0, 1))",
            ) from None


@contextlib.contextmanager
def usage_errors():
    """Report the ValueError / FileNotFoundError of the steps that read the user's input
    (options, data, the model to start from) as a UsageError (one line, exit status 2); not for
    the training loop, whose own errors of that kind are bugs."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc


# The training commands pad the token embedding and output head to a multiple of this many
# rows (GPT-2's 50,257 -> 50,304): the output head's GEMMs in the loss, the largest of a step,
# then run on tensor-core-aligned shapes. Logits, losses, generation and saved weights are the
# unpadded model's (GPTConfig.vocab_multiple), and a fresh model's init draws only the real rows:
# a padded run starts from the unpadded one's weights, on any device.
TRAINING_VOCAB_MULTIPLE = 128


def build_model(options: ModelOptions, seed: int | None = None, **overrides: Any):
    """The model to train: --init weights (`GPTModel.from_pretrained`) or a fresh --model (a
    preset or config.json, default gpt2-small) built after seeding torch with `seed`, its
    vocabulary padded to TRAINING_VOCAB_MULTIPLE rows where its config does not pad it.
    `overrides` (e.g. context_length) shape a fresh model only; --dropout applies to both."""
    import torch

    from fastgpt import weights
    from fastgpt.model import GPTModel
    from fastgpt.model_config import GPTConfig

    if seed is not None:
        torch.manual_seed(seed)
    if options.dropout is not None:
        overrides["drop_rate"] = options.dropout
    if options.init:
        if options.weight_init != "gpt2":
            raise ConfigError("weight_init", "applies to a fresh model, not to {init} weights")
        directory = weights.resolve_checkpoint_dir(options.init)
        kept = {k: v for k, v in overrides.items() if k == "drop_rate"}
        saved = weights.read_config(directory, **kept)[0]  # checked before the weights load
        options.require_kernel_dropout_of(saved)
        if saved.vocab_multiple == 1:
            kept["vocab_multiple"] = TRAINING_VOCAB_MULTIPLE
        return GPTModel.from_pretrained(directory, backend=options.backend, **kept).train()
    config = GPTConfig.from_spec(options.model or "gpt2-small", **overrides)
    options.require_kernel_dropout_of(config)
    if config.vocab_multiple == 1:
        config = dataclasses.replace(config, vocab_multiple=TRAINING_VOCAB_MULTIPLE)
    model = GPTModel(config, backend=options.backend)
    if options.weight_init == "book":
        from fastgpt.initialization import init_book_weights_

        init_book_weights_(model, seed=seed)  # the stream of the book's manual_seed(seed)
    return model


def compile_model(model: nn.Module) -> nn.Module:
    """Compile `model` in place (`nn.Module.compile`: its parameters, state_dict and saving
    are unchanged, so checkpoints of a compiled run load anywhere). fullgraph: the forward and
    loss hold no graph break (token-id checks are skipped while compiling), so a break that
    appears is a bug to see, not a slowdown to miss."""
    model.compile(fullgraph=True)
    return model


@dataclass
class TrainingParts:
    """What a task's `build` makes for the Trainer (see `Trainer` for the functions' calls):
    the training and validation sets, and the collate, metrics and sample functions (None: the
    Trainer's default, no extra metrics, no sample). A task whose `finish` needs more (a test
    split, ...) returns a subclass holding it."""

    train_set: Dataset
    val_set: Dataset | None
    collate_fn: Callable | None = None
    metrics_fn: Callable[[nn.Module, Iterable], dict[str, float]] | None = None
    sample_fn: Callable[[nn.Module], str] | None = None


class Task:
    """A training command. A subclass declares itself in its class line and overrides the
    hooks below:

        class InstructTask(Task, name="finetune-instruct", options=InstructOptions,
                           defaults={"epochs": 2, "lr": 5e-5}, uses_lora=True): ...

    name: the command; options: the dataclass of its own options; defaults: its defaults for
    any of its options (a field of ModelOptions, `options`, TrainConfig or, with uses_lora,
    LoRAOptions; a key that is none of these is a TypeError here, at the class line);
    uses_lora: whether --lora-rank and friends apply.

    The runner calls the hooks in this order, each with what the one before returned; a hook
    keeps nothing on the task for a later one:

        data = task.load_data()                   the task's own type (read, validated)
        overrides = task.model_overrides(data)    fields of a fresh model's config
        parts = task.build(model, data)           TrainingParts (or a subclass)
        ... training with parts, task.loss and task.run_info() ...
        task.finish(model, parts, out_dir, final)   rank 0 only
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    defaults: ClassVar[dict[str, Any]]
    uses_lora: ClassVar[bool]

    def __init_subclass__(
        cls, name: str, options: type, defaults: dict[str, Any] | None = None,
        uses_lora: bool = False, **kwargs: Any,
    ):  # fmt: skip
        super().__init_subclass__(**kwargs)
        cls.name, cls.Options, cls.uses_lora = name, options, uses_lora
        cls.defaults = dict(defaults or {})
        known = {f.name for group in option_classes(cls) for f in fields(group)}
        unknown = sorted(set(cls.defaults) - known)
        if unknown:  # a typo would otherwise be a default that silently never applies
            raise TypeError(
                f"task {name!r}: defaults {unknown} match no option of "
                + ", ".join(group.__name__ for group in option_classes(cls))
            )

    def __init__(
        self,
        options,
        config: TrainConfig,
        model_options: ModelOptions,
        lora=None,
        explicit: frozenset[str] = frozenset(),
    ):
        self.options, self.config = options, config
        self.model_options, self.lora = model_options, lora
        self.explicit = explicit  # the options given on the command line

    def load_data(self) -> Any:
        """Read and validate the data (no weights are touched yet); print what was read.
        Returns it as the task's own type, which `model_overrides` and `build` receive."""
        raise NotImplementedError

    def model_overrides(self, data: Any) -> dict[str, Any]:
        """Config fields a fresh model gets from this task's options and data (e.g.
        context_length)."""
        return {}

    def build(self, model: nn.Module, data: Any) -> TrainingParts:
        """Check the model against the data, adapt it (a new head, LoRA adapters from
        `self.lora`, frozen layers); return the sets and functions to train with."""
        raise NotImplementedError

    def run_info(self) -> dict[str, Any]:
        """What defines this run besides the model, kept in checkpoints so that --resume
        refuses another run's: the task and its data (a path made absolute: the same file
        named from elsewhere is the same data)."""
        data = getattr(self.options, "data", None)
        return {"task": self.name, "data": str(Path(data).expanduser().resolve()) if data
                else "default"}  # fmt: skip

    def loss(self, model: nn.Module, batch) -> Any:
        raise NotImplementedError

    def finish(
        self, model: nn.Module, parts: TrainingParts, out_dir: Path, final: dict[str, Any]
    ) -> None:
        """Rank 0, after training: evaluate and save into out_dir (`parts`: what `build`
        returned; `final`: the Trainer's last metrics)."""
        raise NotImplementedError


def check_vocabulary(model: nn.Module, largest_id: int) -> None:
    """UsageError unless token id `largest_id`, the largest the batches will hold, lies in the
    model's vocabulary: checked once before training rather than failing at its first step."""
    vocab_size = model.config.vocab_size
    if largest_id >= vocab_size:
        raise UsageError(
            f"the data holds token id {largest_id}, but the model's vocab_size is {vocab_size} "
            "(GPT-2 BPE needs 50257)"
        )


def option_classes(task: type[Task]) -> list[type]:
    """The dataclasses whose fields are a training command's options, in --help order."""
    return [ModelOptions, task.Options, TrainConfig] + ([LoRAOptions] if task.uses_lora else [])


def add_task_arguments(parser: argparse.ArgumentParser, task: type[Task]) -> None:
    """Every option of a training command: the model, the task's own, the loop's, LoRA's; each
    of the task's defaults goes to the dataclass that has that field."""
    titles = {
        ModelOptions: "model",
        task.Options: task.name.replace("-", " "),
        TrainConfig: "training",
        LoRAOptions: "LoRA (train low-rank adapters instead of the weights)",
    }
    defaults = {"out_dir": f"runs/{task.name}", **task.defaults}
    for cls in option_classes(task):
        names = {f.name for f in fields(cls)}
        own = {k: v for k, v in defaults.items() if k in names}
        add_options(parser, cls, titles[cls], defaults=own)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the options; --max-steps given alone sets the run's length (the
    command's default epochs then do not count)."""
    given = explicit_options(args)
    if "max_steps" in given and "epochs" not in given:
        return options_from_args(TrainConfig, args, epochs=None)
    return options_from_args(TrainConfig, args)


def run_task(task_cls: type[Task], args: argparse.Namespace) -> int:
    """Run a training command from its parsed options (see the module docstring). SIGTERM
    ends it as Ctrl-C does (`StopSignals`): what it started is cleaned up."""
    with StopSignals(defer=False):
        task, model, parts, earlier = _prepare(task_cls, args)
        _train_and_finish(task, model, parts, earlier)
    return 0


def _prepare(
    task_cls: type[Task], args: argparse.Namespace
) -> tuple[Task, nn.Module, TrainingParts, list[str]]:
    """(task, model, parts, the earlier run's file names in out_dir): everything the user's
    input decides, read and checked before any file is written."""
    with usage_errors():  # where bad input shows up: options, data, the model to start from
        lora = options_from_args(LoRAOptions, args) if task_cls.uses_lora else None
        task = task_cls(
            options_from_args(task_cls.Options, args),
            train_config_from_args(args),
            options_from_args(ModelOptions, args),
            lora,
            frozenset(explicit_options(args)),
        )
        data_path = getattr(task.options, "data", None)  # every task's --data, when it has one
        if data_path is not None and not data_path.strip():  # "" would read the current folder
            raise ConfigError("data", "is empty: give a file, folder or glob")
        earlier = check_out_dir_is_free(task.config)  # before any work: another run's files stay
        task.model_options.check_before_data()
        # A bad file fails before any weights are built, loaded or downloaded.
        data = task.load_data()
        overrides = task.model_overrides(data)
        model = build_model(task.model_options, task.config.seed, **overrides)
        parts = task.build(model, data)
        if task.model_options.compile:
            compile_model(model)
    if is_main_process() and task.uses_lora:
        from fastgpt.lora import describe_parameters

        print(describe_parameters(model))
    return task, model, parts, earlier


def _train_and_finish(
    task: Task, model: nn.Module, parts: TrainingParts, earlier: list[str]
) -> None:
    """Train, then (rank 0) let the task save. An --overwrite run over an earlier run writes
    into a staging folder inside out_dir and moves its files out once finished (`Staging`)."""
    main, out = is_main_process(), Path(task.config.out_dir)
    if main:
        remove_leftovers(out)  # a killed run's NAME.tmpPID files, staging folders
    staging = Staging(out, earlier) if main and task.config.overwrite and earlier else None
    config = task.config
    if staging is not None:
        config = dataclasses.replace(config, out_dir=str(staging.folder), overwrite=False)
        staging.begin()
        print(f"{out} holds a run: this run writes into {staging.folder} and replaces it once "
              "finished")  # fmt: skip
    # No usage_errors() from here on: what the loop finds wrong with the input (--resume, the
    # batch sizes, the out_dir) it raises as a UsageError itself; a ValueError is a bug.
    groups = (task.model_options, task.options, task.config, task.lora)  # for run.json
    options = {k: v for group in groups if group is not None for k, v in asdict(group).items()}
    trainer = None
    try:
        trainer = Trainer(
            model, parts.train_set, parts.val_set, task.loss, config,
            collate_fn=parts.collate_fn, metrics_fn=parts.metrics_fn,
            sample_fn=parts.sample_fn, run_info=task.run_info(), options=options,
        )  # fmt: skip
        trainer.checkpoint_on_stop = staging is None  # a stopped staged run is discarded
        final = trainer.fit()
        if main:  # rank 0 alone evaluates and writes; the process group is gone by now
            with reports_disk_full(Path(config.out_dir)):  # a file the task writes itself
                task.finish(model, parts, Path(config.out_dir), final)
    except BaseException as exc:
        if staging is None:
            raise
        staging.discard()
        if isinstance(exc, StopRequested):
            step = f" at step {trainer.step}" if trainer is not None else ""
            raise StopRequested(exc.signum, f"stopped{step}; the earlier run in {out} stays "
                                "as it was") from None  # fmt: skip
        raise
    if staging is not None:
        removed = staging.commit()
        if removed:
            print(f"removed the earlier run's {', '.join(removed)} from {out} (this run wrote "
                  "none)")  # fmt: skip
