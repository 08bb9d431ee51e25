"""Model-graded evaluation of instruction responses (the end of the book's chapter 7).

A larger "judge" model scores each entry of a `finetune-instruct` test_responses.json (records
with "instruction", "input", "output" and the fine-tuned model's "model_response") from 0 to
100, with the book's prompt:

    Given the input `{format_input(entry)}` and correct output `{output}`, score the model
    response `{model_response}` on a scale from 0 to 100, where 100 is the best score.
    Respond with the integer number only.

    judge = Judge()                                    # Ollama at localhost:11434, llama3
    summary = evaluate_responses("runs/instruct/test_responses.json", judge)
    summary.mean, summary.scored, summary.unparsable

Judges (standard library HTTP only):

- "ollama" (default): POST {url}/api/chat with the book's options (seed 123, temperature 0,
  num_ctx 2048); the reply is read whether it comes as one JSON object ("stream": false) or
  streamed as JSON lines (each holding a piece of message.content).
- "openai": POST {url}/v1/chat/completions (any OpenAI-compatible server) with temperature 0
  and seed 123, the API key (if any) as a Bearer token.

Scores are appended, one JSON line per entry as it is scored, to a scores file beside the
responses (test_responses.scores.jsonl), so an interrupted run loses nothing and a second run
asks only about the entries not yet scored by the same judge model. The file is never
truncated; when an entry was scored twice, the last line counts.

Failures are `JudgeError`s with one-line messages: server unreachable (names the URL and how to
start Ollama), unknown model (Ollama's 404), bad API key, and timeouts or 5xx answers after
`retries` further attempts with exponential backoff. A responses file of the wrong shape is a
ValueError naming the entry.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastgpt.instruction import format_input

__all__ = [
    "APIS",
    "DEFAULT_MODEL",
    "DEFAULT_URLS",
    "OLLAMA_OPTIONS",
    "EvaluationSummary",
    "Judge",
    "JudgeError",
    "evaluate_responses",
    "judge_prompt",
    "load_responses",
    "parse_score",
    "scores_path_for",
]

APIS = ("ollama", "openai")
DEFAULT_URLS = {"ollama": "http://localhost:11434", "openai": "https://api.openai.com"}
ENDPOINTS = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}
DEFAULT_MODEL = "llama3"
OLLAMA_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}
"""The book's options: deterministic answers, a 2048-token context."""
RESPONSE_KEYS = ("instruction", "output", "model_response")


class JudgeError(RuntimeError):
    """The judge could not be asked or gave no usable reply (a one-line message)."""


# --- the prompt and the reply --------------------------------------------------------------


