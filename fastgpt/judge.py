"""The judge of model-graded evaluation (the book's chapter 7): a larger model, behind an HTTP
API, that scores a fine-tuned model's response from 0 to 100 with the book's prompt:

    Given the input `{format_input(entry)}` and correct output `{output}`, score the model
    response `{model_response}` on a scale from 0 to 100, where 100 is the best score.
    Respond with the integer number only.

Judges (standard library HTTP only):

- "ollama" (default): POST {url}/api/chat with the book's options (seed 123, temperature 0,
  num_ctx 2048); the reply is read whether it comes as one JSON object ("stream": false) or
  streamed as JSON lines (each holding a piece of message.content).
- "openai": POST {url}/v1/chat/completions (any OpenAI-compatible server) with temperature 0
  and seed 123, the API key (if any) as a Bearer token.

`JudgeOptions` are the command-line options that choose a judge, of `fastgpt evaluate` and of
`finetune-instruct --judge-url` alike; `JudgeOptions(...).judge()` builds the `Judge`.

Failures are `JudgeError`s with one-line messages: server unreachable (names the URL and how to
start Ollama), unknown model (Ollama's 404), bad API key, and timeouts or 5xx answers after
`retries` further attempts with exponential backoff. Scoring a whole responses file (resumable,
a scores file beside it) is `fastgpt.response_scoring`.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastgpt.errors import ConfigError
from fastgpt.instruction import format_input

APIS = ("ollama", "openai")
DEFAULT_URLS = {"ollama": "http://localhost:11434", "openai": "https://api.openai.com"}
ENDPOINTS = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}
DEFAULT_MODEL = "llama3"
OLLAMA_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}
"""The book's options: deterministic answers, a 2048-token context."""


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
    request, the whole reply included. retries: further attempts after a timeout or a 5xx
    answer, waiting backoff · 2**attempt seconds before each (sleep is injectable, for tests).
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
                deadline = time.monotonic() + self.timeout
                with _OPENER.open(request, timeout=self.timeout) as response:
                    raw = _read_by(response, deadline)
            except urllib.error.HTTPError as exc:
                if 300 <= exc.code < 400:  # not followed: the key would go to another host
                    raise JudgeError(
                        f"the judge at {self.endpoint} answered with a redirect (HTTP "
                        f"{exc.code}) to {exc.headers.get('Location', '?')}: fastgpt follows "
                        "none (it would send the request and API key there); give the final "
                        "address with --judge-url"
                    ) from None
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


@dataclass
class JudgeOptions:
    """Which judge scores the responses: the options of `fastgpt evaluate`, declared once here
    (`fastgpt.options` makes each field a flag) and taken by `finetune-instruct` as well."""

    api: Literal["ollama", "openai"] = "ollama"
    """ollama: Ollama's /api/chat; openai: any OpenAI-compatible /v1/chat/completions server."""
    judge_url: str | None = field(default=None, metadata={"metavar": "URL"})
    """The judge server (evaluate's default: http://localhost:11434 for ollama,
    https://api.openai.com for openai; finetune-instruct scores its test responses only when
    it is given)."""
    judge_model: str | None = field(default=None, metadata={"metavar": "NAME"})
    """The judge model (default llama3 for ollama; required for openai)."""
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"metavar": "VAR"})
    """With --api openai: the environment variable holding the API key, sent as a Bearer token
    (unset = no key)."""
    stream: bool = False
    """Ask Ollama to stream the judge's reply as JSON lines (its own default) instead of one
    JSON object."""
    timeout: float = 120.0
    """Seconds per request to the judge."""
    retries: int = 3
    """Further attempts after the judge timed out or answered a server error, with backoff
    1, 2, 4, ... s."""

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ConfigError("api", f"must be one of {', '.join(APIS)}, got {self.api!r}")
        url = self.judge_url
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError("judge_url", f"must start with http:// or https://, got {url!r}")
        if self.judge_model is not None and not self.judge_model:
            raise ConfigError("judge_model", "is empty")
        if not self.timeout > 0:
            raise ConfigError("timeout", f"must be > 0 seconds, got {self.timeout}")
        if self.retries < 0:
            raise ConfigError("retries", f"must be >= 0, got {self.retries}")

    def judge(self) -> Judge:
        """The Judge these options describe; the API key is read from the environment now (and
        sent to an OpenAI-compatible server only). ConfigError when --api openai has no model."""
        model = self.judge_model
        if model is None:
            if self.api == "openai":
                raise ConfigError(
                    "api", "openai needs {judge_model} (the model name the server knows)"
                )
            model = DEFAULT_MODEL
        api_key = None
        if self.api == "openai" and self.api_key_env:
            api_key = os.environ.get(self.api_key_env) or None
        return Judge(
            api=self.api, url=self.judge_url, model=model, api_key=api_key,
            stream=self.stream, timeout=self.timeout, retries=self.retries,
        )  # fmt: skip


def _read_by(response: http.client.HTTPResponse, deadline: float) -> bytes:
    """The whole body, or TimeoutError once time.monotonic() passes `deadline`: the socket's
    timeout bounds each read only, and a server that trickles a byte at a time never trips it."""
    chunks = []
    while chunk := response.read1(1 << 16):
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError("the reply is still coming")
    return b"".join(chunks)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx answer stays an HTTPError: the request, API key included, goes only to the
    address the user named."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirects)


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
