"""The fine-tuning commands end to end on tiny models: finetune-classify learns spam, classify
prints labels, finetune-instruct writes responses, LoRA works through both, and bad data fails
before any weights are loaded or any output is written."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastgpt.cli import main


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture
def spam_slice(tmp_path, data_dir):
    """The first 1200 lines of the SMS file (about 160 spam): enough to learn from quickly."""
    lines = (data_dir / "SMSSpamCollection").read_text(encoding="utf-8").split("\n")[:1200]
    path = tmp_path / "sms-slice.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_finetune_classify_learns_spam_then_classify(
    tmp_path, data_dir, tiktoken_available, capsys
):
    """A tiny model trained from scratch on the balanced spam data beats chance (50%) by far
    on the held-out test split."""
    out = tmp_path / "spam"
    rc = run_cli(
        "finetune-classify", "--model", "tiny", "--data", data_dir / "SMSSpamCollection",
        "--out", out, "--epochs", 1, "--batch-size", 32, "--lr", 3e-3, "--max-length", 32,
        "--trainable", "all", "--seed", 123,
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "1045 train, 149 validation, 300 test" in printed  # the book's balanced split
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"train", "validation", "test"}
    assert metrics["test"]["accuracy"] > 0.8, metrics
    labels = json.loads((out / "labels.json").read_text())
    assert labels["labels"] == ["ham", "spam"] and labels["label_to_id"] == {"ham": 0, "spam": 1}
    assert json.loads((out / "classifier.json").read_text())["max_length"] == 32

    texts = ["WINNER!! You have won a free prize worth 1000 cash. Call 09061701461 now", "ok"]
    assert run_cli("classify", "--model", out, *texts) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == 2
    from fastgpt.classification import classify_texts
    from fastgpt.model import GPTModel
    from fastgpt.tokenizer import get_tokenizer

    probs = classify_texts(GPTModel.from_pretrained(out), texts, get_tokenizer(), 32)
    for line, text, row in zip(lines, texts, probs.tolist(), strict=True):
        label, prob, shown = line.split("\t")
        assert shown == text
        assert label == ["ham", "spam"][max(range(2), key=row.__getitem__)]
        assert float(prob) == pytest.approx(max(row), abs=1e-4) and float(prob) >= 0.5


@pytest.mark.parametrize("merge", [False, True])
def test_finetune_classify_with_lora(tmp_path, spam_slice, tiktoken_available, capsys, merge):
    out = tmp_path / "lora"
    extra = ["--merge"] if merge else []
    rc = run_cli(
        "finetune-classify", "--model", "tiny", "--data", spam_slice, "--out", out,
        "--max-steps", 3, "--batch-size", 8, "--max-length", 32, "--lora-rank", 2, *extra,
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    d = 32  # tiny emb_dim: adapters 2 layers × 16·d·r, plus the new head d·2 + 2
    assert f"trainable {2 * 16 * d * 2 + d * 2 + 2:,} of" in printed
    assert (out / "adapter_config.json").exists() != merge  # PEFT's layout
    assert run_cli("classify", "--model", out, "free entry now") == 0
    label, prob, _ = capsys.readouterr().out.strip().split("\t")
    assert label in ("ham", "spam") and 0.5 <= float(prob) <= 1.0
    if merge:
        return
    # Fine-tuning further from this folder starts from the adapted model and its head (the
    # adapters folded in): with a vanishing learning rate it classifies exactly as before.
    further = tmp_path / "further"
    rc = run_cli(
        "finetune-classify", "--init", out, "--data", spam_slice, "--out", further,
        "--max-steps", 1, "--batch-size", 8, "--max-length", 32, "--lr", 1e-12,
        "--trainable", "head", "--no-checkpoint", "--no-progress",
    )  # fmt: skip
    assert rc == 0
    assert f"keeping the classifier head of {out}" in capsys.readouterr().out
    assert not (further / "lora.json").exists() and not (further / "adapter_config.json").exists()
    texts = ["free entry now", "see you at lunch"]
    assert run_cli("classify", "--model", out, "--all-probs", *texts) == 0
    before = capsys.readouterr().out
    assert run_cli("classify", "--model", further, "--all-probs", *texts) == 0
    assert capsys.readouterr().out == before


@pytest.mark.parametrize("trainable", ["head", "last-1"])
def test_finetune_classify_freezes_all_but_trainable(
    tmp_path, spam_slice, tiktoken_available, trainable
):
    """Frozen parameters come out bitwise equal to the fresh model's (same --seed), the trained
    ones changed: --trainable head trains only the new head, last-1 also the last block and
    the final LayerNorm (the default, as the book)."""
    from fastgpt.model import GPTModel
    from fastgpt.train.runner import ModelOptions, build_model

    out = tmp_path / trainable
    rc = run_cli(
        "finetune-classify", "--model", "tiny", "--data", spam_slice, "--out", out,
        "--max-steps", 2, "--batch-size", 8, "--max-length", 16, "--lr", 1e-2,
        "--trainable", trainable, "--seed", 5, "--no-checkpoint", "--no-progress",
    )  # fmt: skip
    assert rc == 0
    fresh = build_model(ModelOptions(model="tiny"), seed=5).state_dict()  # the runner's model
    trained = GPTModel.from_pretrained(out).state_dict()
    expected = {"final_norm.", "trf_blocks.1."} if trainable == "last-1" else set()
    for name, tensor in trained.items():
        if name.startswith("out_head."):
            assert tensor.shape[0] == 2  # the new classifier head
        elif name.startswith(tuple(expected)) and not name.endswith("bias"):
            assert not torch.equal(tensor, fresh[name]), f"{name} did not train"
        elif not name.startswith(tuple(expected)):
            assert torch.equal(tensor, fresh[name]), f"{name} changed but is frozen"


def test_finetune_classify_resumes_exactly_and_rank_0_alone_writes(
    tmp_path, spam_slice, tiktoken_available, monkeypatch
):
    args = [
        "finetune-classify", "--model", "tiny", "--data", spam_slice, "--batch-size", 8,
        "--max-length", 16, "--lr", 1e-2, "--no-progress", "--eval-every", 0,
        "--warmup-steps", 1, "--lr-decay-steps", 4,  # one schedule for 2 + 2 and 4 steps
    ]  # fmt: skip
    assert run_cli(*args, "--out", tmp_path / "straight", "--max-steps", 4) == 0
    assert run_cli(*args, "--out", tmp_path / "resumed", "--max-steps", 2) == 0
    assert run_cli(*args, "--out", tmp_path / "resumed", "--max-steps", 4, "--resume") == 0
    for name in ("metrics.json", "model.safetensors"):
        straight = (tmp_path / "straight" / name).read_bytes()
        assert (tmp_path / "resumed" / name).read_bytes() == straight, name

    # Under torchrun every rank trains; only rank 0 evaluates and writes the results.
    monkeypatch.setattr("fastgpt.train.runner.is_main_process", lambda: False)
    other = tmp_path / "rank1"
    assert run_cli(*args, "--out", other, "--max-steps", 1, "--no-checkpoint") == 0
    assert not any((other / name).exists() for name in ("model.safetensors", "metrics.json"))


def test_finetune_instruct_end_to_end(tmp_path, data_dir, tiktoken_available, capsys):
    records = json.loads((data_dir / "instruction-data.json").read_text(encoding="utf-8"))[:40]
    data = tmp_path / "slice.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "instruct"
    rc = run_cli(
        "finetune-instruct", "--model", "tiny", "--data", data, "--out", out,
        "--max-steps", 3, "--batch-size", 4, "--mask-prompt", "--max-new-tokens", 4,
        "--lora-rank", 2, "--merge",
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "34 train, 4 test, 2 validation" in printed
    responses = json.loads((out / "test_responses.json").read_text(encoding="utf-8"))
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in responses] == [
        {k: r[k] for k in ("instruction", "input", "output")} for r in records[34:38]
    ]
    assert all(isinstance(r["model_response"], str) for r in responses)
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["validation_loss"])
    assert metrics["validation_perplexity"] == pytest.approx(math.exp(metrics["validation_loss"]))
    assert "perplexity" in printed

    from fastgpt.model import GPTModel

    model = GPTModel.from_pretrained(out)  # merged: a plain model
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 50257)


SPAM_ERRORS = [
    ("sms.txt", "ham\thello\nno tab on this line\n", "sms.txt:2: expected 'label<TAB>text'"),
    ("sms.txt", "ham\thello\nspam\tbuy\nHAM\tcaps\n", "sms.txt:3: label 'HAM' is not one of"),
    ("sms.txt", "ham\ta\nspam\tb\nham\tc\n", "split is empty"),
    ("d.csv", "message,label\nhi,a\n", "no text column 'text'"),
]
INSTRUCT_ERRORS = [
    ("d.json", '[\n{"instruction": "a", "output": "b"},\n{"output" "c"}\n]',
     "d.json:3:11: malformed"),
    ("d.json", '[{"instruction": "a", "output": "b"}, {"instruction": "x"}]',
     "record 1 has no 'output'"),
    ("d.json", '[{"instruction": "a", "output": "b"}]', "split is empty"),
    ("d.json", " \n", "d.json: empty file, expected a JSON list of records"),
]  # fmt: skip


@pytest.mark.parametrize(
    "command, name, content, message",
    [("finetune-classify", *case) for case in SPAM_ERRORS]
    + [("finetune-instruct", *case) for case in INSTRUCT_ERRORS],
)
def test_bad_data_fails_before_loading_weights(tmp_path, capsys, command, name, content, message):
    data = tmp_path / name
    data.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    # --init names a checkpoint that does not exist: had it been touched, the error would say so.
    rc = run_cli(command, "--init", tmp_path / "no-such-checkpoint", "--data", data, "--out", out)
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err
    assert "no-such-checkpoint" not in err
    assert not out.exists()  # nothing half-written


def test_max_length_errors(tmp_path, capsys, tiktoken_available):
    records = [{"instruction": f"task {i}", "input": "", "output": "done"} for i in range(20)]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "out"
    # Every prompt is longer than --max-length: found before any weights are loaded.
    rc = run_cli("finetune-instruct", "--init", tmp_path / "no-such", "--data", data,
                 "--out", out, "--max-length", 8)  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--max-length 8: no record fits" in err and "no-such" not in err
    # A plain line naming the split, not a Python warning quoting our source.
    assert "fastgpt finetune-instruct: warning: training split: dropped 17 of 17 records" in err
    assert "UserWarning" not in err
    # A --max-length beyond the model's context is an error, not silently cut.
    rc = run_cli("finetune-instruct", "--model", "tiny", "--data", data, "--out", out,
                 "--max-length", 65)  # fmt: skip
    assert rc == 2 and "--max-length 65 > the model's context 64" in capsys.readouterr().err
    sms = tmp_path / "sms.txt"
    sms.write_text("".join(f"{'ham' if i % 2 else 'spam'}\ttext {i}\n" for i in range(20)))
    rc = run_cli("finetune-classify", "--model", "tiny", "--data", sms, "--out", out,
                 "--max-length", 65)  # fmt: skip
    assert rc == 2 and "--max-length 65 > the model's context 64" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command", ["finetune-classify", "finetune-instruct"])
def test_a_vocabulary_too_small_for_the_data_is_one_line(
    tmp_path, capsys, tiktoken_available, command
):
    """A fresh --model whose vocab_size is below GPT-2 BPE's: refused before training, as the
    loop would otherwise fail at its first step."""
    from fastgpt.model_config import GPTConfig

    small = tmp_path / "small.json"
    small.write_text(json.dumps({**GPTConfig.from_name("tiny").to_dict(), "vocab_size": 100}))
    if command == "finetune-classify":
        data = tmp_path / "sms.txt"
        data.write_text("".join(f"{'ham' if i % 2 else 'spam'}\ttext {i}\n" for i in range(20)))
    else:
        data = tmp_path / "d.json"
        records = [{"instruction": f"task {i}", "input": "", "output": "done"} for i in range(20)]
        data.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "out"
    rc = run_cli(command, "--model", small, "--data", data, "--out", out, "--no-progress")
    err = capsys.readouterr().err
    assert rc == 2 and "token id 50256, but the model's vocab_size is 100" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_missing_data_file_and_bad_options(tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli(
        "finetune-classify", "--model", "tiny", "--data", tmp_path / "nope.txt", "--out", out
    )
    assert rc == 2 and "not found" in capsys.readouterr().err
    rc = run_cli("finetune-instruct", "--model", "tiny", "--data", tmp_path, "--out", out)
    assert rc == 2 and f"--data {tmp_path} is a folder: give one file" in capsys.readouterr().err
    (tmp_path / "taken").write_text("")
    rc = run_cli("finetune-classify", "--model", "tiny", "--out", tmp_path / "taken")
    assert rc == 2 and "taken is a file, not a folder" in capsys.readouterr().err
    rc = run_cli("finetune-instruct", "--model", "tiny", "--out", out, "--merge")
    assert rc == 2 and "--merge needs --lora-rank" in capsys.readouterr().err
    rc = run_cli("finetune-classify", "--model", "tiny", "--out", out, "--lr", 0)
    assert rc == 2 and "lr must be > 0" in capsys.readouterr().err
    assert not out.exists()
    rc = run_cli("classify", "--model", tmp_path, "text")
    assert rc == 2 and "labels.json" in capsys.readouterr().err
    rc = run_cli("classify", "--model", tmp_path, "--device", "tpu", "text")
    err = capsys.readouterr().err
    assert rc == 2 and "--device 'tpu' is not a device" in err and "cannot load" not in err


def test_language_model_commands_refuse_a_classifier(tmp_path, capsys, tiktoken_available):
    """generate, pretrain --init and finetune-instruct --init given a classifier's folder: a
    clear error (was: '!"!"' generated, or a cross-entropy traceback)."""
    from fastgpt.classification import replace_head
    from fastgpt.model import GPTModel
    from fastgpt.model_config import GPTConfig

    model = GPTModel(GPTConfig.from_name("tiny"), backend="torch")
    replace_head(model, 2)
    spam = tmp_path / "spam"
    model.save_pretrained(spam)
    story = tmp_path / "story.txt"
    story.write_text("Once upon a time there was a model. " * 20, encoding="utf-8")
    out = tmp_path / "out"
    for argv in (
        ["generate", "--model", spam, "--prompt", "Hello"],
        ["pretrain", "--init", spam, "--data", story, "--context-length", 16, "--out", out],
        ["finetune-instruct", "--init", spam, "--out", out],
    ):
        assert run_cli(*argv) == 2
        assert f"{spam} is a classifier (2 outputs" in capsys.readouterr().err
    assert not out.exists()


def test_one_class_data_warns_or_says_which_class(tmp_path, capsys, tiktoken_available):
    data = tmp_path / "SMSSpamCollection"  # the SMS format: labels ham and spam, only ham here
    data.write_text("".join(f"ham\tmessage number {i}\n" for i in range(40)), "utf-8")
    common = ["finetune-classify", "--model", "tiny", "--data", data, "--no-progress"]
    rc = run_cli(*common, "--out", tmp_path / "balanced")
    err = capsys.readouterr().err
    assert rc == 2 and "only one class present (ham; labels ['ham', 'spam'])" in err
    rc = run_cli(*common, "--no-balance", "--max-steps", 1, "--out", tmp_path / "unbalanced")
    assert rc == 0
    assert "the training split holds one class only (ham)" in capsys.readouterr().err


def test_corrupt_labels_file_is_named(tmp_path, capsys):
    (tmp_path / "labels.json").write_text('{"labels": ["ham",}')
    assert run_cli("classify", "--model", tmp_path, "text") == 2
    assert f"{tmp_path / 'labels.json'}:1: malformed JSON" in capsys.readouterr().err
