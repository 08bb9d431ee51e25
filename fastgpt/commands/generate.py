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
from dataclasses import dataclass, field

import torch

from fastgpt.devices import InferenceOptions
from fastgpt.errors import UsageError
from fastgpt.options import add_options, options_from_args


@dataclass
class GenerateOptions:
    """What `fastgpt generate` generates, from which prompts (how the model runs is
    InferenceOptions)."""

    model: str
    """Checkpoint folder (ours or Hugging Face GPT-2) or a hub name: gpt2, gpt2-medium,
    gpt2-large, gpt2-xl."""
    prompt: list[str] = field(default_factory=list)
    """Text to continue (repeat for a batch)."""
    prompts_file: str | None = None
    """A file of prompts, one a line (blank lines skipped)."""
    max_new_tokens: int = 50
    """Tokens to generate."""
    temperature: float = 0.0
    """0 is greedy; higher is more random."""
    top_k: int | None = None
    """Sample from the k likeliest."""
    top_p: float | None = None
    """Sample from the smallest set with mass p."""
    seed: int | None = None
    """Random seed for sampling."""
    cache: bool = True
    """Keep a KV cache; without it the whole sequence reruns at each step."""
    stop_at_eos: bool = False
    """Stop at <|endoftext|> (token 50256)."""
    compile: bool = False
    """torch.compile the decoding step (CUDA graphs on CUDA); pays a compile first."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, GenerateOptions)
    add_options(parser, InferenceOptions, "how the model runs")


def _read_prompts(options: GenerateOptions) -> list[str]:
    """The --prompt texts, then the --prompts-file lines; UsageError when there are none or one
    is empty."""
    prompts = list(options.prompt)
    if options.prompts_file is not None:
        try:
            with open(options.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as exc:
            raise UsageError(f"cannot read --prompts-file {options.prompts_file!r}: {exc}") from exc
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

    options = options_from_args(GenerateOptions, args)
    inference = options_from_args(InferenceOptions, args)
    texts = _read_prompts(options)
    check_generation_options(
        options.max_new_tokens, options.temperature, options.top_k, options.top_p
    )
    if options.compile and not options.cache:
        raise UsageError("--compile needs the KV cache (leave out --no-cache)")
    device, dtype = inference.resolve()
    try:
        model = GPTModel.from_pretrained(
            options.model, backend=inference.backend, device=device, dtype=dtype
        )
        check_language_model(model, options.model)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot load {options.model!r}: {exc}") from exc
    tokenizer = get_tokenizer()
    context = model.config.context_length
    many = len(texts) > 1
    prompts = [
        _fit_context(text_to_token_ids(t, tokenizer), context, f" [{i}]" if many else "")
        for i, t in enumerate(texts, 1)
    ]
    generator = None
    if options.seed is not None:
        generator = torch.Generator(device=device).manual_seed(options.seed)
    sampling = dict(
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        eos_id=EOT_ID if options.stop_at_eos else None,
        use_cache=options.cache,
        generator=generator,
        compile=options.compile,
    )
    if many:
        ids = [p[0].to(device) for p in prompts]
        rows = generate(model, ids, options.max_new_tokens, **sampling)
        for i, (text, prompt, row) in enumerate(zip(texts, prompts, rows, strict=True), 1):
            new = [
                t for t in row[prompt.shape[1] :].tolist() if t != EOT_ID or not options.stop_at_eos
            ]
            sys.stdout.write(f"[{i}] {text}{tokenizer.decode(new)}\n")
        sys.stdout.flush()
        return 0
    return _stream_one(model, texts[0], prompts[0].to(device), options, tokenizer, sampling)


def _stream_one(model, text, prompt, options: GenerateOptions, tokenizer, sampling) -> int:
    """Generate from one (1, T) prompt, printing text as it is produced."""
    from fastgpt.generation import generate
    from fastgpt.tokenizer import EOT_ID

    # Tokens can end in the middle of a UTF-8 character: decode bytes incrementally and print
    # only complete characters.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def print_token(step: torch.Tensor) -> None:  # (1, 1)
        token = int(step[0, 0])
        if token != EOT_ID or not options.stop_at_eos:
            sys.stdout.write(decoder.decode(tokenizer.decode_single_token_bytes(token)))
            sys.stdout.flush()

    sys.stdout.write(text)
    sys.stdout.flush()
    try:
        generate(model, prompt, options.max_new_tokens, on_step=print_token, **sampling)
    finally:  # also on Ctrl-C: end the text's line, so "interrupted" is not glued to it
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        sys.stdout.flush()
    return 0
