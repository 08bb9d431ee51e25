"""`fastgpt evaluate`: score instruction responses with a judge model (the book's chapter 7).

fastgpt evaluate runs/instruct/test_responses.json                  # Ollama, llama3
fastgpt evaluate runs/instruct/test_responses.json --judge-model llama3.1:70b
fastgpt evaluate RESPONSES.json --api openai --judge-url http://localhost:8000 \\
    --judge-model meta-llama/Meta-Llama-3-8B-Instruct
OPENAI_API_KEY=... fastgpt evaluate RESPONSES.json --api openai --judge-model gpt-4o-mini

Each score is appended to RESPONSES.scores.jsonl beside the file as it comes; a second run asks
only about entries not yet scored (by the same judge model). Prints the mean score, the number
of entries scored and the number of answers that held no integer. See fastgpt/evaluate.py.
"""

from __future__ import annotations

import argparse
import functools
import os

from fastgpt.cli import command_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastgpt.evaluate import APIS, DEFAULT_MODEL, DEFAULT_URLS

    parser.add_argument("responses", help="test_responses.json written by finetune-instruct")
    parser.add_argument(
        "--api",
        choices=APIS,
        default="ollama",
        help="ollama: /api/chat (default); openai: any OpenAI-compatible /v1/chat/completions",
    )
    parser.add_argument(
        "--judge-url",
        default=None,
        help=f"the judge server (default: {DEFAULT_URLS['ollama']} for ollama, "
        f"{DEFAULT_URLS['openai']} for openai)",
    )
    parser.add_argument(
        "--judge-model",
        default=None,
        help=f"the judge model (default {DEFAULT_MODEL} for ollama; required for openai)",
    )
    parser.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="with --api openai: environment variable holding the API key, sent as a Bearer "
        "token (default %(default)s; unset = no key)",
    )
    parser.add_argument(
        "--scores",
        default=None,
        help="scores file (JSON lines, appended; default: RESPONSES.scores.jsonl beside it)",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="ask Ollama to stream its reply as JSON lines (its own default) instead of one "
        "JSON object",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds per request (default %(default)s)"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="further attempts after a timeout or server error, with backoff 1, 2, 4, ... s "
        "(default %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from fastgpt.evaluate import DEFAULT_MODEL, Judge, JudgeError, evaluate_responses

    fail = functools.partial(command_error, "evaluate")
    model = args.judge_model
    if model is None:
        if args.api == "openai":
            return fail("--api openai needs --judge-model (the model name the server knows)")
        model = DEFAULT_MODEL
    api_key = None  # only an OpenAI-compatible server gets the key
    if args.api == "openai" and args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
    try:
        judge = Judge(
            api=args.api,
            url=args.judge_url,
            model=model,
            api_key=api_key or None,
            stream=args.stream,
            timeout=args.timeout,
            retries=args.retries,
        )
        summary = evaluate_responses(
            args.responses, judge, scores_path=args.scores, progress=not args.no_progress
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
