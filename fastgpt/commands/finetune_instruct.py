"""`fastgpt finetune-instruct`: fine-tune GPT-2 to follow Alpaca-style instructions.

fastgpt finetune-instruct --init gpt2-medium --out runs/instruct            # the book's ch. 7
fastgpt finetune-instruct --init gpt2 --out runs/instruct --mask-prompt --lora-rank 16
fastgpt finetune-instruct --init gpt2 --out runs/instruct --pack --batch-size 2  # no padding
fastgpt generate --model runs/instruct --prompt "Below is an instruction ..."

Steps: read and validate the JSON records (before any weights are touched), split them in file
order 85% train / 10% test / 5% validation, build the model (--init weights or a fresh
--model; adapters an --init folder holds unmerged are folded in), optionally add LoRA
adapters, train with the shared runner, report the validation loss and perplexity, save the
model and metrics.json in --out, then write the test split with each "model_response" (greedy)
to test_responses.json. Under torchrun every rank trains and rank 0 alone evaluates, generates
and writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastgpt.download import data_file
from fastgpt.errors import ConfigError, UsageError
from fastgpt.response_scoring import JudgeOptions
from fastgpt.train.distributed import is_main_process
from fastgpt.train.runner import Task, TrainingParts, add_task_arguments, check_vocabulary, run_task

if TYPE_CHECKING:
    from fastgpt.classification import Splits
    from fastgpt.instruction import InstructionDataset

RESPONSES_FILE = "test_responses.json"


@dataclass
class InstructOptions:
    """What to fine-tune on and what to generate afterwards."""

    data: str | None = field(default=None, metadata={"metavar": "FILE"})
    """A JSON list of {"instruction", "input", "output"} records (default: the book's
    instruction-data.json, downloaded once)."""
    max_length: int | None = None
    """Truncate training sequences to this many tokens (default: the model's context length);
    records whose prompt alone is longer are dropped with a warning."""
    mask_prompt: bool = False
    """Learn only the response tokens (prompt targets are ignored)."""
    pack: bool = False
    """Pack the examples, in data order, into rows of up to --max-length tokens instead of
    padding each to its batch's longest: each example attends only to itself, its positions
    restart at 0 and it keeps exactly its padded targets; --batch-size then counts rows."""
    max_new_tokens: int = 256
    """Longest generated response for the test split."""
    num_responses: int | None = None
    """Generate responses for only the first N test records (default: all)."""

    def __post_init__(self) -> None:
        for name in ("max_length", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be >= 1, got {value}")
        if self.num_responses is not None and self.num_responses < 0:
            raise ConfigError("num_responses", f"must be >= 0, got {self.num_responses}")


@dataclass
class InstructJudgeOptions(JudgeOptions, InstructOptions):
    """InstructOptions followed by `fastgpt evaluate`'s judge options (declared once, in
    `fastgpt.response_scoring.JudgeOptions`): given --judge-url, the test responses are scored after
    training, into test_responses.scores.jsonl beside them."""

    def __post_init__(self) -> None:
        InstructOptions.__post_init__(self)
        JudgeOptions.__post_init__(self)
        if self.judge_url is not None:
            self.judge()  # e.g. --api openai without --judge-model: before training, not after
            return
        for option in fields(JudgeOptions):  # a judge option without a judge does nothing
            if getattr(self, option.name) != option.default:
                raise ConfigError(
                    option.name, "applies with {judge_url} only (the judge server to score with)"
                )


@dataclass
class InstructData:
    """What `InstructTask.load_data` read: the records, split, and the training and validation
    records tokenized (those longer than --max-length dropped)."""

    records: Splits
    train_set: InstructionDataset
    val_set: InstructionDataset


@dataclass(kw_only=True)
class InstructParts(TrainingParts):
    """InstructTask's TrainingParts, with the test records `finish` generates responses for."""

    test_records: list[dict[str, str]]


