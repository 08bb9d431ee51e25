"""A run never destroys another: an --out holding a run is refused unless resumed or
overwritten; an overwriting or resumed run that fails or is stopped leaves the earlier run's
files byte-identical; --resume that cannot continue says why; an --out that cannot be written
is one line before any work. On the tiny model and a short text, through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastgpt.losses
from fastgpt.cli import main
from fastgpt.train.checkpoint import CHECKPOINT_NAME
from fastgpt.train.metrics import METRICS_NAME, RUN_RECORD_NAME, read_metrics

TINY = ("--model", "tiny", "--context-length", 16, "--batch-size", 2, "--no-progress",
        "--sample-prompt", "", "--eval-every", 0, "--log-every", 1)  # fmt: skip


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture
def story(tmp_path, tiktoken_available):
    path = tmp_path / "story.txt"
    path.write_text("Once upon a time there was a small model that learned. " * 30, "utf-8")
    return path


@pytest.fixture
def earlier_run(tmp_path, story):
    """A finished pretraining run in tmp_path/run and the bytes of each of its files."""
    out = tmp_path / "run"
    assert run_cli("pretrain", "--data", story, *TINY, "--out", out, "--max-steps", 3) == 0
    return out, snapshot(out)


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(out) -> list:
    """Staging folders left in `out` (an --overwrite run's, see train/out_folder)."""
    return sorted(out.glob(".overwrite-*"))


def test_another_runs_folder_is_refused_before_any_work(earlier_run, capsys):
    out, before = earlier_run
    capsys.readouterr()
    rc = run_cli("finetune-classify", "--model", "tiny", "--out", out, "--data", "missing.tsv")
    err = capsys.readouterr().err
    assert rc == 2 and f"--out {out} holds another run" in err
    assert "--resume" in err and "--overwrite" in err and "checkpoint.pt" in err
    assert "missing.tsv" not in err  # refused before the data was even looked at
    assert snapshot(out) == before


def test_a_failing_overwrite_leaves_the_earlier_run_byte_identical(earlier_run, story, capsys):
    out, before = earlier_run
    # A learning rate of 1e30 blows the weights up at the first step: step 2 is non-finite.
    rc = run_cli("pretrain", "--data", story, *TINY, "--out", out, "--max-steps", 5,
                 "--overwrite", "--lr", 1e30, "--grad-clip", 0, "--warmup-steps", 0)  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "non-finite" in err and "start again" in err  # no checkpoint to resume
    assert snapshot(out) == before and leftovers(out) == []


def ctrl_c_at_loss(monkeypatch, n: int) -> list:
    """Make the n-th training loss computed from now on raise KeyboardInterrupt, as Ctrl-C in
    the middle of a step would. Returns the list of calls (cleared: counted anew)."""
    real_loss, calls = fastgpt.losses.next_token_loss, []

    def loss_then_ctrl_c(model, batch):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_loss(model, batch)

    monkeypatch.setattr(fastgpt.losses, "next_token_loss", loss_then_ctrl_c)
    return calls


def test_an_interrupted_run_leaves_the_earlier_run_byte_identical(
    earlier_run, story, capsys, monkeypatch
):
    out, before = earlier_run
    calls = ctrl_c_at_loss(monkeypatch, 2)
    for extra in (("--overwrite",), ("--resume", "--max-steps", 50)):
        calls.clear()
        assert run_cli("pretrain", "--data", story, *TINY, "--out", out, *extra) == 130
        assert snapshot(out) == before, extra
        assert leftovers(out) == []
    assert "interrupted" in capsys.readouterr().err


def test_overwrite_replaces_the_run_once_it_has_its_own_files(earlier_run, story):
    out, before = earlier_run
    assert run_cli("pretrain", "--data", story, *TINY, "--out", out, "--max-steps", 2,
                   "--overwrite") == 0  # fmt: skip
    records = read_metrics(out / METRICS_NAME)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert snapshot(out)[CHECKPOINT_NAME] != before[CHECKPOINT_NAME]
    assert not (out / (METRICS_NAME + ".partial")).exists() and leftovers(out) == []


def test_resume_that_cannot_continue_says_why(tmp_path, earlier_run, story, capsys):
    out, before = earlier_run
    capsys.readouterr()
    rc = run_cli("pretrain", "--data", story, *TINY, "--out", out, "--max-steps", 2, "--resume")
    err = capsys.readouterr().err
    assert rc == 2 and "holds step 3, and this run ends at step 2" in err
    rc = run_cli("pretrain", "--data", story, *TINY, "--out", out, "--max-steps", 9, "--resume",
                 "--context-length", 8)  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "is of another run" in err and len(err) < 400
    assert snapshot(out) == before
    rc = run_cli("pretrain", "--data", story, *TINY, "--out", out, "--resume", "--overwrite")
    assert rc == 2 and "exclude each other" in capsys.readouterr().err
    # A file that is not a checkpoint: found inside the loop, still one line of bad input.
    notes, other = tmp_path / "notes.txt", tmp_path / "other.pt"
    notes.write_text("garbage\n")
    torch.save({"step": 3}, other)
    for path, message in ((notes, "cannot read it as a training checkpoint"),
                          (other, "is not a fastgpt training checkpoint")):  # fmt: skip
        rc = run_cli("pretrain", "--data", story, *TINY, "--out", out, "--resume", path)
        err = capsys.readouterr().err
        assert rc == 2 and f"{path}" in err and message in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert snapshot(out) == before


# `python -m fastgpt` with a programming error planted in the training step: a real one, an
# unpacking of too many values, in a function the traceback must name.
PLANTED_BUG = """
import runpy

from fastgpt.train.loop import Trainer


def planted_train_step(self, micro_batches):
    loss, grad_norm = (1.0, 2.0, 3.0)
    return loss, grad_norm


Trainer._train_step = planted_train_step
runpy.run_module("fastgpt", run_name="__main__")
"""


def test_a_bug_inside_the_training_loop_is_a_traceback_not_bad_input(tmp_path, story):
    """An error of the code inside the loop ends the command as Python ends it (the traceback,
    exit status 1), not as one line of bad input with exit status 2 that hides where it is."""
    argv = ["pretrain", "--data", story, *TINY, "--out", tmp_path / "run", "--max-steps", 2]
    done = subprocess.run(
        [sys.executable, "-c", PLANTED_BUG, *map(str, argv)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    err = done.stderr
    assert done.returncode == 1, err
    assert "Traceback (most recent call last)" in err and "in planted_train_step" in err, err
    assert "ValueError: too many values to unpack" in err
    assert "error: too many values" not in err


@pytest.mark.parametrize("command", ["pretrain", "finetune-classify", "finetune-instruct"])
def test_an_out_that_cannot_be_written_is_one_line(tmp_path, story, capsys, command):
    # Data the fine-tunings would refuse (a missing file): the --out check comes first.
    data = story if command == "pretrain" else tmp_path / "missing-data.json"
    args = (command, "--data", data, *(TINY if command == "pretrain" else ("--model", "tiny")))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc = run_cli(*args, "--out", blocker / "run")
    err = capsys.readouterr().err
    assert rc == 2 and "is a file, not a folder" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "missing-data" not in err
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        rc = run_cli(*args, "--out", locked / "run")
        assert rc == 2 and "cannot write in" in capsys.readouterr().err
    rc = run_cli(*args, "--out", "/proc/fastgpt-run")
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write in /proc" in err and "missing-data" not in err


def test_overwrite_removes_the_earlier_runs_files_it_did_not_write(earlier_run, story, capsys):
    """Once the new run has completed, nothing of the earlier one is left beside it: no old
    checkpoint.pt that a later --resume would continue, no classifier's labels.json."""
    out, before = earlier_run
    (out / "labels.json").write_text('["ham", "spam"]\n')  # as a classifier run leaves it
    capsys.readouterr()
    assert run_cli("pretrain", "--data", story, *TINY, "--out", out, "--max-steps", 2,
                   "--overwrite", "--no-checkpoint", "--no-plot") == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "removed the earlier run's checkpoint.pt, loss.png, labels.json" in printed
    after = snapshot(out)
    hf_files = {"generation_config.json", "vocab.json", "merges.txt", "tokenizer_config.json"}
    assert set(after) == {METRICS_NAME, RUN_RECORD_NAME, "model.safetensors", "config.json",
                          *hf_files}  # fmt: skip
    assert all(after[name] != before[name] for name in (METRICS_NAME, "model.safetensors"))
    assert [r["step"] for r in read_metrics(out / METRICS_NAME) if r["kind"] == "train"] == [1, 2]
    rc = run_cli("pretrain", "--data", story, *TINY, "--out", out, "--max-steps", 4, "--resume")
    assert rc == 2 and "no checkpoint at" in capsys.readouterr().err  # not the old step 3


def test_a_run_that_is_not_overwriting_removes_nothing(earlier_run, story):
    out, before = earlier_run
    assert run_cli("pretrain", "--data", story, *TINY, "--out", out, "--max-steps", 5,
                   "--resume", "--no-plot") == 0  # fmt: skip
    after = snapshot(out)
    assert set(after) == set(before)  # loss.png of the resumed run stays, though not rewritten
    assert after["loss.png"] == before["loss.png"]


def test_divergence_warns_once_after_warmup(tmp_path, capsys):
    """Losses past 2x the first one count only after warmup, and warn once: one "warning"
    record in metrics.jsonl and one stderr line, however long the loss stays up."""
    from tqdm.auto import tqdm

    from fastgpt.train.metrics import DivergenceWatch, MetricsLog

    metrics = MetricsLog(tmp_path, enabled=True)
    metrics.open(keep_up_to=None)
    watch, bar = DivergenceWatch(warmup_steps=2, window=1), tqdm(disable=True)
    losses = [10.0, 25.0, 20.0, 19.0, 21.0, 30.0, 1e18]  # step 2: in warmup; 20 = 2x: not past
    for step, loss in enumerate(losses, start=1):
        watch.check(step, loss, metrics, bar)
        metrics.log({"kind": "train", "step": step, "loss": loss})
    metrics.close()
    warnings = [r for r in read_metrics(tmp_path / METRICS_NAME) if r["kind"] == "warning"]
    assert [r["step"] for r in warnings] == [5]
    assert "21" in warnings[0]["message"] and "diverging" in warnings[0]["message"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: step 5:") and "--lr" in err[0]


def test_divergence_is_judged_on_means_not_one_noisy_batch(tmp_path, capsys):
    """A classifier's loss on batches of two examples jumps from 0.59 to 1.24 and back without
    diverging: no warning. A loss that stays up does warn, naming the window's mean."""
    from tqdm.auto import tqdm

    from fastgpt.train.metrics import DivergenceWatch, MetricsLog

    metrics = MetricsLog(tmp_path, enabled=False)
    noisy = [0.59, 0.7, 0.4, 1.24, 0.5, 0.62, 0.3, 1.3, 0.45, 0.6] * 6
    watch = DivergenceWatch(warmup_steps=2, window=10)
    for step, loss in enumerate(noisy, start=1):
        watch.check(step, loss, metrics, tqdm(disable=True))
    assert not watch.warned
    for step, loss in enumerate([5.0] * 10, start=len(noisy) + 1):
        watch.check(step, loss, metrics, tqdm(disable=True))
    assert watch.warned
