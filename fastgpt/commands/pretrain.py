"""`fastgpt pretrain`: train a GPT model on plain text (next-token prediction).

fastgpt pretrain --model tiny --max-steps 300 --out runs/verdict    # the book's short story
fastgpt pretrain --data corpus/ --model gpt2-small --out runs/gpt2 --batch-size 16 --grad-accum 4
fastgpt pretrain --init gpt2 --data my-notes.txt --lr 1e-4 --out runs/notes   # continue GPT-2
torchrun --nproc_per_node 8 -m fastgpt pretrain --data corpus/ ...      # one process per GPU
fastgpt pretrain --out runs/gpt2 --resume --max-steps 20000             # continue a stopped run
fastgpt pretrain --data corpus/ --document-mask ...     # attention stays within each document

Steps: tokenize --data (files or folders of .txt/.jsonl/.parquet; default the-verdict.txt) once
into cached uint16 shards (fastgpt.corpus; a folder from `fastgpt prepare-data` is used as it
is), cut them into windows of --context-length tokens every --stride tokens, split off the last
--val-fraction as validation (a prepared folder has its own split), build the model (--init
weights or a fresh --model), train with the shared runner (fastgpt.train), and save the model
(config.json + model.safetensors, loadable by `fastgpt generate --model DIR`) in --out beside
metrics.jsonl, loss.png and checkpoint.pt.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastgpt.errors import UsageError, require
from fastgpt.train.distributed import is_main_process
from fastgpt.train.runner import Task, TrainingParts, add_task_arguments, check_vocabulary, run_task

if TYPE_CHECKING:
    from fastgpt.text_data import SlidingWindowDataset


@dataclass
class PretrainOptions:
    """What to pretrain on."""

    data: str | None = field(default=None, metadata={"metavar": "PATH"})
    """Text to train on: a folder written by fastgpt prepare-data (its shards and validation
    split as they are), or files to tokenize first: a .txt, .jsonl or .parquet file, a folder of
    them or a quoted glob pattern; documents are joined with <|endoftext|> (default: the book's
    the-verdict.txt, downloaded once)."""
    context_length: int = 256
    """Tokens per training window; a fresh model gets this context length (the book's
    pretraining setting)."""
    stride: int | None = None
    """Tokens between the starts of consecutive windows (default: context_length, no
    overlap)."""
    val_fraction: float = 0.1
    """Share of the tokens (the end of the text) held out for validation; 0 = none (a folder
    from prepare-data has its own split)."""
    token_cache: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Where tokenized data is cached (default: $FASTGPT_CACHE_DIR/tokens,
    ~/.cache/fastgpt/tokens)."""
    text_field: str = "text"
    """The field of each .jsonl line, or the column of a .parquet file, that holds the text."""
    tokenize_workers: int | None = field(default=None, metadata={"metavar": "N"})
    """Processes that tokenize data not yet in the token cache (default: the machine's
    cores); under torchrun one rank per node tokenizes while the others wait."""
    sample_prompt: str = "Every effort moves you"
    """Prompt of the greedy sample printed at each evaluation ('' = none)."""
    sample_tokens: int = 30
    """Tokens generated for that sample."""
    document_mask: bool = False
    """Each document of a window attends only within itself and its positions restart at 0:
    a document starts at each <|endoftext|> (its first token, as in GPT-2's data; the token
    before it still predicts it)."""

    def __post_init__(self) -> None:
        require(self, "context_length", self.context_length >= 1, ">= 1")
        require(self, "stride", self.stride is None or self.stride >= 1, ">= 1")
        require(self, "val_fraction", 0.0 <= self.val_fraction < 1.0, "in [0, 1)")
        require(self, "sample_tokens", self.sample_tokens >= 0, ">= 0")
        workers = self.tokenize_workers
        require(self, "tokenize_workers", workers is None or workers >= 1, ">= 1")


@dataclass
class TextWindows:
    """What `PretrainTask.load_data` read: windows of `context_length` tokens."""

    train: SlidingWindowDataset
    val: SlidingWindowDataset | None
    context_length: int


