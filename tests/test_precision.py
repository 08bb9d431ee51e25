"""--precision: fp16 autocast with a loss scaler (torch.amp.GradScaler, here its CPU form) trains
the tiny model as bf16 does, resumes exactly with its scale, skips and counts a step whose
gradient overflows; auto picks bf16 on a GPU that has it, fp16 on one that does not, fp32 on
CPU, for training and for --dtype alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastgpt.devices import resolve_dtype
from fastgpt.errors import NonFiniteLossError
from fastgpt.losses import next_token_loss
from fastgpt.text_data import SlidingWindowDataset
from fastgpt.train import Trainer
from fastgpt.train.checkpoint import CHECKPOINT_NAME
from fastgpt.train.metrics import METRICS_NAME, read_metrics
from tests.test_train import VOCAB, assert_same_weights, config, tiny_model, train_losses


def counting_windows(n_tokens: int = 16 * 12 + 1) -> SlidingWindowDataset:
    """0, 1, ..., 12, 0, 1, ...: the next token is always learnable."""
    ids = (np.arange(n_tokens) % 13).astype(np.uint16)
    return SlidingWindowDataset(ids, context_length=16)


def train_records(out_dir) -> list[dict]:
    return [r for r in read_metrics(out_dir / METRICS_NAME) if r["kind"] == "train"]


def overflow_at(model, steps: set[int]) -> None:
    """Make one weight's gradient infinite at the given optimizer steps (1-based; one
    micro-batch per step), as an fp16 overflow would."""
    calls = {"n": 0}

    def count(module, args):
        calls["n"] += 1 if module.training else 0

    model.register_forward_pre_hook(count)
    model.trf_blocks[0].ff.fc1.weight.register_hook(
        lambda grad: grad * float("inf") if calls["n"] in steps else grad
    )


def test_fp16_with_the_loss_scaler_trains_like_bf16(tmp_path):
    data, losses = counting_windows(), {}
    for precision in ("fp32", "bf16", "fp16"):
        cfg = config(tmp_path, precision, max_steps=12, precision=precision, lr=1e-2,
                     warmup_steps=0)  # fmt: skip
        trainer = Trainer(tiny_model(), data, None, next_token_loss, cfg)
        assert trainer.scaler.is_enabled() == (precision == "fp16")
        trainer.fit()
        losses[precision] = np.array(train_losses(tmp_path / precision))
    assert losses["fp32"][-1] < 0.5 * losses["fp32"][0]  # it learns
    # fp16 follows fp32 as closely as bf16 does (bf16 keeps 8 bits of mantissa, fp16 11)
    bf16_gap = np.abs(losses["bf16"] - losses["fp32"]).max()
    assert np.abs(losses["fp16"] - losses["fp32"]).max() <= max(bf16_gap, 1e-3)
    records = train_records(tmp_path / "fp16")
    assert all(r["skipped_steps"] == 0 and r["loss_scale"] == 2.0**16 for r in records)
    assert "loss_scale" not in train_records(tmp_path / "bf16")[0]  # fp16 only


def test_an_overflowing_step_is_skipped_counted_and_the_scale_halved(tmp_path):
    model, snapshots = tiny_model(), []
    overflow_at(model, {3})
    model.register_forward_pre_hook(
        lambda module, args: snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        if module.training else None
    )  # fmt: skip
    trainer = Trainer(model, counting_windows(), None, next_token_loss,
                      config(tmp_path, max_steps=5, precision="fp16"))  # fmt: skip
    trainer.fit()
    assert trainer.step == 5 and trainer.skipped_steps == 1
    records = train_records(tmp_path / "run")
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    assert [r["loss_scale"] for r in records] == [2.0**16] * 2 + [2.0**15] * 3
    assert records[2]["grad_norm"] is None  # the interval's only step had no finite norm
    assert all(np.isfinite(r["grad_norm"]) for i, r in enumerate(records) if i != 2)
    # step 3 changed no parameter (snapshots[k]: the weights step k + 1 started from)
    before, after = (tiny_model(), tiny_model())
    before.load_state_dict(snapshots[2])
    after.load_state_dict(snapshots[3])
    assert_same_weights(before, after, exact=True)
    other = tiny_model()
    other.load_state_dict(snapshots[4])
    with pytest.raises(AssertionError):  # step 4 did
        assert_same_weights(after, other, exact=True)


def test_fp16_resume_continues_exactly_with_the_loss_scale(tmp_path):
    """3 steps (the 2nd overflows: scale halved), stop, resume, 3 more == 6 straight: the same
    losses bit for bit, the same weights, scaler state and skipped count; the checkpoint loads
    with weights_only=True."""
    data, n = counting_windows(), 3
    common = dict(precision="fp16", lr_decay_steps=2 * n, save_checkpoint=True)

    straight = tiny_model(drop_rate=0.2)
    overflow_at(straight, {2})
    done = Trainer(straight, data, None, next_token_loss,
                   config(tmp_path, "straight", max_steps=2 * n, **common))  # fmt: skip
    done.fit()

    first = tiny_model(drop_rate=0.2)
    overflow_at(first, {2})
    Trainer(first, data, None, next_token_loss,
            config(tmp_path, "resumed", max_steps=n, **common)).fit()  # fmt: skip
    state = torch.load(tmp_path / "resumed" / CHECKPOINT_NAME, weights_only=True)
    assert state["scaler"]["scale"] == 2.0**15 and state["skipped_steps"] == 1
    resumed = tiny_model(drop_rate=0.2, seed=5)
    cfg = config(tmp_path, "resumed", max_steps=2 * n, resume=True, **common)
    trainer = Trainer(resumed, data, None, next_token_loss, cfg)
    trainer.fit()

    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    assert_same_weights(straight, resumed, exact=True)
    assert trainer.scaler.state_dict() == done.scaler.state_dict()
    assert trainer.skipped_steps == done.skipped_steps == 1
    records = train_records(tmp_path / "resumed")
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1, 1, 1]


def test_a_gradient_that_overflows_at_every_scale_stops_the_run(tmp_path):
    """Overflow after overflow halves the scale; below 1 no scale can help: the gradient
    itself is not finite, and the run stops as in fp32 (parameters unchanged)."""
    model = tiny_model()
    overflow_at(model, set(range(1, 100)))
    trainer = Trainer(model, counting_windows(), None, next_token_loss,
                      config(tmp_path, max_steps=20, precision="fp16"))  # fmt: skip
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)  # 4 -> 2 -> 1 -> 0.5: stop
    with pytest.raises(NonFiniteLossError, match=r"step 3: .*gradient norm inf"):
        trainer.fit()
    assert trainer.skipped_steps == 3
    assert_same_weights(model, tiny_model(), exact=True)


def test_auto_is_bf16_where_the_gpu_has_it_fp16_where_not_fp32_on_cpu(monkeypatch, tmp_path):
    asked = []

    def native_bf16(answer):
        def is_bf16_supported(including_emulation=True):
            asked.append(including_emulation)
            return answer

        return is_bf16_supported

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", native_bf16(True))
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", native_bf16(False))  # T4, V100
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert asked == [False, False]  # emulated bf16 (slow, and not in our kernels) does not count
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    trainer = Trainer(tiny_model(), counting_windows(), None, next_token_loss, config(tmp_path))
    assert trainer.amp_dtype is None and not trainer.scaler.is_enabled()  # CPU: fp32


def test_precision_fp16_is_an_option_of_the_training_commands():
    from tests.test_train import parse, train_config_from_args

    assert train_config_from_args(parse("--precision", "fp16")).precision == "fp16"
    assert tiny_model().config.vocab_size == VOCAB