def judge_prompt(entry: dict[str, str]) -> str:
    """The book's scoring prompt for one test entry."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry['model_response']}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


_INTEGER = re.compile(r"(?<![\w.-])\d+(?!\.\d|\w)")  # 85, "85.", "85/100"; not 8.5, -5, x85


def parse_score(reply: str) -> int | None:
    """The score in a judge's reply: the reply itself when it is an integer (the book's
    `int(reply)`), else the first integer standing alone in it ("Score: 85" -> 85); None when
    there is none or it is outside 0..100 (the book skips such answers)."""
    text = reply.strip()
    try:
        value = int(text)
    except ValueError:
        match = _INTEGER.search(text)
        if match is None:
            return None
        value = int(match.group())
    return value if 0 <= value <= 100 else None


# --- the judge client ----------------------------------------------------------------------


@dataclass
class Judge:
    """An HTTP client for a judge model.

    api: "ollama" or "openai". url: the server's base URL (default per api: DEFAULT_URLS; a
    URL that already ends in the endpoint path is used as is). model: the judge's name.
    api_key: sent as "Authorization: Bearer" (openai). stream: ask Ollama to stream JSON lines
    (the server's default, as the book reads it) instead of one object. timeout: seconds per
    request. retries: further attempts after a timeout or a 5xx answer, waiting
    backoff · 2**attempt seconds before each (sleep is injectable, for tests).
    """

    api: str = "ollama"
    url: str | None = None
    model: str = DEFAULT_MODEL
    api_key: str | None = None
    stream: bool = False
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 1.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {self.api!r}")
        if not self.model:
            raise ValueError("the judge model name is empty")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        url = (self.url or DEFAULT_URLS[self.api]).rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"judge URL must start with http:// or https://, got {url!r}")
        self.url = url

    @property
    def endpoint(self) -> str:
        """The full URL requests go to."""
        path = ENDPOINTS[self.api]
        if self.url.endswith(path):
            return self.url
        if self.api == "openai" and self.url.endswith("/v1"):
            return self.url + "/chat/completions"
        return self.url + path

    def payload(self, prompt: str) -> dict[str, Any]:
        """The JSON body of a request for `prompt`."""
        messages = [{"role": "user", "content": prompt}]
        if self.api == "ollama":
            return {
                "model": self.model,
                "messages": messages,
                "options": dict(OLLAMA_OPTIONS),
                "stream": self.stream,
            }
        return {
            "model": self.model,
            "messages": messages,
            "temperature": OLLAMA_OPTIONS["temperature"],
            "seed": OLLAMA_OPTIONS["seed"],
        }

    def ask(self, prompt: str) -> str:
        """The judge's reply text to `prompt`. Raises JudgeError."""
        body = json.dumps(self.payload(prompt)).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.endpoint, data=body, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code >= 500:
                    last = f"HTTP {exc.code}{detail}"
                    continue
                raise self._client_error(exc.code, detail) from None
            except TimeoutError as exc:
                last = f"no answer within {self.timeout:g} s ({exc or 'timed out'})"
                continue
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, TimeoutError):
                    last = f"no answer within {self.timeout:g} s"
                    continue
                raise JudgeError(self._unreachable(exc.reason)) from None
            except (OSError, http.client.HTTPException) as exc:  # reset or cut mid-reply
                if isinstance(exc, ConnectionRefusedError):
                    raise JudgeError(self._unreachable(exc)) from None
                last = f"connection failed ({exc})"
                continue
            return self._reply_text(raw)
        raise JudgeError(
            f"the judge at {self.endpoint} failed {self.retries + 1} times; last: {last}"
        )

    # --- helpers ---

    def _unreachable(self, reason: object) -> str:
        text = f"cannot reach the judge at {self.url} ({reason})"
        if self.api == "ollama":
            return (
                f"{text}: start Ollama with `ollama serve` and get the model with "
                f"`ollama pull {self.model}` (or give --judge-url)"
            )
        return f"{text}: is the server running? (give its address with --judge-url)"

    def _client_error(self, code: int, detail: str) -> JudgeError:
        if code == 404:
            hint = (
                f"; get it with `ollama pull {self.model}`"
                if self.api == "ollama"
                else f" (or {self.endpoint} is not a chat-completions endpoint)"
            )
            return JudgeError(
                f"the judge model {self.model!r} is not available at {self.url} "
                f"(HTTP 404{detail}){hint}"
            )
        if code in (401, 403):
            return JudgeError(
                f"the judge at {self.url} refused the request (HTTP {code}{detail}): check "
                "the API key (--api-key-env names the variable that holds it)"
            )
        return JudgeError(f"the judge at {self.endpoint} answered HTTP {code}{detail}")

    def _reply_text(self, raw: bytes) -> str:
        """message content of a reply body: one JSON object or JSON lines (Ollama's stream)."""
        try:
            text = raw.decode("utf-8")
            objects = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise JudgeError(
                f"the judge at {self.endpoint} sent a reply that is not JSON: {exc}"
            ) from None
        if not objects:
            raise JudgeError(f"the judge at {self.endpoint} sent an empty reply")
        pieces = []
        for obj in objects:
            if isinstance(obj, dict) and obj.get("error"):
                raise JudgeError(f"the judge at {self.endpoint} reported: {obj['error']}")
            try:
                if self.api == "ollama":
                    pieces.append(obj["message"]["content"])
                else:
                    pieces.append(obj["choices"][0]["message"]["content"] or "")
            except (KeyError, IndexError, TypeError):
                where = "message.content" if self.api == "ollama" else "choices[0].message"
                raise JudgeError(
                    f"the judge at {self.endpoint} sent a reply without {where}: "
                    f"{json.dumps(obj)[:200]}"
                ) from None
        return "".join(str(p) for p in pieces)


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """': <the server's message>' from an error body ({"error": ...} or text), or ''."""
    try:
        body = exc.read().decode("utf-8", "replace").strip()
    except Exception:
        return ""
    if not body:
        return ""
    try:
        obj = json.loads(body)
        message = obj.get("error", body) if isinstance(obj, dict) else body
        if isinstance(message, dict):  # OpenAI: {"error": {"message": ...}}
            message = message.get("message", message)
    except json.JSONDecodeError:
        message = body
    return f": {' '.join(str(message).split())[:200]}"


# --- the responses file and the scores file ------------------------------------------------


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
    bar = tqdm(
        total=len(entries),
        initial=len(known),
        desc="scoring",
        unit="entry",
        disable=not progress,
        dynamic_ncols=True,
    )
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
