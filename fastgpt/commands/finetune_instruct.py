"""`fastgpt finetune-instruct`: fine-tune GPT-2 to follow Alpaca-style instructions.

fastgpt finetune-instruct --init gpt2-medium --out runs/instruct            # the book's ch. 7
fastgpt finetune-instruct --init gpt2 --out runs/instruct --mask-prompt --lora-rank 16
fastgpt generate --model runs/instruct --prompt "Below is an instruction ..."

Steps: read and validate the JSON records (before any weights are touched), split them in file
order 85% train / 10% test / 5% validation, build the model (--init weights or a fresh
--model), optionally add LoRA adapters, train with the shared training engine, report the
validation loss and perplexity, write the test split with each "model_response" (greedy) to
test_responses.json, and save the model in --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESPONSES_FILE = "test_responses.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastgpt.engine import add_training_arguments
    from fastgpt.lora import add_lora_arguments

    add_training_arguments(parser)
    # The book's chapter 7 settings (2 epochs, batch 8, AdamW lr 5e-5, weight decay 0.1).
    parser.set_defaults(epochs=2, batch_size=8, lr=5e-5)
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
    from fastgpt.instruction import load_instruction_data, split_instruction_data

    if args.data:
        path = Path(args.data)
    else:
        from fastgpt.download import fetch

        path = fetch("instruction-data.json")
    return split_instruction_data(load_instruction_data(path))


def run(args: argparse.Namespace) -> int:
    from fastgpt.lora import check_lora_arguments

    try:
        check_lora_arguments(args)
        for flag in ("max_length", "max_new_tokens"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
        if args.num_responses is not None and args.num_responses < 0:
            raise ValueError(f"--num-responses must be >= 0, got {args.num_responses}")
        train, test, val = prepare_data(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastgpt finetune-instruct: error: {exc}", file=sys.stderr)
        return 2
    print(f"data: {len(train)} train, {len(test)} test, {len(val)} validation records")
    return _train(args, train, test, val)


def _train(args, train_records, test_records, val_records) -> int:
    import torch

    from fastgpt.engine import Trainer, build_model_from_args, evaluate_loss, train_config_from_args
    from fastgpt.instruction import (
        InstructionCollate,
        InstructionDataset,
        generate_responses,
        instruction_loss,
        perplexity,
    )
    from fastgpt.lora import apply_lora, describe_parameters, merge_lora, save_pretrained_with_lora
    from fastgpt.tokenizer import get_tokenizer

    model = build_model_from_args(args)
    context = model.config.context_length
    max_length = min(args.max_length or context, context)
    tokenizer = get_tokenizer()
    try:
        train_set = InstructionDataset(train_records, tokenizer, max_length)
        val_set = InstructionDataset(val_records, tokenizer, max_length)
    except ValueError as exc:
        print(f"fastgpt finetune-instruct: error: {exc}", file=sys.stderr)
        return 2

    if args.lora_rank:
        alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
        apply_lora(model, args.lora_rank, alpha, include_head=args.lora_head)
    print(describe_parameters(model))

    collate = InstructionCollate(max_length=max_length, mask_prompt=args.mask_prompt)
    config = train_config_from_args(args)
    sample_record = val_records[0]

    def sample_fn(m) -> str:
        return generate_responses(m, [sample_record], tokenizer, 35, progress=False)[0][
            "model_response"
        ]

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

    loader = torch.utils.data.DataLoader(val_set, batch_size=config.batch_size, collate_fn=collate)
    val_loss = float(evaluate_loss(model, loader, instruction_loss, None))
    print(f"validation loss {val_loss:.4f}  perplexity {perplexity(val_loss):.2f}")

    out = Path(config.out_dir)
    records = test_records[: args.num_responses] if args.num_responses is not None else test_records
    responses = generate_responses(model, records, tokenizer, args.max_new_tokens)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESPONSES_FILE
    path.write_text(json.dumps(responses, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(responses)} test responses to {path}")

    if args.merge:
        merge_lora(model)
    save_pretrained_with_lora(model, out)
    metrics = {"validation_loss": val_loss, "validation_perplexity": perplexity(val_loss)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(f"saved the model to {out}")
    return 0
