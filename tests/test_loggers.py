"""--logger tensorboard / wandb: every record metrics.jsonl gets reaches TensorBoard's event files
(read back with TensorBoard's own reader) and a Weights & Biases run (offline, read back from
its run file); a missing package is one line naming the option and what to install. Tiny model
and random tokens on CPU; each test skips when its package is not installed."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from fastgpt.errors import ConfigError
from fastgpt.losses import next_token_loss
from fastgpt.train import Trainer
from fastgpt.train.checkpoint import CHECKPOINT_NAME
from fastgpt.train.metrics import METRICS_NAME, read_metrics
from tests.test_train import config, random_windows, tiny_model


def train(tmp_path, loggers, **overrides) -> list[dict]:
    """Train the tiny model with `loggers`; returns the records of metrics.jsonl."""
    cfg = config(tmp_path, loggers=loggers, eval_every=2, save_checkpoint=True, **overrides)
    Trainer(tiny_model(), random_windows(), random_windows(seed=1), next_token_loss, cfg,
            sample_fn=lambda model: "a sample").fit()  # fmt: skip
    return read_metrics(tmp_path / "run" / METRICS_NAME)


def of_kind(records: list[dict], kind: str, key: str) -> list[tuple[int, object]]:
    return [(r["step"], r[key]) for r in records if r["kind"] == kind and r.get(key) is not None]


def assert_same_series(logged: list[tuple[int, object]], expected: list[tuple[int, object]]):
    """The same steps, and values equal (numbers to float32's precision: TensorBoard's)."""
    assert [step for step, _ in logged] == [step for step, _ in expected]
    for (_, value), (_, wanted) in zip(logged, expected, strict=True):
        assert value == (wanted if isinstance(wanted, str) else pytest.approx(wanted, rel=1e-6))


# --- TensorBoard -------------------------------------------------------------------------


def tensorboard_events(folder):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(events, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_gets_every_record_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    records = train(tmp_path, ["tensorboard"], max_steps=4)
    events = tensorboard_events(tmp_path / "run" / "tensorboard")
    train_keys = [("train", key) for key in ("loss", "lr", "grad_norm", "tokens_seen")]
    for kind, key in [*train_keys, ("eval", "val_loss"), ("eval", "train_loss")]:
        expected = of_kind(records, kind, key)
        assert len(expected) == (4 if kind == "train" else 2)
        assert_same_series(scalars(events, f"{kind}/{key}"), expected)
    assert "train/mfu" not in events.Tags()["scalars"]  # null on CPU: nothing to plot
    from tensorboard.util.tensor_util import make_ndarray

    samples = events.Tensors("eval/sample/text_summary")
    assert [(e.step, make_ndarray(e.tensor_proto).tolist()) for e in samples] == [
        (2, [b"a sample"]), (4, [b"a sample"])
    ]  # fmt: skip


def test_a_resumed_run_replaces_the_tensorboard_steps_after_its_checkpoint(tmp_path):
    """Resumed from step 2 after the first run reached step 4: TensorBoard shows each step
    once, the resumed run's values from step 3 on, as metrics.jsonl does."""
    pytest.importorskip("tensorboard")
    train(tmp_path, ["tensorboard"], max_steps=2)
    step2 = tmp_path / "step2.pt"
    step2.write_bytes((tmp_path / "run" / CHECKPOINT_NAME).read_bytes())
    train(tmp_path, ["tensorboard"], max_steps=4, resume=True)
    records = train(tmp_path, ["tensorboard"], max_steps=5, resume=str(step2), lr=1e-3)
    events = tensorboard_events(tmp_path / "run" / "tensorboard")
    expected = of_kind(records, "train", "lr")
    assert [step for step, _ in expected] == [1, 2, 3, 4, 5]
    assert_same_series(scalars(events, "train/lr"), expected)


# --- Weights & Biases (offline) ----------------------------------------------------------


def wandb_file_records(path) -> list:
    """The protobuf records of a .wandb run file. Its layout is LevelDB's log format after a
    7-byte header (":W&B", 2 bytes, a version): 32 KiB blocks of chunks, each chunk a 7-byte
    header (CRC32C, little-endian 2-byte length, type: 1 whole record, 2 first, 3 middle, 4 last
    part; 0 padding) and its bytes; a block's last < 7 bytes are padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    records, parts, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(parts)
            records.append(record)
        if kind in (0, 1, 4):
            parts = b""
    return records


def wandb_history(records) -> dict[str, list[tuple[int, object]]]:
    """{"train/loss": [(step, value), ...], ...} of a run file's history records."""
    history: dict[str, list[tuple[int, object]]] = {}
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in
                 record.history.item}  # fmt: skip
        for key, value in items.items():
            if not key.startswith("_"):
                history.setdefault(key, []).append((items["_step"], value))
    return history


def test_wandb_offline_run_gets_every_record_and_the_run_json_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run stays on disk
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))  # its logs: not ~/.cache
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    records = train(tmp_path, ["wandb"], max_steps=4)
    wandb.teardown()  # the run file is complete once wandb's service has stopped (as at exit)
    (run_file,) = (tmp_path / "wandb-dir").glob("wandb/offline-run-*/run-*.wandb")
    saved = wandb_file_records(run_file)
    history = wandb_history(saved)
    for kind, key in (("train", "loss"), ("train", "lr"), ("eval", "val_loss"),
                      ("eval", "sample")):  # fmt: skip
        assert_same_series(history[f"{kind}/{key}"], of_kind(records, kind, key))
    (run,) = [r.run for r in saved if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "run"  # out_dir's name
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["options"]["max_steps"] == 4 and config["options"]["loggers"] == ["wandb"]
    assert config["start_step"] == 0 and config["device"] == "cpu"


# --- a logger whose package is missing ---------------------------------------------------


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_logger_package_is_one_line_naming_the_option(tmp_path, monkeypatch, capsys,
                                                                name):  # fmt: skip
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == name else real_find_spec(n, *a)
    )
    with pytest.raises(ConfigError, match=f"loggers {name} needs the {name} package"):
        config(tmp_path, loggers=[name])
    from fastgpt.cli import main

    assert main(["pretrain", "--model", "tiny", "--logger", name, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"--logger {name} needs the {name} package: pip install {name}" in err[0]


def test_an_unknown_logger_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'mlflow' is not a logger: use tensorboard or wandb"):
        config(tmp_path, loggers=["mlflow"])
    assert config(tmp_path).loggers == []  # the default: metrics.jsonl and loss.png only


def test_loggers_is_stored_in_a_checkpoint_that_loads_with_weights_only(tmp_path):
    pytest.importorskip("tensorboard")
    train(tmp_path, ["tensorboard", "tensorboard"], max_steps=1)
    state = torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=True)
    assert state["train_config"]["loggers"] == ["tensorboard"]  # repeated names count once
