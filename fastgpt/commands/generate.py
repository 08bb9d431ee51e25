"""`fastgpt generate`: continue a prompt with a GPT-2 model, printing text as it is produced.

fastgpt generate --model gpt2 --prompt "Every effort moves you" --max-new-tokens 50
fastgpt generate --model runs/pretrain --prompt "..." --temperature 0.8 --top-k 50
"""

from __future__ import annotations

import argparse
import codecs
import functools
import sys

import torch

from fastgpt.cli import command_error


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
    add_device_arguments(parser)
    parser.add_argument(
        "--no-cache", action="store_true", help="rerun the whole sequence at each step"
    )
    parser.add_argument(
        "--stop-at-eos", action="store_true", help="stop at <|endoftext|> (token 50256)"
    )


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--backend and --device, for the commands that run a saved model (generate, classify)."""
    parser.add_argument(
        "--backend", choices=("auto", "triton", "torch"), default="auto", help="kernels to use"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="weights and activations (default auto: bf16 on a GPU that supports it, else fp32)",
    )


def device_from_args(args: argparse.Namespace) -> torch.device:
    """--device, or CUDA when available, else CPU. ValueError for an unknown or absent device."""
    from fastgpt.engine import resolve_device

    return resolve_device(args.device)


def dtype_from_args(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """--dtype; auto is bf16 on CUDA (half the memory traffic of fp32 per decoded token) when
    the GPU supports it, fp32 otherwise (CPU bf16 matmuls are slow)."""
    named = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if args.dtype != "auto":
        return named[args.dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def run(args: argparse.Namespace) -> int:
    from fastgpt.generation import check_generation_options, generate
    from fastgpt.model import GPTModel, check_language_model
    from fastgpt.tokenizer import EOT_ID, get_tokenizer, text_to_token_ids

    fail = functools.partial(command_error, "generate")
    if not args.prompt:
        return fail("the prompt is empty")
    try:
        check_generation_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        device = device_from_args(args)
    except ValueError as exc:
        return fail(exc)
    try:
        dtype = dtype_from_args(args, device)
        model = GPTModel.from_pretrained(
            args.model, backend=args.backend, device=device, dtype=dtype
        )
        check_language_model(model, args.model)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        return fail(f"cannot load {args.model!r}: {exc}")
    tokenizer = get_tokenizer()
    prompt = text_to_token_ids(args.prompt, tokenizer).to(device)  # (1, T)
    if prompt.shape[1] > model.config.context_length:
        prompt = prompt[:, -model.config.context_length :]  # keep the end of a long prompt
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
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    sys.stdout.flush()
    return 0