# The book's chapter 7 settings: 2 epochs, batch 8, AdamW lr 5e-5, weight decay 0.1, no dropout.
class InstructTask(
    Task, name="finetune-instruct", options=InstructJudgeOptions, uses_lora=True,
    defaults={"epochs": 2, "lr": 5e-5, "dropout": 0.0},
):  # fmt: skip
    """The book's chapter 7: GPT-2 fine-tuned on instruction/response records."""

    def load_data(self) -> InstructData:
        """Read, validate and split the records; with --max-length, records that cannot fit
        are found here, before any weights are loaded."""
        from fastgpt.instruction import load_instruction_data, split_instruction_data

        if self.options.pack and self.model_options.compile:
            # the runs' cu_seqlens have a data-dependent length: no full graph
            raise UsageError("--pack does not work with --compile")
        path = data_file(self.options.data, "instruction-data.json")
        records = split_instruction_data(load_instruction_data(path))
        if is_main_process():
            print(
                f"data: {len(records.train)} train, {len(records.test)} test, "
                f"{len(records.val)} validation records"
            )
        return InstructData(records, *_datasets(records, self.options.max_length))

    def build(self, model, data: InstructData) -> InstructParts:
        from fastgpt.instruction import InstructionCollate, generate_responses
        from fastgpt.model import check_language_model
        from fastgpt.tokenizer import EOT_ID, get_tokenizer

        check_language_model(model, self.model_options.init or self.model_options.model)
        context, max_length = model.config.context_length, self.options.max_length
        if max_length is not None and max_length > context:
            raise UsageError(f"--max-length {max_length} > the model's context {context}")
        check_vocabulary(model, EOT_ID)  # GPT-2 BPE ids, and <|endoftext|> ends each example
        model.check_inputs = False  # checked once here: no range-check sync per batch
        max_length = max_length or context
        train_set, val_set = data.train_set, data.val_set
        if max(train_set.longest_prompt, val_set.longest_prompt) > max_length:
            train_set, val_set = _datasets(data.records, max_length)  # drop prompts too long
        self.lora.apply(model)
        mask_prompt = self.options.mask_prompt
        collate_fn = InstructionCollate(max_length=max_length, mask_prompt=mask_prompt)
        if self.options.pack:
            train_set, val_set, collate_fn = _packed(train_set, val_set, max_length, mask_prompt)
        sample_record, tokenizer = data.records.val[0], get_tokenizer()

        def sample_fn(m) -> str:
            responses = generate_responses(m, [sample_record], tokenizer, 35, progress=False)
            return responses[0]["model_response"]

        return InstructParts(
            train_set, val_set, collate_fn, sample_fn=sample_fn, test_records=data.records.test
        )

    def run_info(self) -> dict[str, Any]:
        info = super().run_info()
        return {**info, "pack": True} if self.options.pack else info  # rows, not examples

    def loss(self, model, batch):
        from fastgpt.instruction import instruction_loss

        return instruction_loss(model, batch)

    def finish(self, model, parts: InstructParts, out_dir: Path, final: dict[str, Any]) -> None:
        import torch

        from fastgpt.instruction import generate_responses, perplexity
        from fastgpt.lora import save_pretrained_with_lora
        from fastgpt.tokenizer import get_tokenizer
        from fastgpt.train import evaluate_loss

        loader = torch.utils.data.DataLoader(
            parts.val_set, batch_size=self.config.batch_size, collate_fn=parts.collate_fn
        )
        val_loss = float(evaluate_loss(model, loader, self.loss, None))
        print(f"validation loss {val_loss:.4f}  perplexity {perplexity(val_loss):.2f}")
        # The model and metrics first: generating the responses takes long and must not put
        # the trained model at risk.
        save_pretrained_with_lora(
            model, out_dir, merge=self.lora.merge, base_model=self.model_options.init
        )
        metrics = {"validation_loss": val_loss, "validation_perplexity": perplexity(val_loss)}
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", "utf-8")
        print(f"saved the model to {out_dir}")
        count = self.options.num_responses
        records = parts.test_records
        records = records[:count] if count is not None else records
        print(
            f"generating {len(records)} test responses of up to {self.options.max_new_tokens} "
            "tokens each (--num-responses N limits them)",
            flush=True,
        )
        responses = generate_responses(
            model, records, get_tokenizer(), self.options.max_new_tokens,
            progress=self.config.progress,
        )  # fmt: skip
        path = out_dir / RESPONSES_FILE
        path.write_text(json.dumps(responses, indent=2, ensure_ascii=False) + "\n", "utf-8")
        print(f"wrote {len(responses)} test responses to {path}")
        if self.options.judge_url:
            self._score(path)

    def _score(self, path: Path) -> None:
        """The book's model-graded evaluation of the written responses (fastgpt evaluate)."""
        from fastgpt.response_scoring import JudgeError, evaluate_responses

        try:
            judge = self.options.judge()  # the API key is read from the environment now
            summary = evaluate_responses(path, judge, progress=self.config.progress)
        except JudgeError as exc:
            raise UsageError(
                f"{exc} (the model and {path.name} are saved: score them later with "
                f"`fastgpt evaluate {path}`)"
            ) from exc
        print(summary.line())


def _datasets(
    records: Splits, max_length: int | None
) -> tuple[InstructionDataset, InstructionDataset]:
    """The training and validation InstructionDatasets of `records` (records whose prompt is
    longer than max_length dropped)."""
    return (
        _dataset(records.train, "training", max_length),
        _dataset(records.val, "validation", max_length),
    )


def _dataset(records, split: str, max_length: int | None) -> InstructionDataset:
    from fastgpt.instruction import InstructionDataset
    from fastgpt.tokenizer import get_tokenizer

    # Records dropped for their length: a plain line from rank 0, not a Python warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return InstructionDataset(records, get_tokenizer(), max_length)
        finally:
            for warning in caught if is_main_process() else ():
                message = f"warning: {split} split: {warning.message}"
                print(f"fastgpt finetune-instruct: {message}", file=sys.stderr)


def _packed(train_set, val_set, row_length: int, mask_prompt: bool):
    """Both splits as packed rows of up to row_length tokens (`PackedInstructionDataset`), and
    their collate function."""
    from fastgpt.instruction import PackedInstructionCollate, PackedInstructionDataset

    packed_train = PackedInstructionDataset(train_set, row_length)
    packed_val = PackedInstructionDataset(val_set, row_length)
    if is_main_process():
        print(f"packed: {len(train_set)} training examples into {len(packed_train)} rows of up "
              f"to {row_length} tokens")  # fmt: skip
    return packed_train, packed_val, PackedInstructionCollate(row_length, mask_prompt)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_task_arguments(parser, InstructTask)


def run(args: argparse.Namespace) -> int:
    return run_task(InstructTask, args)
