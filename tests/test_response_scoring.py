"""fastgpt.response_scoring and `fastgpt evaluate`, against a loopback judge server.

The server (127.0.0.1, a free port, a thread of this process, stopped by each test) emulates
Ollama's /api/chat (streamed JSON lines or one object, as the request asks; 404 for an unknown
model) and an OpenAI-compatible /v1/chat/completions; a test can script its next answers
(an HTTP status, a delay, a reply text).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fastgpt.cli import main
from fastgpt.instruction import format_input
from fastgpt.response_scoring import (
    OLLAMA_OPTIONS,
    Judge,
    JudgeError,
    evaluate_responses,
    judge_prompt,
    parse_score,
    scores_path_for,
)

ENTRIES = [
    {
        "instruction": "Rewrite the sentence using a simile.",
        "input": "The car is very fast.",
        "output": "The car is as fast as lightning.",
        "model_response": "The car is as fast as a bullet.",
    },
    {
        "instruction": "What type of cloud is typically associated with thunderstorms?",
        "input": "",
        "output": "The type of cloud typically associated with thunderstorms is cumulonimbus.",
        "model_response": "A thunderstorm cloud is a cumulus.",
    },
    {
        "instruction": "Name the author of 'Pride and Prejudice'.",
        "input": "",
        "output": "Jane Austen.",
        "model_response": "Charles Dickens.",
    },
]


class JudgeServer:
    """A loopback HTTP server playing a judge. `replies` maps a substring of the prompt to the
    reply text (default "50"); `script` is a list of actions used up one per request:
    ("status", code) answers that HTTP error, ("delay", seconds) waits before answering,
    ("redirect", url) answers 302 to url, ("trickle", _) sends its reply one byte per 0.1 s."""

    def __init__(self, models=("llama3",)):
        self.models = set(models)
        self.replies: dict[str, str] = {}
        self.script: list[tuple[str, float]] = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # what a redirected POST becomes in urllib: seen, refused
                server.requests.append({"path": self.path})
                server.headers.append(dict(self.headers))
                return self._send(405, {"error": "method not allowed"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, **body})
                server.headers.append(dict(self.headers))
                action = server.script.pop(0) if server.script else None
                if action and action[0] == "delay":
                    time.sleep(action[1])
                if action and action[0] == "status":
                    return self._send(int(action[1]), {"error": "internal error"})
                if action and action[0] == "trickle":  # the reply, one byte per 0.1 s
                    data = json.dumps({"message": {"role": "assistant", "content": "50"}})
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    for byte in data.encode():
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.1)
                    return None
                if action and action[0] == "redirect":
                    self.send_response(302)
                    self.send_header("Location", str(action[1]))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if self.path not in ("/api/chat", "/v1/chat/completions"):
                    return self._send(404, {"error": "404 page not found"})
                if body["model"] not in server.models:
                    return self._send(
                        404, {"error": f'model "{body["model"]}" not found, try pulling it first'}
                    )
                prompt = body["messages"][-1]["content"]
                reply = next((r for k, r in server.replies.items() if k in prompt), "50")
                if self.path == "/v1/chat/completions":
                    choice = {"index": 0, "message": {"role": "assistant", "content": reply}}
                    return self._send(200, {"choices": [choice]})
                if body.get("stream", True):  # Ollama streams unless told not to
                    pieces = [reply[: len(reply) // 2], reply[len(reply) // 2 :], ""]
                    lines = [
                        {"message": {"role": "assistant", "content": p}, "done": i == 2}
                        for i, p in enumerate(pieces)
                    ]
                    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-ndjson")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return None
                return self._send(200, {"message": {"role": "assistant", "content": reply}})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that timed out
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    with JudgeServer() as s:
        yield s


@pytest.fixture
def responses(tmp_path):
    path = tmp_path / "test_responses.json"
    path.write_text(json.dumps(ENTRIES, indent=1), encoding="utf-8")
    return path


def _judge(server, **kwargs) -> Judge:
    kwargs.setdefault("sleep", lambda seconds: None)  # no real backoff in tests
    return Judge(url=server.url, **kwargs)


def _scores(path) -> list[dict]:
    return [json.loads(line) for line in scores_path_for(path).read_text().splitlines()]


# --- prompt and reply parsing ---------------------------------------------------------


def test_prompt_is_the_books():
    entry = ENTRIES[0]
    assert judge_prompt(entry) == (
        f"Given the input `{format_input(entry)}` and correct output "
        "`The car is as fast as lightning.`, score the model response "
        "`The car is as fast as a bullet.` on a scale from 0 to 100, where 100 is the best "
        "score. Respond with the integer number only."
    )
    assert "### Input:\nThe car is very fast." in judge_prompt(entry)


@pytest.mark.parametrize(
    "reply, score",
    [
        ("85", 85),
        (" 7\n", 7),
        ("Score: 90.", 90),
        ("90/100", 90),
        ("0", 0),
        ("100", 100),
        ("I cannot score this.", None),
        ("8.5", None),
        ("-3", None),
        ("150", None),
        ("", None),
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


# --- scoring against the loopback server ----------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_scores_every_entry(server, responses, stream):
    server.replies = {"simile": "85", "thunderstorms": "40", "Pride": "0"}
    summary = evaluate_responses(responses, _judge(server, stream=stream), progress=False)
    assert summary.scores == [85, 40, 0]
    assert (summary.mean, summary.scored, summary.unparsable, summary.total) == (
        pytest.approx(125 / 3),
        3,
        0,
        3,
    )
    first = server.requests[0]
    assert first["path"] == "/api/chat"
    assert first["model"] == "llama3" and first["stream"] is stream
    assert first["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    assert first["options"] == OLLAMA_OPTIONS
    assert first["messages"] == [{"role": "user", "content": judge_prompt(ENTRIES[0])}]
    records = _scores(responses)
    assert [r["score"] for r in records] == [85, 40, 0]
    assert [r["reply"] for r in records] == ["85", "40", "0"]


def test_openai_endpoint_with_api_key(server, responses, monkeypatch, capsys):
    server.models = {"judge-8b"}
    server.replies = {"simile": "70"}
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    code = main(
        [
            "evaluate",
            str(responses),
            "--api",
            "openai",
            "--judge-url",
            server.url,
            "--judge-model",
            "judge-8b",
            "--api-key-env",
            "MY_JUDGE_KEY",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert server.requests[0]["temperature"] == 0 and server.requests[0]["model"] == "judge-8b"
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    assert "mean score: 56.67" in out  # (70 + 50 + 50) / 3
    assert "scored: 3 of 3" in out and "answers without an integer: 0" in out


def test_resume_skips_scored_entries_and_keeps_earlier_results(server, responses):
    server.replies = {"simile": "85"}
    server.script = [("ok", 0), ("status", 400)]  # the second entry fails: the run stops
    with pytest.raises(JudgeError, match="HTTP 400"):
        evaluate_responses(responses, _judge(server), progress=False)
    assert [r["index"] for r in _scores(responses)] == [0]

    server.requests.clear()
    summary = evaluate_responses(responses, _judge(server), progress=False)
    assert summary.asked == 2 and len(server.requests) == 2  # entry 0 is not asked again
    assert summary.scores == [85, 50, 50]
    assert [r["index"] for r in _scores(responses)] == [0, 1, 2]  # appended, not rewritten

    server.requests.clear()
    again = evaluate_responses(responses, _judge(server), progress=False)
    assert again.asked == 0 and server.requests == [] and again.scores == [85, 50, 50]

    # An edited entry is asked again; a different judge model scores everything anew.
    edited = [dict(ENTRIES[0], model_response="Fast like a bullet."), *ENTRIES[1:]]
    responses.write_text(json.dumps(edited), encoding="utf-8")
    assert evaluate_responses(responses, _judge(server), progress=False).asked == 1
    server.models.add("other")
    assert evaluate_responses(responses, _judge(server, model="other"), progress=False).asked == 3
    assert len(_scores(responses)) == 3 + 1 + 3


def test_torn_last_line_is_ignored_and_not_glued_to(server, responses):
    path = scores_path_for(responses)
    path.write_text('{"index": 0, "key": "x", "judge": "llama3", "sco', encoding="utf-8")
    summary = evaluate_responses(responses, _judge(server), progress=False)
    assert summary.asked == 3
    lines = path.read_text().splitlines()
    assert lines[0].startswith('{"index": 0, "key": "x"') and len(lines) == 4
    assert all(json.loads(line)["score"] == 50 for line in lines[1:])


def test_unparsable_answers_are_counted_not_scored(server, responses, capsys, monkeypatch):
    server.replies = {"simile": "90", "thunderstorms": "I would rather not say.", "Pride": "n/a"}
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")  # not sent to Ollama
    code = main(["evaluate", str(responses), "--judge-url", server.url, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "mean score: 90.00" in out
    assert "scored: 1 of 3" in out
    assert "answers without an integer: 2" in out
    records = _scores(responses)
    assert [r["score"] for r in records] == [90, None, None]
    assert records[1]["reply"] == "I would rather not say."
    assert all("Authorization" not in h for h in server.headers)


# --- errors ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_is_one_line_naming_url_and_how_to_start(responses, capsys):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    code = main(["evaluate", str(responses), "--judge-url", url, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("fastgpt evaluate: error: cannot reach the judge at " + url)
    assert "ollama serve" in err and "ollama pull llama3" in err


def test_unknown_model_names_the_model(server, responses, capsys):
    code = main(
        [
            "evaluate",
            str(responses),
            "--judge-url",
            server.url,
            "--judge-model",
            "llama9",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "'llama9' is not available" in err and "ollama pull llama9" in err
    assert 'model "llama9" not found' in err  # Ollama's own message is passed on


def test_server_error_then_success_is_retried_with_backoff(server, responses):
    waits = []
    server.script = [("status", 500), ("status", 503)]
    judge = _judge(server, retries=3, backoff=0.5, sleep=waits.append)
    summary = evaluate_responses(responses, judge, progress=False)
    assert summary.scores == [50, 50, 50]
    assert waits == [0.5, 1.0]  # exponential backoff before each retry
    assert len(server.requests) == 2 + 3


def test_retries_are_bounded(server, responses):
    server.script = [("status", 500)] * 10
    judge = _judge(server, retries=2)
    with pytest.raises(JudgeError, match=r"failed 3 times; last: HTTP 500: internal error"):
        evaluate_responses(responses, judge, progress=False)
    assert len(server.requests) == 3
    assert not scores_path_for(responses).exists()  # nothing scored: no (empty) scores file


def test_timeout_is_retried(server, responses):
    server.script = [("delay", 1.0)]
    judge = _judge(server, timeout=0.2, retries=1)
    assert evaluate_responses(responses, judge, progress=False).scores == [50, 50, 50]
    with JudgeServer() as slow:
        slow.script = [("delay", 1.0)] * 2
        with pytest.raises(JudgeError, match=r"no answer within 0\.2 s"):
            _judge(slow, timeout=0.2, retries=1).ask("hello")


def test_reply_without_content_is_an_error(server):
    judge = _judge(server)
    with pytest.raises(JudgeError, match=r"without message\.content"):
        judge._reply_text(b'{"done": true}')
    with pytest.raises(JudgeError, match="not JSON"):
        judge._reply_text(b"<html>")
    with pytest.raises(JudgeError, match="reported: boom"):
        judge._reply_text(b'{"error": "boom"}\n')


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "malformed JSON"),
        ('{"a": 1}', "expected a JSON list"),
        ("[]", "empty"),
        ('[{"instruction": "x", "output": "y", "model_response": "z"}, 3]', "entry 1 is a int"),
        (
            '[{"instruction": "Say hi", "output": "hi"}]',
            "entry 0 ('Say hi') has no 'model_response'",
        ),
        (
            '[{"instruction": "a", "output": "b", "model_response": null}]',
            "'model_response' must be a string",
        ),
    ],
)
def test_wrong_shaped_responses_file_names_the_entry(tmp_path, capsys, content, message):
    path = tmp_path / "test_responses.json"
    path.write_text(content, encoding="utf-8")
    code = main(["evaluate", str(path), "--judge-url", "http://127.0.0.1:9", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert message in err and str(path) in err


def test_missing_file_and_bad_options(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope.json")]) == 2
    assert "responses file not found" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "x.json"), "--api", "openai"]) == 2
    assert "needs --judge-model" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "x.json"), "--judge-url", "localhost:11434"]) == 2
    assert "must start with http://" in capsys.readouterr().err


def test_endpoint_paths():
    assert Judge().endpoint == "http://localhost:11434/api/chat"
    assert Judge(url="http://h:1/api/chat").endpoint == "http://h:1/api/chat"
    assert Judge(api="openai", model="m").endpoint == "https://api.openai.com/v1/chat/completions"
    assert Judge(api="openai", model="m", url="http://h/v1/").endpoint == (
        "http://h/v1/chat/completions"
    )


# --- finetune-instruct --judge-url -----------------------------------------------------


def _instruct_data(tmp_path):
    """40 short records (4 of them test records in the 85/10/5 split)."""
    records = [
        {"instruction": f"Repeat the number {i}.", "input": "", "output": f"{i}"} for i in range(40)
    ]
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_finetune_instruct_scores_its_responses_with_evaluates_options(
    server, tmp_path, tiktoken_available, monkeypatch, capsys
):
    """The judge options are evaluate's (--api, --judge-model, --api-key-env): an
    OpenAI-compatible judge with a key scores the 2 responses written after training."""
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    server.models = {"judge-8b"}
    server.replies = {f"Repeat the number {i}.": str(2 * i) for i in range(40)}
    out = tmp_path / "run"
    code = main(
        [
            "finetune-instruct", "--model", "tiny", "--data", str(_instruct_data(tmp_path)),
            "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--num-responses", "2",
            "--max-new-tokens", "2", "--no-progress",
            "--api", "openai", "--judge-url", server.url, "--judge-model", "judge-8b",
            "--api-key-env", "MY_JUDGE_KEY",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    responses = out / "test_responses.json"
    entries = json.loads(responses.read_text(encoding="utf-8"))
    numbers = [int(e["instruction"].split()[-1].rstrip(".")) for e in entries]
    records = _scores(responses)
    assert len(entries) == 2 and [r["index"] for r in records] == [0, 1]
    assert [r["score"] for r in records] == [2 * n for n in numbers]
    assert all(r["judge"] == "judge-8b" for r in records)
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    assert server.requests[0]["messages"][0]["content"] == judge_prompt(entries[0])
    assert f"mean score {sum(numbers):.2f} over 2 of 2 entries" in printed  # (2a + 2b) / 2


def test_finetune_instruct_judge_options_fail_before_training(tmp_path, capsys):
    data = tmp_path / "missing.json"  # never read: the options fail first
    for extra, message in [
        (
            ("--api", "openai", "--judge-url", "http://127.0.0.1:9"),
            "--api openai needs --judge-model",
        ),
        (("--judge-model", "llama3.1"), "--judge-model applies with --judge-url only"),
        (("--judge-url", "localhost:11434"), "--judge-url must start with http://"),
    ]:
        code = main(["finetune-instruct", "--model", "tiny", "--data", str(data),
                     "--out", str(tmp_path / "run"), *extra])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and message in err and "missing.json" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_redirect_is_refused_and_the_key_goes_nowhere_else(server):
    """A 302 from the judge's address is not followed: the API key reaches only the host the
    user named, and the error says what happened."""
    with JudgeServer() as elsewhere:
        server.script = [("redirect", f"{elsewhere.url}/v1/chat/completions")]
        judge = _judge(server, api="openai", model="llama3", api_key="sk-test")
        with pytest.raises(JudgeError, match=r"redirect \(HTTP 302\) to http://127\.0\.0\.1"):
            judge.ask("score this")
        assert elsewhere.requests == [] and elsewhere.headers == []
    assert server.headers[0]["Authorization"] == "Bearer sk-test"


def test_the_timeout_bounds_the_whole_reply_not_each_read(server):
    """A server that trickles its reply (every read returns within the socket timeout) still
    fails the request once --timeout seconds have passed."""
    server.script = [("trickle", 0)] * 2
    judge = _judge(server, api="ollama", stream=False, timeout=0.5, retries=1)
    started = time.monotonic()
    with pytest.raises(JudgeError, match=r"failed 2 times; last: no answer within 0\.5 s"):
        judge.ask("hello")
    assert time.monotonic() - started < 4  # two tries of 0.5 s, not 2 x 6 s of trickle
