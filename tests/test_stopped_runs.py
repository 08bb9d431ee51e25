"""Runs that stop, fail or are killed: SIGINT/SIGTERM saves a checkpoint at the step reached
and says how to continue; an --overwrite run that is stopped, fails or finds the disk full
leaves the earlier run byte-identical and no staging folder; what a killed process left is
removed when the next run starts; the first log line after --resume covers the same steps as
without the stop. On the tiny model, through the CLI (in a subprocess where a signal or a file
size limit is needed). A failed evaluate's scores file: tests/test_response_scoring.py."""

from __future__ import annotations

import json
import re
import resource
import signal
import subprocess
import sys
import time

import pytest

import fastgpt.instruction
import fastgpt.losses
from fastgpt.train.checkpoint import CHECKPOINT_NAME, Checkpointer
from fastgpt.train.metrics import METRICS_NAME, read_metrics
from fastgpt.train.out_folder import MOVE_LIST_NAME, remove_leftovers, staging_folder
from tests import test_run_safety
from tests.test_run_safety import TINY, ctrl_c_at_loss, leftovers, run_cli, snapshot

story, earlier_run = test_run_safety.story, test_run_safety.earlier_run  # the same fixtures

FOREVER = ("--max-steps", 100000)  # a run that only a signal ends


def start_cli(*argv, cwd=None, file_size_limit: int | None = None) -> subprocess.Popen:
    """`python -m fastgpt ARGV` started; with file_size_limit, every file it writes is limited
    to that many bytes (a write past it fails with EFBIG, as on a full disk)."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal kills the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.Popen(
        [sys.executable, "-m", "fastgpt", *map(str, argv)], cwd=cwd, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=limit_file_size if file_size_limit else None,
    )  # fmt: skip


def wait_for_step(metrics, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until `metrics` (a metrics.jsonl being written) logs a training step >= `step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended first: {process.communicate()}")
        try:
            steps = [r["step"] for r in read_metrics(metrics) if r["kind"] == "train"]
        except ValueError:  # a line half written
            steps = []
        if steps and max(steps) >= step:
            return
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"no step {step} in {metrics} after {timeout} s")


def stop(process: subprocess.Popen, signum: int) -> str:
    """Send `signum`; the last line of what the process wrote to stderr."""
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_saves_a_checkpoint_where_the_run_is(tmp_path, story, signum, status, capsys):
    """A first run (default --save-every: nothing saved yet) stopped by Ctrl-C or SIGTERM
    saves checkpoint.pt at the step it reached; --resume continues from there, given the same
    data file by another name (relative, then absolute)."""
    out = tmp_path / "run"
    process = start_cli("pretrain", "--data", story.name, *TINY, "--out", out, *FOREVER,
                        cwd=tmp_path)  # fmt: skip
    wait_for_step(out / METRICS_NAME, 2, process)
    last = stop(process, signum)
    assert process.returncode == status
    found = re.fullmatch(r"fastgpt pretrain: stopped at step (\d+); continue with --resume", last)
    assert found, last
    step = int(found[1])
    assert Checkpointer.read(out / CHECKPOINT_NAME)["step"] == step
    assert max(r["step"] for r in read_metrics(out / METRICS_NAME)) == step
    killed_write = out / f"{CHECKPOINT_NAME}.tmp{dead_pid()}"  # a SIGKILL mid-write leaves it
    killed_write.write_bytes(b"torn")
    capsys.readouterr()
    rc = run_cli("pretrain", "--data", story, *TINY, "--out", out, "--max-steps", step + 1,
                 "--resume")  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert f"resuming at step {step}" in capsys.readouterr().out
    assert not killed_write.exists()


def test_a_stopped_overwrite_run_leaves_the_earlier_run_byte_identical(earlier_run, story):
    out, before = earlier_run
    process = start_cli("pretrain", "--data", story, *TINY, "--out", out, *FOREVER,
                        "--overwrite")  # fmt: skip
    wait_for_step(staging_folder(out, process.pid) / METRICS_NAME, 2, process)
    assert snapshot(out) == before  # while it runs
    last = stop(process, signal.SIGINT)
    assert process.returncode == 130
    assert re.fullmatch(
        rf"fastgpt pretrain: stopped at step \d+; the earlier run in {out} stays as it was", last
    ), last
    assert snapshot(out) == before and leftovers(out) == []


@pytest.mark.parametrize("what, extra", [(CHECKPOINT_NAME, ()),
                                         ("model.safetensors", ("--no-checkpoint",))])  # fmt: skip
def test_a_full_disk_says_so_and_leaves_the_earlier_run(earlier_run, story, what, extra):
    """A file size limit of 1 MB: metrics.jsonl and loss.png fit, the checkpoint (19 MB) and
    the model (6 MB) do not."""
    out, before = earlier_run
    process = start_cli("pretrain", "--data", story, *TINY, "--out", out, "--max-steps", 2,
                        "--overwrite", *extra, file_size_limit=2**20)  # fmt: skip
    _, err = process.communicate(timeout=600)
    assert process.returncode == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    staged = staging_folder(out, process.pid)
    assert f"error: disk full: cannot write {staged / what} (file too large)" in err
    assert snapshot(out) == before and leftovers(out) == []


def test_finetune_instruct_stopped_while_generating_leaves_the_earlier_run(
    tmp_path, data_dir, tiktoken_available, monkeypatch, capsys
):
    records = json.loads((data_dir / "instruction-data.json").read_text(encoding="utf-8"))[:40]
    data, out = tmp_path / "slice.json", tmp_path / "instruct"
    data.write_text(json.dumps(records), encoding="utf-8")
    args = ("finetune-instruct", "--model", "tiny", "--data", data, "--out", out,
            "--max-steps", 1, "--batch-size", 4, "--max-new-tokens", 2, "--num-responses", 1,
            "--no-progress")  # fmt: skip
    assert run_cli(*args) == 0
    before = snapshot(out)
    assert "test_responses.json" in before

    real_generate = fastgpt.instruction.generate_responses

    def ctrl_c_in_finish(*args, **kwargs):  # the samples during training are generated too
        if sys._getframe(1).f_code.co_name == "finish":  # the model is saved by now
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(fastgpt.instruction, "generate_responses", ctrl_c_in_finish)
    assert run_cli(*args, "--overwrite", "--seed", 7) == 130  # another model
    assert "interrupted" in capsys.readouterr().err
    assert snapshot(out) == before and leftovers(out) == []


def test_the_first_log_line_after_resume_covers_the_steps_before_the_stop(
    tmp_path, story, monkeypatch
):
    """Logged every 3 steps, saved every 2, stopped during step 3: the resumed run's line at
    step 3 is the mean of steps 1-3, as without the stop (the checkpoint holds the sums)."""
    args = ("pretrain", "--data", story, *TINY, "--max-steps", 6, "--log-every", 3,
            "--save-every", 2)  # fmt: skip
    assert run_cli(*args, "--out", tmp_path / "straight") == 0
    real_loss = fastgpt.losses.next_token_loss
    ctrl_c_at_loss(monkeypatch, 3)
    assert run_cli(*args, "--out", tmp_path / "stopped") == 130
    monkeypatch.setattr(fastgpt.losses, "next_token_loss", real_loss)
    assert run_cli(*args, "--out", tmp_path / "stopped", "--resume") == 0

    def logged(out):
        return {r["step"]: r["loss"] for r in read_metrics(out / METRICS_NAME)
                if r["kind"] == "train"}  # fmt: skip

    assert logged(tmp_path / "stopped") == logged(tmp_path / "straight")


def test_leftovers_of_killed_processes_are_removed_or_finished(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    gone, live = dead_pid(), subprocess.Popen([sys.executable, "-c", "input()"],
                                              stdin=subprocess.PIPE)  # fmt: skip
    try:
        names = (f"checkpoint.pt.tmp{gone}", f"loss.tmp{gone}.png",
                 f"checkpoint.pt.tmp{live.pid}", f"notes.tmp{gone}", "labels.json")  # fmt: skip
        for name in names:
            (out / name).write_text(name)
        torn = staging_folder(out, gone)  # killed while training: removed
        torn.mkdir()
        (torn / "metrics.jsonl").write_text("{}\n")
        moving = staging_folder(out, dead_pid())  # killed while moving in: finished
        moving.mkdir()
        (moving / "model.safetensors").write_text("new")
        (moving / MOVE_LIST_NAME).write_text(json.dumps(["labels.json"]))
        running = staging_folder(out, live.pid)
        running.mkdir()
        remove_leftovers(out)
        names = sorted(p.name for p in out.iterdir())
        assert names == sorted([f"checkpoint.pt.tmp{live.pid}", f"notes.tmp{gone}",
                                "model.safetensors", running.name])  # fmt: skip
        assert (out / "model.safetensors").read_text() == "new"
        assert leftovers(out) == [running]
    finally:
        live.kill()
        live.wait()