# AdamW, lr 4e-4, weight decay 0.1 as the book's chapter 5 (which trains 10 epochs of batch 2).
class PretrainTask(Task, name="pretrain", options=PretrainOptions, defaults={"epochs": 1}):
    """The book's chapter 5: next-token prediction on plain text."""

    def load_data(self) -> TextWindows:
        from fastgpt.text_data import load_text_datasets

        if self.options.document_mask and self.model_options.compile:
            # the runs' cu_seqlens have a data-dependent length: no full graph
            raise UsageError("--document-mask does not work with --compile")
        opts, main = self.options, is_main_process()
        context = self._context_length()
        train, val = load_text_datasets(
            opts.data,
            context,
            opts.stride,
            opts.val_fraction,
            cache_dir=opts.token_cache,
            progress=main and self.config.progress,
            text_field=opts.text_field,
            workers=opts.tokenize_workers,
        )
        if main:
            n_val = len(val) if val else 0
            print(f"data: {len(train)} training and {n_val} validation windows of {context} tokens")
        return TextWindows(train, val, context)

    def _context_length(self) -> int:
        """--context-length; unless it is given, a fresh model's config.json's own."""
        from fastgpt.model_config import GPTConfig

        spec = self.model_options.model
        user_config = spec is not None and Path(spec).expanduser().exists()  # not a preset
        if "context_length" not in self.explicit and user_config and not self.model_options.init:
            return GPTConfig.from_spec(spec).context_length
        return self.options.context_length

    def model_overrides(self, data: TextWindows) -> dict[str, Any]:
        return {"context_length": data.context_length}

    def build(self, model, data: TextWindows) -> TrainingParts:
        from fastgpt.model import check_language_model

        check_language_model(model, self.model_options.init or self.model_options.model)
        context = data.context_length
        if context > model.config.context_length:
            raise UsageError(
                f"--context-length {context} is longer than the model's context length "
                f"{model.config.context_length}"
            )
        # Check every token id once here, so the model need not range-check each batch (on
        # CUDA that check costs a device-to-host sync per forward).
        sets = [d for d in (data.train, data.val) if d is not None]
        check_vocabulary(model, max(int(d.token_ids.max()) for d in sets))
        model.check_inputs = False
        sample_fn = None
        if self.options.sample_prompt and self.options.sample_tokens > 0:
            sample_fn = greedy_sample_fn(self.options.sample_prompt, self.options.sample_tokens)
        return TrainingParts(data.train, data.val, sample_fn=sample_fn)

    def run_info(self) -> dict[str, Any]:
        info = super().run_info()
        return {**info, "document_mask": True} if self.options.document_mask else info

    def loss(self, model, batch):
        from fastgpt.losses import next_token_loss
        from fastgpt.tokenizer import EOT_ID

        if self.options.document_mask:
            return next_token_loss(model, batch, document_start_id=EOT_ID)
        return next_token_loss(model, batch)

    def finish(self, model, parts: TrainingParts, out_dir: Path, final: dict[str, Any]) -> None:
        model.save_pretrained(out_dir)
        summary = f"done: {final['step']} steps, {final['tokens_seen']:,} tokens"
        if final.get("val_loss") is not None:
            summary += f", validation loss {final['val_loss']:.4f}"
        print(f"{summary}; model saved to {out_dir}")


def greedy_sample_fn(prompt: str, max_new_tokens: int):
    """sample_fn for the Trainer: the greedy continuation of `prompt` as text."""
    import torch

    from fastgpt.generation import generate
    from fastgpt.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    prompt_ids = tokenizer.encode(prompt, allowed_special={"<|endoftext|>"})

    def sample_fn(model) -> str:
        device = next(model.parameters()).device
        ids = prompt_ids[-model.config.context_length :]
        ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
        out = generate(model, ids, max_new_tokens, temperature=0.0)  # (1, T + new)
        return tokenizer.decode(out[0, ids.shape[1] :].tolist())

    return sample_fn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_task_arguments(parser, PretrainTask)


def run(args: argparse.Namespace) -> int:
    return run_task(PretrainTask, args)
