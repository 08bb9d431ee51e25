"""`fastgpt generate`: continue a prompt with a GPT-2 model, printing text as it is produced.

fastgpt generate --model gpt2 --prompt "Every effort moves you" --max-new-tokens 50
fastgpt generate --model runs/pretrain --prompt "..." --temperature 0.8 --top-k 50
fastgpt generate --model gpt2 --prompt "One" --prompt "Two" --compile     # one batch
fastgpt generate --model gpt2 --prompts-file prompts.txt                  # a prompt a line

One prompt streams its text as it is produced; several are generated in one batch (prompts of
different lengths together, see `fastgpt.generation`) and each completion is printed after,
labelled `[i]`.
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
    parser.add_argument(
        "--prompt", action="append", default=[], help="text to continue (repeat for a batch)"
    )
    parser.add_argument(
        "--prompts-file", default=None, help="a file of prompts, one a line (blank lines skipped)"
    )
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
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoding step (CUDA graphs on CUDA); pays a compile first",
    )


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """The --prompt texts, then the --prompts-file lines; UsageError when there are none or one
    is empty."""
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as exc:
            raise UsageError(f"cannot read --prompts-file {args.prompts_file!r}: {exc}") from exc
    if not prompts:
        raise UsageError("give a prompt: --prompt TEXT or --prompts-file FILE")
    if any(not p for p in prompts):
        raise UsageError("the prompt is empty")
    return prompts


def _fit_context(ids: torch.Tensor, context: int, label: str) -> torch.Tensor:
    """The last `context` ids of a (1, T) prompt, warning on stderr when some are dropped."""
    if ids.shape[1] > context:
        dropped = ids.shape[1] - context
        print(
            f"fastgpt generate: warning: the prompt{label} has {ids.shape[1]} tokens, more than "
            f"the model's context of {context}: its first {dropped} tokens are dropped",
            file=sys.stderr,
        )
        ids = ids[:, -context:]  # keep the end of a long prompt
    return ids


def run(args: argparse.Namespace) -> int:
    from fastgpt.generation import check_generation_options, generate
    from fastgpt.model import GPTModel, check_language_model
    from fastgpt.tokenizer import EOT_ID, get_tokenizer, text_to_token_ids

    texts = _read_prompts(args)
    check_generation_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.compile and args.no_cache:
        raise UsageError("--compile needs the KV cache (leave out --no-cache)")
    device, dtype = options_from_args(InferenceOptions, args).resolve()
    try:
        model = GPTModel.from_pretrained(
            args.model, backend=args.backend, device=device, dtype=dtype
        )
        check_language_model(model, args.model)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot load {args.model!r}: {exc}") from exc
    tokenizer = get_tokenizer()
    context = model.config.context_length
    many = len(texts) > 1
    prompts = [
        _fit_context(text_to_token_ids(t, tokenizer), context, f" [{i}]" if many else "")
        for i, t in enumerate(texts, 1)
    ]
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    options = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=EOT_ID if args.stop_at_eos else None,
        use_cache=not args.no_cache,
        generator=generator,
        compile=args.compile,
    )
    if many:
        rows = generate(model, [p[0].to(device) for p in prompts], args.max_new_tokens, **options)
        for i, (text, prompt, row) in enumerate(zip(texts, prompts, rows, strict=True), 1):
            new = [
                t for t in row[prompt.shape[1] :].tolist() if t != EOT_ID or not args.stop_at_eos
            ]
            sys.stdout.write(f"[{i}] {text}{tokenizer.decode(new)}\n")
        sys.stdout.flush()
        return 0
    return _stream_one(model, texts[0], prompts[0].to(device), args, tokenizer, options)


def _stream_one(model, text, prompt, args, tokenizer, options) -> int:
    """Generate from one (1, T) prompt, printing text as it is produced."""
    from fastgpt.generation import generate
    from fastgpt.tokenizer import EOT_ID

    # Tokens can end in the middle of a UTF-8 character: decode bytes incrementally and print
    # only complete characters.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def print_token(step: torch.Tensor) -> None:  # (1, 1)
        token = int(step[0, 0])
        if token != EOT_ID or not args.stop_at_eos:
            sys.stdout.write(decoder.decode(tokenizer.decode_single_token_bytes(token)))
            sys.stdout.flush()

    sys.stdout.write(text)
    sys.stdout.flush()
    try:
        generate(model, prompt, args.max_new_tokens, on_step=print_token, **options)
    finally:  # also on Ctrl-C: end the text's line, so "interrupted" is not glued to it
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        sys.stdout.flush()
    return 0
