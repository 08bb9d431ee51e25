"""`fastgpt pretrain` end to end on CPU: a tiny model memorizes a slice of the-verdict.txt,
writes its files and resumes; --help; the default corpus; bad data fails before any model is
built and writes nothing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastgpt.cli import main
from fastgpt.model_config import GPTConfig
from fastgpt.train.checkpoint import CHECKPOINT_NAME
from fastgpt.train.metrics import METRICS_NAME, PLOT_NAME, read_metrics


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("pretrain", "--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--data", "--model", "--init", "--out", "--max-steps", "--epochs",
                   "--batch-size", "--context-length", "--stride", "--val-fraction", "--lr",
                   "--warmup-steps", "--eval-every", "--grad-accum", "--seed", "--resume",
                   "--save-every", "--document-mask"):  # fmt: skip
        assert option in text, option
    assert "default 256" in text  # defaults are stated


def test_tiny_model_memorizes_text_then_resumes(tmp_path, data_dir, tiktoken_available, capsys):
    """Training loss falls from about ln(50257) = 10.8 to below 1 (the book gets there after
    10 epochs): its first 340 tokens, 120 steps of 4 windows of 32 tokens, on CPU in seconds."""
    text = (data_dir / "the-verdict.txt").read_text(encoding="utf-8")[:1500]
    data = tmp_path / "verdict-start.txt"
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    rc = run_cli(
        "pretrain", "--data", data, "--model", "tiny", "--context-length", 32, "--out", out,
        "--max-steps", 120, "--batch-size", 4, "--lr", 1e-2, "--warmup-steps", 5,
        "--eval-every", 60, "--log-every", 10, "--sample-tokens", 8, "--no-progress",
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "model saved to" in printed and "sample:" in printed
    records = read_metrics(out / METRICS_NAME)
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 12
    assert losses[-1] < 1.0 and losses[-1] < 0.4 * math.log(50257), losses
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [60, 120] and all(r["sample"] for r in evals)
    assert all(math.isfinite(r["val_loss"]) for r in evals)
    for name in (METRICS_NAME, PLOT_NAME, CHECKPOINT_NAME, "config.json", "model.safetensors"):
        assert (out / name).is_file(), name

    # The saved model has learned the text: greedy decoding continues it.
    from fastgpt.generation import generate
    from fastgpt.model import GPTModel
    from fastgpt.tokenizer import get_tokenizer

    model = GPTModel.from_pretrained(out)
    ids = get_tokenizer().encode(text)[:24]
    prompt = torch.tensor([ids[:8]])
    continued = generate(model, prompt, 16)[0, 8:].tolist()
    matches = sum(a == b for a, b in zip(continued, ids[8:24], strict=True))
    assert matches >= 8, (continued, ids[8:24])

    rc = run_cli(
        "pretrain", "--data", data, "--model", "tiny", "--context-length", 32, "--out", out,
        "--max-steps", 123, "--batch-size", 4, "--lr", 1e-2, "--resume", "--no-progress",
        "--eval-every", 0, "--sample-prompt", "",
    )  # fmt: skip
    assert rc == 0
    assert "resuming at step 120" in capsys.readouterr().out
    records = read_metrics(out / METRICS_NAME)
    assert records[-1]["step"] == 123
    assert torch.load(out / CHECKPOINT_NAME, weights_only=False)["step"] == 123


def test_default_corpus_is_the_verdict(tmp_path, data_dir, tiktoken_available, capsys):
    out = tmp_path / "run"
    rc = run_cli("pretrain", "--model", "tiny", "--context-length", 64, "--stride", 32,
                 "--out", out, "--max-steps", 2, "--batch-size", 2, "--no-progress",
                 "--sample-prompt", "")  # fmt: skip
    assert rc == 0
    # 5145 tokens: 4630 train -> ceil((4630 - 64) / 32) = 143 windows of 64 starting every
    # 32 tokens, 515 validation -> ceil((515 - 64) / 32) = 15
    assert "143 training and 15 validation windows of 64 tokens" in capsys.readouterr().out


def test_default_corpus_offline_says_how_to_pass_a_file(tmp_path, monkeypatch, capsys):
    import fastgpt.download

    def offline(name):
        raise FileNotFoundError(f"could not download {name}")

    monkeypatch.setattr(fastgpt.download, "fetch", offline)
    rc = run_cli("pretrain", "--model", "tiny", "--out", tmp_path / "out")
    assert rc == 2
    assert "--data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, context, message",
    [
        ("", 32, "empty.txt: empty file"),
        ("Just a handful of words.", 32, "has 6 tokens, fewer than one training window of"),
        ("word " * 40, 32, "validation part"),
    ],
)
def test_bad_data_is_a_clear_error(tmp_path, tiktoken_available, capsys, content, context, message):
    data = tmp_path / "empty.txt"
    data.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    # --init names a checkpoint that does not exist: the data error must come first.
    rc = run_cli("pretrain", "--data", data, "--init", tmp_path / "no-such-checkpoint",
                 "--context-length", context, "--out", out)  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "no-such-checkpoint" not in err
    assert not out.exists()


def test_bad_options_and_missing_files(tmp_path, tiktoken_available, capsys):
    out = tmp_path / "out"
    assert run_cli("pretrain", "--data", tmp_path / "nope.txt", "--out", out) == 2
    assert "data file not found" in capsys.readouterr().err
    assert run_cli("pretrain", "--context-length", 0, "--out", out) == 2
    assert "--context-length must be >= 1" in capsys.readouterr().err
    assert run_cli("pretrain", "--val-fraction", 1.5, "--out", out) == 2
    assert "--val-fraction" in capsys.readouterr().err
    assert run_cli("pretrain", "--batch-size", 0, "--out", out) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err  # the flag, not the field
    assert run_cli("pretrain", "--betas", 1.5, 0.9, "--out", out) == 2  # before any work
    assert "--betas must be two numbers in [0, 1), got [1.5, 0.9]" in capsys.readouterr().err

    data = tmp_path / "story.txt"
    data.write_text("Once upon a time there was a model. " * 40, encoding="utf-8")
    rc = run_cli("pretrain", "--data", data, "--init", tmp_path / "missing-ckpt",
                 "--context-length", 16, "--out", out)  # fmt: skip
    assert rc == 2 and "missing-ckpt" in capsys.readouterr().err
    rc = run_cli("pretrain", "--data", data, "--model", "tiny", "--context-length", 16,
                 "--batch-size", 64, "--out", out)  # fmt: skip
    assert rc == 2 and "fewer than one optimizer step" in capsys.readouterr().err
    small_vocab = tmp_path / "small.json"
    small_vocab.write_text(json.dumps({**GPTConfig.from_name("tiny").to_dict(), "vocab_size": 100}))
    rc = run_cli("pretrain", "--data", data, "--model", small_vocab, "--context-length", 16,
                 "--out", out)  # fmt: skip
    assert rc == 2 and "vocab_size is 100" in capsys.readouterr().err
    assert not (out / CHECKPOINT_NAME).exists()


def test_a_config_files_context_length_stands_unless_the_flag_is_given(
    tmp_path, tiktoken_available, capsys
):
    """--model my.json whose context_length is 32 trains on 32-token windows (the default
    --context-length 256 does not override what the user wrote); an explicit flag does."""
    data = tmp_path / "story.txt"
    data.write_text("Once upon a time there was a model that learned. " * 60, encoding="utf-8")
    spec = tmp_path / "my.json"
    spec.write_text(json.dumps({**GPTConfig.from_name("tiny").to_dict(), "context_length": 32}))
    for flag, context in (((), 32), (("--context-length", 16), 16)):
        out = tmp_path / f"run{context}"
        rc = run_cli("pretrain", "--data", data, "--model", spec, *flag, "--out", out,
                     "--max-steps", 1, "--batch-size", 2, "--no-progress", "--sample-prompt", "",
                     "--eval-every", 0)  # fmt: skip
        assert rc == 0
        assert f"validation windows of {context} tokens" in capsys.readouterr().out
        saved = json.loads((out / "config.json").read_text())
        assert saved["context_length"] == context
