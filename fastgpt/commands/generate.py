"""`fastgpt generate`: continue a prompt with a GPT-2 model, printing text as it is produced.

fastgpt generate --model gpt2 --prompt "Every effort moves you" --max-new-tokens 50
fastgpt generate --model runs/pretrain --prompt "..." --temperature 0.8 --top-k 50
"""

from __future__ import annotations

import argparse
import codecs
import sys

import torch

from fastgpt.devices import InferenceOptions
from fastgpt.errors import UsageError
from fastgpt.options import add_options, options_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="checkpoint folder (ours or Hugging Face GPT-2) or a hub name: gpt2, gpt2-medium, "
        "gpt2-large, gpt2-xl",
    )
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random"
    )
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest")
    parser.add_argument(
        "--top-p", type=float, default=None, help="sample from the smallest set with mass p"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    add_options(parser, InferenceOptions, "how the model runs")
    parser.add_argument(
        "--no-cache", action="store_true", help="rerun the whole sequence at each step"
    )
    parser.add_argument(
        "--stop-at-eos", action="store_true", help="stop at <|endoftext|> (token 50256)"
    )


def run(args: argparse.Namespace) -> int:
    from fastgpt.generation import check_generation_options, generate
    from fastgpt.model import GPTModel, check_language_model
    from fastgpt.tokenizer import EOT_ID, get_tokenizer, text_to_token_ids

    if not args.prompt:
        raise UsageError("the prompt is empty")
    check_generation_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    device, dtype = options_from_args(InferenceOptions, args).resolve()
    try:
        model = GPTModel.from_pretrained(
            args.model, backend=args.backend, device=device, dtype=dtype
        )
        check_language_model(model, args.model)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot load {args.model!r}: {exc}") from exc
    tokenizer = get_tokenizer()
    prompt = text_to_token_ids(args.prompt, tokenizer).to(device)  # (1, T)
    context = model.config.context_length
    if prompt.shape[1] > context:
        dropped = prompt.shape[1] - context
        print(
            f"fastgpt generate: warning: the prompt has {prompt.shape[1]} tokens, more than the "
            f"model's context of {context}: its first {dropped} tokens are dropped",
            file=sys.stderr,
        )
        prompt = prompt[:, -context:]  # keep the end of a long prompt
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)

    # Tokens can end in the middle of a UTF-8 character: decode bytes incrementally and print
    # only complete characters.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def print_token(step: torch.Tensor) -> None:  # (1, 1)
        token = int(step[0, 0])
        if token != EOT_ID or not args.stop_at_eos:
            sys.stdout.write(decoder.decode(tokenizer.decode_single_token_bytes(token)))
            sys.stdout.flush()

    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    try:
        generate(
            model,
            prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_id=EOT_ID if args.stop_at_eos else None,
            use_cache=not args.no_cache,
            generator=generator,
            on_step=print_token,
        )
    finally:  # also on Ctrl-C: end the text's line, so "interrupted" is not glued to it
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        sys.stdout.flush()
    return 0
