"""`fastgpt pretrain`: train a GPT model on plain text (next-token prediction).

fastgpt pretrain --model tiny --max-steps 300 --out runs/verdict    # the book's short story
fastgpt pretrain --data corpus/ --model gpt2-small --out runs/gpt2 --batch-size 16 --grad-accum 4
fastgpt pretrain --init gpt2 --data my-notes.txt --lr 1e-4 --out runs/notes   # continue GPT-2
torchrun --nproc_per_node 8 -m fastgpt pretrain --data corpus/ ...      # one process per GPU
fastgpt pretrain --out runs/gpt2 --resume --max-steps 20000             # continue a stopped run

Steps: tokenize --data (a file or a folder of .txt; default the-verdict.txt) once into a cached
uint16 file, cut it into windows of --context-length tokens every --stride tokens, split off the
last --val-fraction as validation, build the model (--init weights or a fresh --model), train
with the shared engine (fastgpt.engine), and save the model (config.json + model.safetensors,
loadable by `fastgpt generate --model DIR`) in --out beside metrics.jsonl, loss.png and
checkpoint.pt.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from fastgpt.cli import command_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastgpt.engine import add_training_arguments

    add_training_arguments(parser)
    for action in parser._actions:
        if action.dest == "data":
            action.help = (
                "text to train on: a file, a folder (every .txt below it) or a quoted glob "
                "pattern; files are joined with <|endoftext|> (default: the book's "
                "the-verdict.txt, downloaded once)"
            )
    # The book's chapter 5 optimizer settings (AdamW, lr 4e-4, weight decay 0.1).
    parser.set_defaults(lr=4e-4, batch_size=8)
    group = parser.add_argument_group("pretraining data")
    group.add_argument(
        "--context-length",
        type=int,
        default=256,
        help="tokens per training window; a fresh model gets this context length (default "
        "%(default)s, the book's pretraining setting)",
    )
    group.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between the starts of consecutive windows (default: --context-length, "
        "no overlap)",
    )
    group.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of the tokens (the end of the text) held out for validation; 0 = none "
        "(default %(default)s)",
    )
    group.add_argument(
        "--token-cache",
        metavar="DIR",
        default=None,
        help="where tokenized data is cached (default: $FASTGPT_CACHE_DIR/tokens, "
        "~/.cache/fastgpt/tokens)",
    )
    group.add_argument(
        "--sample-prompt",
        default="Every effort moves you",
        help="prompt of the greedy sample printed at each evaluation ('' = none; default "
        "%(default)r)",
    )
    group.add_argument(
        "--sample-tokens",
        type=int,
        default=30,
        help="tokens generated for that sample (default %(default)s)",
    )


def _check_args(args: argparse.Namespace) -> None:
    if args.context_length < 1:
        raise ValueError(f"--context-length must be >= 1, got {args.context_length}")
    if args.stride is not None and args.stride < 1:
        raise ValueError(f"--stride must be >= 1, got {args.stride}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.sample_tokens < 0:
        raise ValueError(f"--sample-tokens must be >= 0, got {args.sample_tokens}")


def run(args: argparse.Namespace) -> int:
    from fastgpt.engine import (
        NonFiniteLossError,
        Trainer,
        build_model_from_args,
        is_main_process,
        next_token_loss,
        train_config_from_args,
    )
    from fastgpt.model import check_language_model
    from fastgpt.text_data import load_text_datasets

    fail = functools.partial(command_error, "pretrain")

    # Data first: a bad file fails before any weights are built, loaded or downloaded.
    try:
        _check_args(args)
        config = train_config_from_args(args)
        train_set, val_set = load_text_datasets(
            args.data,
            args.context_length,
            args.stride,
            args.val_fraction,
            cache_dir=args.token_cache,
            progress=is_main_process() and not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as exc:
        return fail(exc)
    if is_main_process():
        print(
            f"data: {len(train_set)} training and {len(val_set) if val_set else 0} validation "
            f"windows of {args.context_length} tokens"
        )

    try:
        model = build_model_from_args(args)
        check_language_model(model, args.init or args.model)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        return fail(exc)
    if args.context_length > model.config.context_length:
        return fail(
            f"--context-length {args.context_length} is longer than the model's context "
            f"length {model.config.context_length}"
        )
    # Check every token id once here, so the model need not range-check each batch (on CUDA
    # that check costs a device-to-host sync per forward).
    largest = max(int(d.token_ids.max()) for d in (train_set, val_set) if d is not None)
    if largest >= model.config.vocab_size:
        return fail(
            f"the data holds token id {largest}, but the model's vocab_size is "
            f"{model.config.vocab_size} (GPT-2 BPE needs 50257)"
        )
    model.check_inputs = False

    sample_fn = None
    if args.sample_prompt and args.sample_tokens > 0:
        sample_fn = _make_sample_fn(args.sample_prompt, args.sample_tokens)

    try:
        trainer = Trainer(model, train_set, val_set, next_token_loss, config, sample_fn=sample_fn)
        final = trainer.fit()
    except (ValueError, FileNotFoundError) as exc:
        return fail(exc)
    except NonFiniteLossError as exc:
        return fail(exc, code=1)

    if is_main_process():
        out = Path(config.out_dir)
        model.save_pretrained(out)
        summary = f"done: {final['step']} steps, {final['tokens_seen']:,} tokens"
        if final.get("val_loss") is not None:
            summary += f", validation loss {final['val_loss']:.4f}"
        print(f"{summary}; model saved to {out}")
    return 0


def _make_sample_fn(prompt: str, max_new_tokens: int):
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
