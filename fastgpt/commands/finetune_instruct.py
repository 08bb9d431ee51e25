"""`fastgpt finetune-instruct`: fine-tune GPT-2 to follow Alpaca-style instructions.

fastgpt finetune-instruct --init gpt2-medium --out runs/instruct            # the book's ch. 7
fastgpt finetune-instruct --init gpt2 --out runs/instruct --mask-prompt --lora-rank 16
fastgpt generate --model runs/instruct --prompt "Below is an instruction ..."

Steps: read and validate the JSON records (before any weights are touched), split them in file
order 85% train / 10% test / 5% validation, build the model (--init weights or a fresh
--model; adapters an --init folder holds unmerged are folded in), optionally add LoRA
adapters, train with the shared training engine, report the validation loss and perplexity,
save the model and metrics.json in --out, then write the test split with each
"model_response" (greedy) to test_responses.json. Under torchrun every rank trains and rank 0
alone evaluates, generates and writes.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
from pathlib import Path

from fastgpt.cli import command_error

fail = functools.partial(command_error, "finetune-instruct")

RESPONSES_FILE = "test_responses.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastgpt.engine import add_training_arguments
    from fastgpt.lora import add_lora_arguments

    add_training_arguments(parser, default_epochs=2)
    # The book's chapter 7 settings (2 epochs, batch 8, AdamW lr 5e-5, weight decay 0.1).
    parser.set_defaults(batch_size=8, lr=5e-5)
    group = parser.add_argument_group("instruction fine-tuning")
    group.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate training sequences to this many tokens (default: the model's context "
        "length); records whose prompt alone is longer are dropped with a warning",
    )
    group.add_argument(
        "--mask-prompt",
        action="store_true",
        help="learn only the response tokens (prompt targets are ignored)",
    )
    group.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="longest generated response for the test split (default 256)",
    )
    group.add_argument(
        "--num-responses",
        type=int,
        default=None,
        help="generate responses for only the first N test records (default: all)",
    )
    add_lora_arguments(parser)


def prepare_data(args: argparse.Namespace):
    """Read, validate and split the records: (train, test, validation) lists.
    Raises ValueError / FileNotFoundError; touches no weights and writes nothing."""
    from fastgpt.download import data_file
    from fastgpt.instruction import load_instruction_data, split_instruction_data

    path = data_file(args.data, "instruction-data.json")
    return split_instruction_data(load_instruction_data(path))


def run(args: argparse.Namespace) -> int:
    from fastgpt.engine import is_main_process, train_config_from_args
    from fastgpt.lora import check_lora_arguments

    try:
        check_lora_arguments(args)
        for flag in ("max_length", "max_new_tokens"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
        if args.num_responses is not None and args.num_responses < 0:
            raise ValueError(f"--num-responses must be >= 0, got {args.num_responses}")
        config = train_config_from_args(args)
        train, test, val = prepare_data(args)
    except (ValueError, FileNotFoundError) as exc:
        return fail(exc)
    if is_main_process():
        print(f"data: {len(train)} train, {len(test)} test, {len(val)} validation records")
    return _train(args, config, train, test, val)


def _train(args, config, train_records, test_records, val_records) -> int:
    import torch

    from fastgpt.engine import (
        NonFiniteLossError,
        Trainer,
        build_model_from_args,
        evaluate_loss,
        is_main_process,
    )
    from fastgpt.instruction import (
        InstructionCollate,
        InstructionDataset,
        generate_responses,
        instruction_loss,
        perplexity,
    )
    from fastgpt.lora import (
        apply_lora_from_args,
        describe_parameters,
        save_pretrained_with_lora,
    )
    from fastgpt.model import check_language_model
    from fastgpt.tokenizer import get_tokenizer

    main = is_main_process()
    tokenizer = get_tokenizer()

    def datasets(max_length: int | None) -> tuple[InstructionDataset, InstructionDataset]:
        train_set = dataset(train_records, "training", max_length)
        return train_set, dataset(val_records, "validation", max_length)

    def dataset(records, split: str, max_length: int | None) -> InstructionDataset:
        # Records dropped for their length: a plain line from rank 0, not a Python warning.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return InstructionDataset(records, tokenizer, max_length)
            finally:
                for warning in caught if main else ():
                    message = f"warning: {split} split: {warning.message}"
                    print(f"fastgpt finetune-instruct: {message}", file=sys.stderr)

    try:
        # With --max-length, records that cannot fit are found before any weights are loaded.
        train_set, val_set = datasets(args.max_length)
        model = build_model_from_args(args)
        check_language_model(model, args.init or args.model)
        context = model.config.context_length
        if args.max_length is not None and args.max_length > context:
            raise ValueError(f"--max-length {args.max_length} > the model's context {context}")
        max_length = args.max_length or context
        if max(train_set.longest_prompt, val_set.longest_prompt) > max_length:
            train_set, val_set = datasets(max_length)  # drop prompts longer than the context
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        return fail(exc)

    apply_lora_from_args(model, args)
    if main:
        print(describe_parameters(model))

    collate = InstructionCollate(max_length=max_length, mask_prompt=args.mask_prompt)
    sample_record = val_records[0]

    def sample_fn(m) -> str:
        return generate_responses(m, [sample_record], tokenizer, 35, progress=False)[0][
            "model_response"
        ]

    try:
        trainer = Trainer(
            model,
            train_set,
            val_set,
            instruction_loss,
            config,
            collate_fn=collate,
            sample_fn=sample_fn,
        )
        trainer.fit()
    except (ValueError, FileNotFoundError) as exc:
        return fail(exc)
    except NonFiniteLossError as exc:
        return fail(exc, code=1)
    if not main:  # rank 0 alone evaluates, generates and writes; the process group is gone
        return 0

    loader = torch.utils.data.DataLoader(val_set, batch_size=config.batch_size, collate_fn=collate)
    val_loss = float(evaluate_loss(model, loader, instruction_loss, None))
    print(f"validation loss {val_loss:.4f}  perplexity {perplexity(val_loss):.2f}")

    # The model and metrics first: generating the responses takes long and must not put the
    # trained model at risk.
    out = Path(config.out_dir)
    save_pretrained_with_lora(model, out, merge=args.merge)
    metrics = {"validation_loss": val_loss, "validation_perplexity": perplexity(val_loss)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(f"saved the model to {out}")

    records = test_records[: args.num_responses] if args.num_responses is not None else test_records
    responses = generate_responses(
        model, records, tokenizer, args.max_new_tokens, progress=not args.no_progress
    )
    path = out / RESPONSES_FILE
    path.write_text(json.dumps(responses, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(responses)} test responses to {path}")
    return 0
