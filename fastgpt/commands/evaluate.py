"""`fastgpt evaluate`: score instruction responses with a judge model (the book's chapter 7).

fastgpt evaluate runs/instruct/test_responses.json                  # Ollama, llama3
fastgpt evaluate runs/instruct/test_responses.json --judge-model llama3.1:70b
fastgpt evaluate RESPONSES.json --api openai --judge-url http://localhost:8000 \\
    --judge-model meta-llama/Meta-Llama-3-8B-Instruct
OPENAI_API_KEY=... fastgpt evaluate RESPONSES.json --api openai --judge-model gpt-4o-mini

Each score is appended to RESPONSES.scores.jsonl beside the file as it comes; a second run asks
only about entries not yet scored (by the same judge model). Prints the mean score, the number
of entries scored and the number of answers that held no integer. See
fastgpt/response_scoring.py and fastgpt/judge.py.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field

from fastgpt.cli import command_error
from fastgpt.options import add_options, options_from_args


@dataclass
class EvaluateOptions:
    """Which responses are scored and where the scores go (the judge is JudgeOptions)."""

    responses: str = field(metadata={"positional": True})
    """test_responses.json written by finetune-instruct."""
    scores: str | None = None
    """Scores file (JSON lines, appended; default: RESPONSES.scores.jsonl beside it)."""
    progress: bool = True
    """Show a progress bar."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastgpt.response_scoring import JudgeOptions

    add_options(parser, EvaluateOptions)
    add_options(parser, JudgeOptions, "judge")  # finetune-instruct takes the same options


def run(args: argparse.Namespace) -> int:
    from fastgpt.response_scoring import JudgeError, JudgeOptions, evaluate_responses

    fail = functools.partial(command_error, "evaluate")
    options = options_from_args(EvaluateOptions, args)
    judge = options_from_args(JudgeOptions, args).judge()  # a ConfigError names the flag
    try:
        summary = evaluate_responses(
            options.responses, judge, scores_path=options.scores, progress=options.progress
        )
    except (ValueError, FileNotFoundError) as exc:
        return fail(exc)
    except JudgeError as exc:
        return fail(exc, code=1)
    except OSError as exc:  # the scores file cannot be written
        return fail(f"cannot write the scores: {exc}", code=1)
    if summary.mean is None:
        print(f"no integer score among {summary.total} answers; replies in {summary.scores_path}")
    else:
        print(f"mean score: {summary.mean:.2f}")
    print(f"scored: {summary.scored} of {summary.total} entries ({summary.asked} asked now)")
    print(f"answers without an integer: {summary.unparsable}")
    print(f"scores: {summary.scores_path}")
    return 0
