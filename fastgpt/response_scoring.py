"""Model-graded evaluation of instruction responses (the end of the book's chapter 7).

A larger "judge" model (`fastgpt.judge`: Ollama or an OpenAI-compatible server, the book's
prompt and options) scores each entry of a `finetune-instruct` test_responses.json (records
with "instruction", "input", "output" and the fine-tuned model's "model_response") from 0 to
100:

    judge = Judge()                                    # Ollama at localhost:11434, llama3
    summary = evaluate_responses("runs/instruct/test_responses.json", judge)
    summary.mean, summary.scored, summary.unparsable

Scores are appended, one JSON line per entry as it is scored, to a scores file beside the
responses (test_responses.scores.jsonl), so an interrupted run loses nothing and a second run
asks only about the entries not yet scored by the same judge model. The file is never
truncated; when an entry was scored twice, the last line counts. A responses file of the wrong
shape is a ValueError naming the entry; the judge's failures are `JudgeError`s.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastgpt.judge import (
    APIS,
    DEFAULT_MODEL,
    DEFAULT_URLS,
    OLLAMA_OPTIONS,
    Judge,
    JudgeError,
    JudgeOptions,
    judge_prompt,
    parse_score,
)

__all__ = [
    "APIS",
    "DEFAULT_MODEL",
    "DEFAULT_URLS",
    "OLLAMA_OPTIONS",
    "EvaluationSummary",
    "Judge",
    "JudgeError",
    "JudgeOptions",
    "evaluate_responses",
    "judge_prompt",
    "load_responses",
    "parse_score",
    "scores_path_for",
]

RESPONSE_KEYS = ("instruction", "output", "model_response")


def load_responses(path: str | Path) -> list[dict[str, str]]:
    """Read a test_responses.json: a JSON list of objects with string "instruction",
    "output", "model_response" and an optional string "input". ValueError names the file and
    the entry (its index and the start of its instruction) that does not fit."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"responses file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}") from None
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a JSON list of test entries (finetune-instruct's "
            f"test_responses.json), got {type(data).__name__}"
        )
    if not data:
        raise ValueError(f"{path}: the list of test entries is empty")
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {index} is a {type(entry).__name__}, not an object")
        named = f"entry {index}"
        if isinstance(entry.get("instruction"), str):
            named += f" ({entry['instruction'][:40]!r})"
        for key in RESPONSE_KEYS:
            if key not in entry:
                raise ValueError(f"{path}: {named} has no {key!r}")
        for key in (*RESPONSE_KEYS, "input"):
            if key in entry and not isinstance(entry[key], str):
                raise ValueError(
                    f"{path}: {named}: {key!r} must be a string, got {type(entry[key]).__name__}"
                )
    return data


def scores_path_for(responses: str | Path) -> Path:
    """Where the scores of a responses file go: beside it, NAME.scores.jsonl."""
    responses = Path(responses)
    return responses.with_name(f"{responses.stem}.scores.jsonl")


def _entry_key(entry: dict[str, str]) -> str:
    """Identifies an entry's content, so scores of an edited entry are not reused."""
    return hashlib.sha256(judge_prompt(entry).encode("utf-8")).hexdigest()[:16]


def _read_scores(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a scores file; lines that are not JSON objects (a torn last line of a
    killed run) are skipped."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "index" in record and "key" in record:
                yield record


@dataclass
class EvaluationSummary:
    """What `evaluate_responses` found: mean of the integer scores (None when there is none),
    entries with an integer score, entries whose answer held none, entries in the file,
    entries asked in this run, and the scores file."""

    mean: float | None
    scored: int
    unparsable: int
    total: int
    asked: int
    scores_path: Path
    scores: list[int | None]

    def line(self) -> str:
        """One line for a terminal."""
        mean = f"{self.mean:.2f}" if self.mean is not None else "n/a"
        return (
            f"mean score {mean} over {self.scored} of {self.total} entries; "
            f"{self.unparsable} answers held no integer score; scores in {self.scores_path}"
        )


def evaluate_responses(
    path: str | Path,
    judge: Judge,
    scores_path: str | Path | None = None,
    progress: bool = True,
) -> EvaluationSummary:
    """Score every entry of the responses file at `path` with `judge`, appending each result
    to `scores_path` (default `scores_path_for(path)`) as it comes and skipping entries that
    file already holds for the same judge model and entry text. Raises ValueError /
    FileNotFoundError for a bad responses file, JudgeError when the judge fails (the scores
    written before stay)."""
    from tqdm.auto import tqdm

    entries = load_responses(path)
    out = Path(scores_path) if scores_path is not None else scores_path_for(path)
    keys = [_entry_key(e) for e in entries]
    known = _known_scores(out, keys, judge.model)
    todo = [i for i in range(len(entries)) if i not in known]
    out.parent.mkdir(parents=True, exist_ok=True)
    # A killed run may have left a partial last line: start on a fresh one.
    needs_newline = out.is_file() and out.stat().st_size > 0 and not _ends_with_newline(out)
    existed = out.exists()
    bar = tqdm(total=len(entries), initial=len(known), desc="scoring", unit="entry",
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    try:
        with open(out, "a", encoding="utf-8") as f:
            if needs_newline:
                f.write("\n")
            for i in todo:
                reply = judge.ask(judge_prompt(entries[i]))
                record = {
                    "index": i,
                    "key": keys[i],
                    "judge": judge.model,
                    "score": parse_score(reply),
                    "reply": reply,
                }
                f.write(json.dumps(record) + "\n")
                f.flush()
                known[i] = record
                bar.update(1)
    finally:
        bar.close()
        if not existed and out.is_file() and out.stat().st_size == 0:  # nothing was scored
            out.unlink()
    scores = [known[i]["score"] for i in range(len(entries))]
    valid = [s for s in scores if isinstance(s, int)]
    return EvaluationSummary(
        mean=sum(valid) / len(valid) if valid else None,
        scored=len(valid),
        unparsable=len(scores) - len(valid),
        total=len(entries),
        asked=len(todo),
        scores_path=out,
        scores=scores,
    )


def _known_scores(path: Path, keys: list[str], model: str) -> dict[int, dict[str, Any]]:
    """The records of the scores file that still hold for entry i (same text, same judge)."""
    known: dict[int, dict[str, Any]] = {}
    for record in _read_scores(path):
        i = record["index"]
        same_entry = isinstance(i, int) and 0 <= i < len(keys) and record["key"] == keys[i]
        if same_entry and record.get("judge") == model:
            known[i] = record
    return known


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"
