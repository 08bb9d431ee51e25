"""Files and settings a user was handed: nothing in them is executed or read beyond the folder
it belongs to (a checkpoint.pt whose pickle would run code, a corpus manifest naming
../secret.txt), and a damaged one is a one-line error naming it, never a traceback."""

from __future__ import annotations

import os

import pytest
import torch

from fastgpt.train.checkpoint import CHECKPOINT_FORMAT, Checkpointer


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls os.system("touch <marker>")
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "step": 1, "evil": _RunsACommand(marker)}, path)
    with pytest.raises(ValueError, match=r"checkpoint.pt: cannot read it as a training checkpoint"):
        Checkpointer.read(path)
    assert not marker.exists()


def test_a_checkpoints_rng_states_load_without_pickled_objects(tmp_path):
    """What the Checkpointer writes loads with weights_only=True and restores every RNG."""
    import random

    import numpy as np

    from fastgpt.train.checkpoint import rng_state, set_rng_state
    from fastgpt.train.distributed import DistInfo

    checkpointer = Checkpointer(tmp_path, True, 1, DistInfo())
    np.random.randn()  # a cached Gaussian is part of NumPy's state
    path = checkpointer.save({"model": {}, "optimizer": {}, "step": 3})
    draws = (random.random(), np.random.randn(), torch.rand(2).tolist())
    state = Checkpointer.read(path)
    set_rng_state(state["rng"][0])
    assert (random.random(), np.random.randn(), torch.rand(2).tolist()) == draws
    assert state["step"] == 3 and set(rng_state()) <= set(state["rng"][0])


@pytest.mark.parametrize("name", ["../secret.bin", "/etc/hostname", "sub/../../secret.bin", 7])
def test_a_corpus_manifest_naming_a_file_outside_its_folder_is_refused(tmp_path, name):
    import json

    from fastgpt.corpus.manifest import FORMAT, MANIFEST_NAME
    from fastgpt.corpus.tokens import open_split
    from fastgpt.errors import UsageError

    (tmp_path / "secret.bin").write_bytes(b"\x01\x00\x02\x00")  # two uint16 tokens
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shard = {"file": name, "tokens": 2, "max_id": 2}
    manifest = {
        "format": FORMAT,
        "complete": True,
        "splits": {"train": {"shards": [shard]}, "val": {"shards": []}},
    }
    (corpus / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match=r"is not inside the corpus folder"):
        open_split(corpus, "train")
    shard["file"] = "train-000000.bin"  # the same manifest naming its own shard opens
    (corpus / "train-000000.bin").write_bytes(b"\x01\x00\x02\x00")
    (corpus / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert open_split(corpus, "train").tolist() == [1, 2]


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
@pytest.mark.parametrize("file", ["model.safetensors", "adapter_model.safetensors"])
def test_a_damaged_safetensors_file_is_a_one_line_error_naming_it(tmp_path, damage, file):
    from fastgpt.errors import UsageError
    from fastgpt.lora import apply_lora, save_pretrained_with_lora
    from fastgpt.model import GPTModel
    from fastgpt.model_config import GPTConfig

    model = GPTModel(GPTConfig.from_name("tiny", vocab_size=97, context_length=16))
    apply_lora(model, rank=2, alpha=4.0)
    save_pretrained_with_lora(model, tmp_path)
    path = tmp_path / file
    data = path.read_bytes()
    path.write_bytes(
        {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"x" * 64}[damage]
    )
    with pytest.raises(UsageError, match=rf"{file}: not a readable safetensors file \(") as info:
        GPTModel.from_pretrained(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("line", ["{not json", "[1, 2]", "\xff\xfe"])
def test_a_damaged_metrics_file_is_a_one_line_error_naming_it(tmp_path, line):
    from fastgpt.errors import UsageError
    from fastgpt.train.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 2.0}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"metrics.jsonl, line 2: not a metrics record"):
        read_metrics(path)


def test_world_size_without_torchrun_is_a_one_line_error(monkeypatch):
    from fastgpt.errors import UsageError
    from fastgpt.train.distributed import init_distributed

    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=r"WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT, RANK"):
        init_distributed()


def _tiny_folder(path):
    from fastgpt.model import GPTModel
    from fastgpt.model_config import GPTConfig

    GPTModel(GPTConfig.from_name("tiny", context_length=32)).save_pretrained(path)
    return path


