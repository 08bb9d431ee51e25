"""The `fastgpt` command. Each subcommand lives in its own module, which provides

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int | None

and is listed in SUBCOMMANDS below. Modules are imported only when their subcommand runs,
so `fastgpt --help` stays fast. A command reports bad input by raising `UsageError`
(`fastgpt.errors`): printed here as one line, exit status 2, with a `ConfigError`'s field
shown as its flag; a training run whose loss turned non-finite exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from fastgpt import __version__

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("fastgpt.commands.generate", "Generate text from a model, streaming tokens."),
    "pretrain": ("fastgpt.commands.pretrain", "Pretrain a GPT model on text files."),
    "prepare-data": (
        "fastgpt.commands.prepare_data",
        "Tokenize a corpus once, in parallel, into shards for pretrain --data.",
    ),
    "finetune-classify": (
        "fastgpt.commands.finetune_classify",
        "Fine-tune a GPT model as a text classifier (spam by default).",
    ),
    "classify": ("fastgpt.commands.classify", "Classify text with a fine-tuned classifier."),
    "finetune-instruct": (
        "fastgpt.commands.finetune_instruct",
        "Fine-tune a GPT model to follow instructions (Alpaca format).",
    ),
    "evaluate": (
        "fastgpt.commands.evaluate",
        "Score instruction responses with a judge model (Ollama or OpenAI-compatible).",
    ),
    "bench": ("fastgpt.commands.bench", "Benchmark kernels, training and generation."),
    "selftest": ("fastgpt.commands.selftest", "Check the GPU path: kernels compiled, ops, model."),
}


def command_error(command: str, message: object, code: int = 2) -> int:
    """Print "fastgpt COMMAND: error: MESSAGE" to stderr and return `code`, the exit status of
    a command's run(): 2 for bad options, data or files, 1 for a run that failed."""
    print(f"fastgpt {command}: error: {message}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastgpt",
        description="Train, fine-tune, run and benchmark GPT-2 models on Triton kernels.",
    )
    parser.add_argument("--version", action="version", version=f"fastgpt {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        # Arguments are added lazily in main() for the chosen command only.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if sys.stdout is None:  # started with stdout closed (`>&-`): Python leaves it None
        return command_error(" ".join(argv[:1]) or "", "standard output is closed")
    parser = build_parser()
    # Find the subcommand first, then let its module add the arguments and parse again.
    command = next((a for a in argv if not a.startswith("-")), None)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if command in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[command][0])
        module.add_arguments(subparsers.choices[command])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from fastgpt.options import resolve_defaults

    resolve_defaults(args)
    module = importlib.import_module(args._module)
    return _run(module, args, subparsers.choices[args.command])


def _run(module, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """module.run(args), with the errors a user can cause turned into one line each."""
    from fastgpt.errors import RunFailedError, UsageError
    from fastgpt.options import flag_of
    from fastgpt.tokenizer import TokenizerUnavailableError  # torch is loaded by now

    def flags(exc) -> str:  # name the flags, not the Python fields
        return exc.render(lambda f: flag_of(parser, f) or f)

    try:
        return module.run(args) or 0
    except UsageError as exc:
        return command_error(args.command, flags(exc))
    except TokenizerUnavailableError as exc:  # the BPE: any command may need it, any time
        return command_error(args.command, exc)
    except RunFailedError as exc:  # a non-finite loss, a full disk
        return command_error(args.command, flags(exc), code=1)
    except KeyboardInterrupt as exc:  # Ctrl-C: a line, not a traceback (130 = 128 + SIGINT)
        print(f"fastgpt {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return getattr(exc, "exit_status", 130)  # a StopRequested: 128 + its signal
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as cat does
        # What Python would still flush to the closed pipe at exit goes to /dev/null instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