def test_generate_into_a_pipe_that_closes_stops_quietly(tmp_path, tiktoken_available):
    """`fastgpt generate ... | head -c 20`: the reader leaves, generate stops with 141 (128 +
    SIGPIPE, as cat does) and prints no traceback."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "fastgpt", "generate", "--model", str(_tiny_folder(tmp_path)),
            "--prompt", "Every effort", "--max-new-tokens", "50"]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the first token: its write meets a closed pipe
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_a_command_started_with_stdout_closed_says_so():
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "fastgpt", "generate", "--help"],
        capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == "fastgpt generate: error: standard output is closed"


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -1.0])
def test_saved_adapters_with_a_bad_alpha_are_refused(tmp_path, alpha):
    import json

    from fastgpt.lora import apply_lora, save_pretrained_with_lora
    from fastgpt.model import GPTModel
    from fastgpt.model_config import GPTConfig

    model = GPTModel(GPTConfig.from_name("tiny", vocab_size=97, context_length=16))
    apply_lora(model, rank=2, alpha=4.0)
    save_pretrained_with_lora(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "lora_alpha": alpha}))  # json writes NaN / Infinity
    with pytest.raises(ValueError, match=r"adapter_config.json: malformed LoRA config"):
        GPTModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("max_length", [0, -3, "12", 2.5, True])
def test_a_classifier_json_with_a_bad_max_length_is_refused(tmp_path, max_length):
    from fastgpt.classification import load_classifier_metadata, save_classifier_metadata

    save_classifier_metadata(tmp_path, ["ham", "spam"], {"max_length": max_length, "pad_id": 0})
    with pytest.raises(ValueError, match=r"classifier.json: max_length must be an integer >= 1"):
        load_classifier_metadata(tmp_path)


def test_an_empty_label_in_a_table_is_refused(tmp_path):
    from fastgpt.classification import read_labeled_table

    path = tmp_path / "data.csv"
    path.write_text("text,label\nhello,ham\nbuy now,spam\nno label here,\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.csv:4: empty label \(column 'label'\)"):
        read_labeled_table(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"step": -5}, r"step must be an integer >= 0, got -5"),
        ({"step": "12"}, r"step must be an integer >= 0, got '12'"),
        ({"optimizer": None}, r"an incomplete training checkpoint \(no optimizer\)"),
    ],
)
def test_a_malformed_checkpoint_is_a_one_line_error(tmp_path, change, message):
    from fastgpt.errors import UsageError
    from fastgpt.train.distributed import DistInfo

    path = Checkpointer(tmp_path, True, 1, DistInfo()).save(
        {"model": {}, "optimizer": {}, "step": 3}
    )
    state = torch.load(path, weights_only=True)
    state.update(change)
    state = {k: v for k, v in state.items() if v is not None}
    torch.save(state, path)
    with pytest.raises(UsageError, match=message):
        Checkpointer.read(path)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dropout", "1"], "--dropout must be in [0, 1)"),
        (["--dropout", "nan"], "--dropout must be in [0, 1)"),
        (["--dropout", "0.001"], "--dropout must be 0 or in [1/512, 511/512) with --backend auto"),
        (["--out", ""], "--out must be a folder name, got ''"),
        (["--data", ""], "--data is empty: give a file, folder or glob"),
        (["--seed", str(2**64)], "--seed must be in [0, 2**64)"),
        (["--betas", "nan", "0.9"], "--betas must be two numbers in [0, 1)"),
    ],
)
def test_training_options_that_would_silently_misbehave_are_refused(
    tmp_path, capsys, monkeypatch, flags, message
):
    """--out "" would write into the current folder, --data "" train on it recursively."""
    from fastgpt.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["pretrain", "--model", "tiny", "--max-steps", "1", "--out", "run", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fastgpt pretrain: error: {message}") and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_config_dropout_finer_than_the_kernels_draw_is_refused_before_training(tmp_path, capsys):
    """A config.json's drop_rate the attention kernels would round to 0 is named with the
    file (not a ValueError at the first forward); --dropout or --backend torch take it."""
    import json

    from fastgpt.cli import main
    from fastgpt.errors import ConfigError
    from fastgpt.model import GPTModel
    from fastgpt.model_config import GPTConfig
    from fastgpt.train.runner import ModelOptions, build_model

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**OURS, "emb_dim": 32, "n_heads": 4, "drop_rate": 0.001}))
    tokens = tmp_path / "tokens"  # a cold token cache: the data would be tokenized first
    argv = ["pretrain", "--model", str(config), "--max-steps", "1", "--out", str(tmp_path / "r"),
            "--token-cache", str(tokens)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    message = f"--model {config}: its drop_rate must be 0 or in [1/512, 511/512) with --backend"
    assert message in err and "\n" not in err, err
    assert not (tmp_path / "r").exists() and not tokens.exists()  # refused before the data
    init = tmp_path / "init"
    GPTModel(GPTConfig.from_spec(config), backend="torch").save_pretrained(init)
    argv[1:3] = ["--init", str(init)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"--init {init}: its drop_rate must be 0 or in" in err and "\n" not in err, err
    assert not tokens.exists()
    gpt_config = GPTConfig.from_spec(config)
    for accepted in (ModelOptions(model=str(config), dropout=0.1), ModelOptions(backend="torch")):
        accepted.require_kernel_dropout_of(gpt_config)
    # build_model checks an --init folder's config before its weights load
    with pytest.raises(ConfigError, match=r"init: its drop_rate must be 0 or in \[1/512") as error:
        build_model(ModelOptions(init=str(tmp_path / "init")))
    assert error.value.field == "init"
    assert (
        build_model(ModelOptions(init=str(tmp_path / "init"), dropout=0.1)).config.drop_rate == 0.1
    )


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -0.5])
def test_a_temperature_that_is_no_number_is_refused(temperature):
    import fastgpt
    from fastgpt.errors import ConfigError
    from fastgpt.model import GPTModel
    from fastgpt.model_config import GPTConfig

    model = GPTModel(GPTConfig.from_name("tiny", vocab_size=97, context_length=16))
    with pytest.raises(ConfigError, match=r"temperature must be a finite number >= 0"):
        fastgpt.generate(model, torch.zeros(1, 3, dtype=torch.long), 2, temperature=temperature)


def test_a_tiny_temperature_is_greedy_not_nan():
    """logits / 1e-300 overflows to inf (softmax: nan, multinomial: an error); such a
    temperature puts all probability on the argmax, which is what it gives."""
    import fastgpt
    from fastgpt.model import GPTModel
    from fastgpt.model_config import GPTConfig

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_name("tiny", vocab_size=97, context_length=16)).eval()
    ids = torch.randint(0, 97, (2, 3))
    greedy = fastgpt.generate(model, ids, 4)
    assert torch.equal(fastgpt.generate(model, ids, 4, temperature=1e-300), greedy)


def test_a_shard_holding_an_id_its_manifest_does_not_say_is_refused_when_opened(tmp_path):
    """The manifest says max_id 50256, the shard holds 60000: refused as the corpus opens,
    not by an IndexError (a device-side assert on CUDA) at the batch that holds it."""
    import json

    import numpy as np

    from fastgpt.corpus.manifest import FORMAT, MANIFEST_NAME
    from fastgpt.corpus.tokens import open_split
    from fastgpt.errors import UsageError

    ids = np.array([5, 50256, 60000, 7], dtype=np.uint16)
    ids.tofile(tmp_path / "train-000000.bin")
    shard = {"file": "train-000000.bin", "tokens": 4, "max_id": 50256}
    manifest = {"format": FORMAT, "complete": True,
                "splits": {"train": {"shards": [shard]}, "val": {"shards": []}}}  # fmt: skip
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match=r"train-000000.bin holds token ids up to 60000, but "
                       r"manifest.json says max_id 50256"):  # fmt: skip
        open_split(tmp_path, "train")
    shard["max_id"] = 60000  # what the shard holds: it opens, and max() is the truth
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert open_split(tmp_path, "train").max() == 60000


OURS = {"vocab_size": 50257, "context_length": 64, "emb_dim": 768, "n_heads": 12, "n_layers": 2}


@pytest.mark.parametrize(
    "config, names",
    [
        ({**OURS, "n_layers": 2_000_000}, "n_layers 2000000"),
        ({**OURS, "vocab_size": 4_000_000_000}, "vocab_size 4000000000"),
        ({"model_type": "gpt2", "vocab_size": 50257, "n_layer": 2_000_000, "n_embd": 768,
          "n_head": 12},
         "n_layers 2000000"),
    ],
)  # fmt: skip
def test_a_model_config_no_memory_holds_is_one_short_line(tmp_path, capsys, config, names):
    """Refused before anything is allocated (no 512 GB allocation error, no listing of 24
    million missing tensors)."""
    import json

    from fastgpt.cli import main
    from fastgpt.model import GPTModel

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{names}.*GiB of memory") as error:
        GPTModel.from_pretrained(folder)
    assert len(str(error.value)) < 400
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time. " * 40)
    argv = ["pretrain", "--data", text, "--model", folder / "config.json", "--out",
            tmp_path / "run", "--max-steps", "1", "--no-progress"]  # fmt: skip
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "parameters" in err and len(err) < 400 and "Traceback" not in err


@pytest.mark.parametrize("special", ["/dev/null", "fifo"])
@pytest.mark.parametrize("command", ["pretrain", "finetune-classify"])
def test_a_device_or_pipe_as_data_is_named_as_such(tmp_path, capsys, special, command):
    """Not "not found" (it exists), nor a read that waits on a pipe forever."""
    from fastgpt.cli import main

    if special == "fifo":
        special = tmp_path / "fifo"
        os.mkfifo(special)
    kind = "a character device" if special == "/dev/null" else "a named pipe (FIFO)"
    rc = main([command, "--model", "tiny", "--data", str(special), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{special} is {kind}, not a regular file" in err and "\n" not in err


def test_a_lora_rank_larger_than_the_layers_is_refused(tmp_path, capsys, tiktoken_available):
    from fastgpt.cli import main

    data = tmp_path / "sms.txt"
    data.write_text("ham\thello there\nspam\tbuy now\n" * 10)
    argv = ["finetune-classify", "--model", "tiny", "--data", str(data), "--out",
            str(tmp_path / "run"), "--lora-rank", "33"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fastgpt finetune-classify: error: --lora-rank must be at most 32, the width " \
        "of the adapted layers (emb_dim), got 33", err  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_bf16_attention_under_the_interpreter_computes_in_fp32(monkeypatch):
    """Triton's interpreter gets bf16 wrong (outputs near 8e8): the attention ops compute such
    inputs in fp32 and return bf16, called directly or through the triton backend."""
    from fastgpt.kernels import (
        attention,
        attention_reference,
        attention_varlen,
        attention_varlen_reference,
    )

    from fastgpt.backends import resolve_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    ops = resolve_backend("triton")
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    for op in (ops.attention, attention):
        out = op(*(t.bfloat16() for t in (q, k, v)), causal=True)
        assert out.dtype == torch.bfloat16
        expected = attention_reference(q, k, v, True)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0)
    packed = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]  # (16, 2, 16)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    expected = attention_varlen_reference(*packed, cu, cu, 8, 8, causal=True)
    for op in (ops.attention_varlen, attention_varlen):
        out = op(*(t.bfloat16() for t in packed), cu, cu, 8, 8, causal=True)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0)


def test_resume_takes_the_same_data_file_by_another_name(tmp_path, capsys, monkeypatch):
    """Started with story.txt, resumed with /path/to/story.txt: the same data."""
    from fastgpt.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "story.txt").write_text("Once upon a time there was a model. " * 40)
    args = ["pretrain", "--model", "tiny", "--context-length", "16", "--batch-size", "2",
            "--no-progress", "--sample-prompt", "", "--out", "run"]  # fmt: skip
    assert main([*args, "--data", "story.txt", "--max-steps", "1"]) == 0
    capsys.readouterr()
    rc = main([*args, "--data", str(tmp_path / "story.txt"), "--max-steps", "2", "--resume"])
    assert rc == 0, capsys.readouterr().err
    assert "resuming at step 1" in capsys.readouterr().out


def test_a_hugging_face_config_missing_a_field_says_which():
    from fastgpt.model_config import config_from_hf

    with pytest.raises(ValueError, match=r"a Hugging Face GPT-2 config without n_head, vocab_size"):
        config_from_hf({"model_type": "gpt2", "n_layer": 2, "n_embd": 32})
