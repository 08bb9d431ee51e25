"""The training loop (fastgpt/train/) on a tiny model and random tokens (no tokenizer, fast on
CPU): LR schedule, optimizer groups, gradient accumulation, exact resume, the non-finite guard,
written files, two-process DDP (gloo) against one process, and the runner's options."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import shlex
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fastgpt.errors import UsageError
from fastgpt.losses import next_token_loss
from fastgpt.model import GPTModel
from fastgpt.model_config import GPTConfig
from fastgpt.options import resolve_defaults
from fastgpt.text_data import SlidingWindowDataset
from fastgpt.train import NonFiniteLossError, TrainConfig, Trainer, evaluate_loss
from fastgpt.train.checkpoint import CHECKPOINT_NAME
from fastgpt.train.metrics import (
    METRICS_NAME,
    PLOT_NAME,
    RUN_RECORD_NAME,
    git_checkout,
    read_metrics,
    read_run_records,
)
from fastgpt.train.optim import lr_multiplier, make_optimizer
from fastgpt.train.runner import (
    ModelOptions,
    Task,
    TrainingParts,
    add_task_arguments,
    build_model,
    run_task,
    train_config_from_args,
)

VOCAB = 97  # a small vocabulary keeps the output head cheap


def tiny_model(drop_rate: float = 0.0, seed: int = 0, dtype=torch.float32) -> GPTModel:
    torch.manual_seed(seed)
    config = GPTConfig.from_name("tiny", vocab_size=VOCAB, context_length=16, drop_rate=drop_rate)
    return GPTModel(config, backend="torch").to(dtype)


def random_windows(n_tokens: int = 16 * 20 + 1, seed: int = 0) -> SlidingWindowDataset:
    ids = np.random.default_rng(seed).integers(0, VOCAB, n_tokens).astype(np.uint16)
    return SlidingWindowDataset(ids, context_length=16)


def config(tmp_path, name: str = "run", **overrides) -> TrainConfig:
    base = dict(
        out_dir=str(tmp_path / name),
        batch_size=4,
        lr=3e-3,
        eval_every=0,
        eval_batches=2,
        log_every=1,
        progress=False,
        plot=False,
        save_checkpoint=False,
        seed=7,
    )
    return TrainConfig(**{**base, **overrides})


def train_losses(out_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(out_dir / METRICS_NAME) if r["kind"] == "train"]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, exact: bool = False) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if exact:
            assert torch.equal(sa[key], sb[key]), key
        else:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6, msg=key)


# --- pieces ------------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine_to_min():
    lrs = [lr_multiplier(s, warmup_steps=4, decay_steps=20, min_ratio=0.1) for s in range(25)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)  # the cosine starts at its top
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))  # then only falls
    assert lrs[12] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: the mean of peak and min
    assert lrs[20:] == pytest.approx([0.1] * 5)  # flat at min_lr after decay_steps
    assert lr_multiplier(0, 0, 1, 0.0) == pytest.approx(1.0)  # no warmup


def test_optimizer_decays_only_matrices_and_skips_frozen(tmp_path):
    model = tiny_model()
    model.requires_grad_(False)
    model.trf_blocks[-1].requires_grad_(True)
    trainer = Trainer(model, random_windows(), None, next_token_loss, config(tmp_path))
    groups = trainer.optimizer.param_groups
    trainable = {id(p) for p in model.trf_blocks[-1].parameters()}
    assert {id(p) for g in groups for p in g["params"]} == trainable  # frozen ones excluded
    for group in groups:
        dims = {p.dim() for p in group["params"]}
        assert (dims >= {2} and group["weight_decay"] == 0.1) or (
            dims == {1} and group["weight_decay"] == 0.0
        )
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if "trf_blocks.1" not in k}
    trainer.config.max_steps = 3
    trainer.total_steps = 3
    trainer.fit()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen_before.items())
    assert not torch.equal(
        model.trf_blocks[-1].att.qkv.weight, tiny_model().trf_blocks[-1].att.qkv.weight
    )


def test_gradient_norm_is_clipped_before_the_optimizer_step(tmp_path):
    """The optimizer sees gradients of norm grad_clip although the logged (pre-clip) norm is
    larger; grad_clip 0 leaves them alone. On CPU: fp32, AdamW not fused."""
    for grad_clip in (0.05, 0.0):
        cfg = config(tmp_path, f"clip{grad_clip}", max_steps=3, grad_clip=grad_clip)
        trainer = Trainer(tiny_model(), random_windows(), None, next_token_loss, cfg)
        assert trainer.amp_dtype is None and not trainer.optimizer.defaults["fused"]
        seen = []  # the gradient norm each optimizer step is given
        trainer.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, seen=seen, params=trainer.params: seen.append(
                torch.nn.utils.get_total_norm([p.grad for p in params]).item()
            )
        )
        trainer.fit()
        logged = [r["grad_norm"] for r in trainer.history if r["kind"] == "train"]
        assert len(seen) == len(logged) == 3
        assert min(logged) > 0.05  # clipping has something to do
        if grad_clip:
            assert seen == pytest.approx([grad_clip] * 3, rel=1e-4)
        else:
            assert seen == pytest.approx(logged, rel=1e-5)


def test_make_optimizer_groups():
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(4))]
    opt = make_optimizer(params, lr=1e-3, weight_decay=0.5)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]


def test_evaluate_loss_is_mean_of_batches_and_restores_mode():
    model = tiny_model().train()
    data = random_windows()
    loader = torch.utils.data.DataLoader(data, batch_size=5)
    expected = []
    with torch.no_grad():
        model.eval()
        for i, batch in enumerate(loader):
            if i < 3:
                expected.append(next_token_loss(model, batch).item())
        model.train()
    assert evaluate_loss(model, loader, next_token_loss, 3) == pytest.approx(np.mean(expected))
    assert model.training
    assert math.isnan(evaluate_loss(model, [], next_token_loss))


def test_too_small_training_set_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        Trainer(tiny_model(), random_windows(16 * 3 + 1), None, next_token_loss,
                config(tmp_path, batch_size=4))  # fmt: skip


def test_no_trainable_parameters_is_an_error(tmp_path):
    model = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters to train"):
        Trainer(model, random_windows(), None, next_token_loss, config(tmp_path))


def test_bad_config_values():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    assert TrainConfig().epochs == 1 and TrainConfig(max_steps=5).epochs is None
    with pytest.raises(ValueError, match="lr must be > 0 and finite, got inf"):
        TrainConfig(lr=float("inf"))
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\), got -1"):
        TrainConfig(seed=-1)
    with pytest.raises(ValueError, match="grad_clip must be >= 0, got -1"):
        TrainConfig(grad_clip=-1)


def test_device_is_checked_when_the_config_is_made(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device cuda:1: no CUDA GPU is available"):
        TrainConfig(device="cuda:1")
    with pytest.raises(ValueError, match="device 'tpu' is not a device: use cpu, cuda"):
        TrainConfig(device="tpu")
    assert TrainConfig(device="cpu").device == "cpu"


# --- equivalences ------------------------------------------------------------------------


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """grad_accum 4 × batch 2 and grad_accum 1 × batch 8 see the same 8 examples per step
    (same seeded order) and average the same gradients: equal losses and weights. In float64:
    in float32, Adam turns the rounding noise of a gradient entry that is almost 0 into a step
    of ±lr, so weights could differ by lr although the gradients agree to 1e-7."""
    data = random_windows()
    results = {}
    for name, batch_size, accum in (("accum", 2, 4), ("big", 8, 1)):
        model = tiny_model(dtype=torch.float64)
        cfg = config(tmp_path, name, batch_size=batch_size, grad_accum=accum, max_steps=5)
        Trainer(model, data, None, next_token_loss, cfg).fit()
        results[name] = (model, train_losses(tmp_path / name))
    (m1, l1), (m2, l2) = results["accum"], results["big"]
    assert len(l1) == 5
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    assert l1[-1] < l1[0]  # it did learn
    assert_same_weights(m1, m2)


def test_resume_continues_exactly(tmp_path):
    """N steps, stop, resume, N more == 2N steps straight: same losses, same weights, with
    dropout on (the RNG states are restored) and across an epoch boundary (5 steps/epoch)."""
    data, n = random_windows(), 6
    common = dict(lr_decay_steps=2 * n, save_checkpoint=True, eval_every=4, save_every=4)

    straight = tiny_model(drop_rate=0.2)
    Trainer(straight, data, data, next_token_loss,
            config(tmp_path, "straight", max_steps=2 * n, **common)).fit()  # fmt: skip

    first = tiny_model(drop_rate=0.2)
    Trainer(first, data, data, next_token_loss,
            config(tmp_path, "resumed", max_steps=n, **common)).fit()  # fmt: skip
    torch.manual_seed(999)  # a different RNG state before resuming must not matter
    resumed = tiny_model(drop_rate=0.2, seed=5)  # different initial weights too
    cfg = config(tmp_path, "resumed", max_steps=2 * n, resume=True, **common)
    trainer = Trainer(resumed, data, data, next_token_loss, cfg)
    trainer.fit()
    assert (
        trainer.step == 2 * n and trainer.batches.epoch == 2 and trainer.batches.step_in_epoch == 2
    )

    straight_losses = train_losses(tmp_path / "straight")
    assert len(straight_losses) == 2 * n
    assert train_losses(tmp_path / "resumed") == straight_losses  # bitwise
    assert_same_weights(straight, resumed, exact=True)
    records = read_metrics(tmp_path / "resumed" / METRICS_NAME)
    # evaluations of both runs (the first run's last step, 6, included); the logged ones
    # after the resumed checkpoint were dropped and rewritten
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 6, 8, 12]
    ckpt = torch.load(tmp_path / "resumed" / CHECKPOINT_NAME, weights_only=False)
    assert ckpt["step"] == 2 * n


def test_resume_follows_this_runs_schedule(tmp_path, capsys):
    """Resuming with a longer --max-steps and another --lr: the first resumed step already
    uses the new schedule (cosine to the new last step, new peak). The tqdm bar goes on from
    the checkpoint's step."""
    data = random_windows()
    Trainer(tiny_model(), data, None, next_token_loss,
            config(tmp_path, max_steps=2, save_checkpoint=True)).fit()  # fmt: skip
    cfg = config(tmp_path, max_steps=8, lr=1e-3, warmup_steps=0, resume=True, progress=True)
    trainer = Trainer(tiny_model(), data, None, next_token_loss, cfg)
    trainer.fit()
    lrs = [r["lr"] for r in trainer.history if r["kind"] == "train"]
    assert lrs == pytest.approx([1e-3 * lr_multiplier(s, 0, 8, 0.1) for s in range(2, 8)])
    bar = capsys.readouterr().err
    assert "training" in bar and "2/8" in bar and "8/8" in bar


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    cfg = config(tmp_path, max_steps=2, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint") as e:
        Trainer(tiny_model(), random_windows(), None, next_token_loss, cfg).fit()
    assert isinstance(e.value, UsageError) and "without resume first" in str(e.value)


def test_ctrl_c_says_which_step_the_checkpoint_holds(tmp_path, capsys):
    calls = []

    def loss_then_interrupt(model, batch):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return next_token_loss(model, batch)

    cfg = config(tmp_path, max_steps=9, save_checkpoint=True, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_model(), random_windows(), None, loss_then_interrupt, cfg).fit()
    err = capsys.readouterr().err
    assert f"stopped at step 3; {tmp_path / 'run' / CHECKPOINT_NAME} holds step 2" in err
    assert "--resume" in err


def test_resume_from_a_torn_or_foreign_checkpoint_names_the_file(tmp_path):
    data = random_windows()
    Trainer(tiny_model(), data, None, next_token_loss,
            config(tmp_path, max_steps=1, save_checkpoint=True),
            run_info={"task": "pretrain"}).fit()  # fmt: skip
    good = tmp_path / "run" / CHECKPOINT_NAME
    torn = tmp_path / "torn.pt"
    torn.write_bytes(good.read_bytes()[:1000])
    text = tmp_path / "notes.pt"
    text.write_text("{}")
    for path, message in ((torn, "cannot read it"), (text, "cannot read it")):
        cfg = config(tmp_path, max_steps=2, resume=str(path))
        with pytest.raises(UsageError, match=rf"{path.name}: {message} as a training checkpoint"):
            Trainer(tiny_model(), data, None, next_token_loss, cfg).fit()
    # Another architecture (a longer context): one short message naming what differs.
    other = GPTModel(GPTConfig.from_name("tiny", vocab_size=VOCAB, context_length=32))
    cfg = config(tmp_path, max_steps=2, resume=str(good))
    with pytest.raises(
        UsageError, match=r"checkpoint.pt is of another run: context_length 16 vs 32"
    ):
        Trainer(other, data, None, next_token_loss, cfg).fit()
    # The same config but other tensors (LoRA adapters): still one short line, not every key.
    from fastgpt.lora import apply_lora

    adapted = tiny_model()
    apply_lora(adapted, rank=2, alpha=4)
    with pytest.raises(UsageError, match=r"checkpoint.pt does not match .*lora") as info:
        Trainer(adapted, data, None, next_token_loss, cfg).fit()
    assert len(str(info.value).replace(str(good), "")) < 300
    # Another task or data: named too.
    cfg = config(tmp_path, max_steps=2, resume=str(good))
    with pytest.raises(UsageError, match=r"task pretrain vs finetune-classify"):
        Trainer(tiny_model(), data, None, next_token_loss, cfg,
                run_info={"task": "finetune-classify"}).fit()  # fmt: skip


# --- the non-finite guard ----------------------------------------------------------------


def test_nan_loss_stops_before_the_step_and_leaves_parameters(tmp_path):
    snapshot = {}
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # the first micro-batch of step 2 (grad_accum 2)
            snapshot.update({k: v.clone() for k, v in model.state_dict().items()})
            return next_token_loss(model, batch) * float("nan")
        return next_token_loss(model, batch)

    model = tiny_model()
    trainer = Trainer(model, random_windows(), None, loss_fn,
                      config(tmp_path, max_steps=4, grad_accum=2, batch_size=2))  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"step 2: non-finite training loss nan") as e:
        trainer.fit()
    # the library names the parameters; the CLI renders them as flags (tests/test_cli.py)
    assert "try a lower lr or a smaller grad_clip" in str(e.value)
    assert "{lr}" in e.value.template and "{grad_clip}" in e.value.template
    assert trainer.step == 1
    assert_same_weights(model, _as_module(snapshot, model), exact=True)
    assert all(p.grad is None for p in model.parameters())


def test_nan_gradient_stops_before_the_step(tmp_path):
    model = tiny_model()
    steps = {"n": 0}

    def loss_fn(model, batch):
        steps["n"] += 1
        return next_token_loss(model, batch)

    def poison(grad):
        return grad * float("inf") if steps["n"] == 3 else grad

    model.trf_blocks[0].ff.fc1.weight.register_hook(poison)
    trainer = Trainer(model, random_windows(), None, loss_fn, config(tmp_path, max_steps=5))
    with pytest.raises(NonFiniteLossError, match=r"step 3: .*gradient norm (nan|inf)"):
        trainer.fit()
    before = tiny_model()  # replay 2 clean steps to get the expected parameters
    Trainer(before, random_windows(), None, next_token_loss,
            config(tmp_path, "clean", max_steps=2, lr_decay_steps=5)).fit()  # fmt: skip
    assert_same_weights(model, before, exact=True)


def _as_module(state, like):
    module = tiny_model()
    module.load_state_dict(state)
    return module


# --- files and hooks ---------------------------------------------------------------------


def test_metrics_plot_checkpoint_and_hooks(tmp_path):
    seen = {"metrics": 0, "samples": 0}

    def metrics_fn(model, loader):
        seen["metrics"] += 1
        assert not model.training
        return {"accuracy": 0.25}

    def sample_fn(model):
        seen["samples"] += 1
        return "hello"

    cfg = config(tmp_path, max_steps=6, eval_every=3, log_every=2, plot=True,
                 save_checkpoint=True, save_every=4)  # fmt: skip
    model = tiny_model()
    final = Trainer(model, random_windows(), random_windows(seed=1), next_token_loss, cfg,
                    metrics_fn=metrics_fn, sample_fn=sample_fn).fit()  # fmt: skip
    out = tmp_path / "run"
    assert seen == {"metrics": 2, "samples": 2}
    assert final["step"] == 6 and final["accuracy"] == 0.25
    assert final["tokens_seen"] == 6 * 4 * 16
    assert math.isfinite(final["train_loss"])
    # validation: the mean loss over the first eval_batches (2) batches, in eval mode
    val_loader = torch.utils.data.DataLoader(random_windows(seed=1), batch_size=4)
    assert final["val_loss"] == evaluate_loss(model, val_loader, next_token_loss, 2)
    records = read_metrics(out / METRICS_NAME)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert [r["tokens_seen"] for r in train] == [128, 256, 384]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in train)  # no MFU on CPU
    assert all(math.isfinite(r["grad_norm"]) for r in train)
    warmup, decay = round(0.05 * 6), 6  # the LR each logged step used
    lrs = [3e-3 * lr_multiplier(s - 1, warmup, decay, 0.1) for s in (2, 4, 6)]
    assert [r["lr"] for r in train] == pytest.approx(lrs)
    assert [r["step"] for r in evals] == [3, 6]
    assert all(r["sample"] == "hello" and r["accuracy"] == 0.25 for r in evals)
    assert (out / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / CHECKPOINT_NAME, weights_only=False)
    assert ckpt["step"] == 6 and ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 1
    assert {"model", "optimizer", "scheduler", "rng", "tokens_seen"} <= set(ckpt)
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"][0])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [METRICS_NAME, RUN_RECORD_NAME, PLOT_NAME, CHECKPOINT_NAME]
    )  # no temp files
    # the saved model is the trained one
    restored = tiny_model(seed=3)
    restored.load_state_dict(ckpt["model"])
    assert_same_weights(restored, model, exact=True)


def test_run_json_records_options_and_environment_before_the_first_step(tmp_path):
    import fastgpt

    seen = []

    def loss_fn(model, batch):
        if not seen:  # the first step: run.json is already there
            seen.extend(read_run_records(tmp_path / "run" / RUN_RECORD_NAME))
        return next_token_loss(model, batch)

    cfg = config(tmp_path, max_steps=2)
    Trainer(tiny_model(), random_windows(), None, loss_fn, cfg).fit()
    assert len(seen) == 1
    record = seen[0]
    assert record["options"] == json.loads(json.dumps(cfg.to_dict()))  # every option
    assert record["start_step"] == 0 and record["resumed_from"] is None
    assert record["device"] == "cpu" and record["gpu"] is None and record["world_size"] == 1
    assert record["precision"] == "fp32"
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["fastgpt"] == fastgpt.__version__
    assert record["command"] == shlex.join(sys.argv)
    assert record["git"] == git_checkout(Path(fastgpt.__file__).parent)


def test_git_checkout_is_the_commit_of_tracked_code_else_none(tmp_path, monkeypatch):
    import subprocess

    package = tmp_path / "repo" / "pkg"
    package.mkdir(parents=True)
    (package / "code.py").write_text("x = 1\n")
    assert git_checkout(package) is None  # not in a checkout

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path / "repo"), "-c", "user.name=t", "-c",
                               "user.email=t@t", *args], check=True, capture_output=True,
                              text=True).stdout.strip()  # fmt: skip

    git("init", "-q")
    (tmp_path / "repo" / "README").write_text("a project\n")
    git("add", "README")
    git("commit", "-qm", "first")
    assert git_checkout(package) is None  # in a checkout, but not its code (an ignored .venv)
    git("add", "pkg")
    git("commit", "-qm", "second")
    assert git_checkout(package) == {"commit": git("rev-parse", "HEAD"), "dirty": False}
    (package / "code.py").write_text("x = 2\n")
    assert git_checkout(package)["dirty"] is True
    monkeypatch.setenv("PATH", str(tmp_path))  # no git program
    assert git_checkout(package) is None


def test_a_resumed_run_appends_its_record_to_run_json(tmp_path):
    """run.json lists every run that led to the checkpoint: the first, then the resumed one
    (with the step it started at and the checkpoint it read); a record of a run that started
    after the checkpoint resumed from is dropped, as its metrics are."""
    data = random_windows()
    Trainer(tiny_model(), data, None, next_token_loss,
            config(tmp_path, max_steps=3, save_checkpoint=True)).fit()  # fmt: skip
    path = tmp_path / "run" / CHECKPOINT_NAME
    saved = tmp_path / "step3.pt"
    saved.write_bytes(path.read_bytes())
    for max_steps in (5, 6):  # both resume from step 3: the second replaces the first's record
        cfg = config(tmp_path, max_steps=max_steps, save_checkpoint=True, resume=str(saved))
        Trainer(tiny_model(), data, None, next_token_loss, cfg).fit()
        runs = read_run_records(tmp_path / "run" / RUN_RECORD_NAME)
        assert [r["start_step"] for r in runs] == [0, 3]
        assert [r["options"]["max_steps"] for r in runs] == [3, max_steps]
        assert runs[1]["resumed_from"] == str(saved) and runs[0]["resumed_from"] is None
    (tmp_path / "run" / RUN_RECORD_NAME).write_text("[1, 2]")
    with pytest.raises(UsageError, match=r"run.json: not a run record of fastgpt"):
        Trainer(tiny_model(), data, None, next_token_loss,
                config(tmp_path, max_steps=7, resume=str(saved))).fit()  # fmt: skip


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A save that dies half-way (disk full, a kill) leaves the previous checkpoint whole and
    no temporary file behind."""
    trainer = Trainer(tiny_model(), random_windows(), None, next_token_loss,
                      config(tmp_path, max_steps=2, save_checkpoint=True))  # fmt: skip
    trainer.fit()
    path = trainer.checkpoint_path
    before = path.read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(before[: len(before) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space"):
        trainer.save_checkpoint()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [
        CHECKPOINT_NAME, METRICS_NAME, RUN_RECORD_NAME
    ]  # fmt: skip


@pytest.mark.gpu
def test_cuda_uses_fused_adamw_and_bf16_autocast(tmp_path):
    trainer = Trainer(tiny_model(), random_windows(), None, next_token_loss,
                      config(tmp_path, max_steps=2, device="cuda"))  # fmt: skip
    assert trainer.optimizer.defaults["fused"] is True
    assert trainer.amp_dtype == torch.bfloat16
    with torch.autocast("cuda", dtype=trainer.amp_dtype):
        assert trainer.model(random_windows()[0][0][None].cuda()).dtype == torch.bfloat16
    final = trainer.fit()
    assert math.isfinite(final["train_loss"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 masters


def test_epochs_set_the_number_of_steps(tmp_path):
    trainer = Trainer(tiny_model(), random_windows(), None, next_token_loss,
                      config(tmp_path, epochs=2, batch_size=3))  # fmt: skip
    assert trainer.batches.steps_per_epoch == 20 // 3 and trainer.total_steps == 12
    trainer = Trainer(tiny_model(), random_windows(), None, next_token_loss,
                      config(tmp_path, epochs=2, max_steps=5, batch_size=3))  # fmt: skip
    assert trainer.total_steps == 5  # whichever comes first
    order = [trainer.batches.epoch_order(e) for e in (0, 1, 0)]
    assert np.array_equal(order[0], order[2]) and not np.array_equal(order[0], order[1])
    assert sorted(order[1].tolist()) == list(range(20))


# --- two processes (DDP over gloo) against one -------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    cfg = TrainConfig(out_dir=out_dir, batch_size=2, grad_accum=2, max_steps=4, lr=3e-3,
                      eval_every=2, eval_batches=2, log_every=1, progress=False, plot=False,
                      save_checkpoint=True, seed=7)  # fmt: skip
    model = tiny_model(seed=rank, dtype=torch.float64)
    trainer = Trainer(model, random_windows(), random_windows(seed=1), next_token_loss, cfg)

    # Count DDP's gradient all-reduces: a comm hook runs once per gradient bucket and sync.
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buckets: list[int] = []

    def counting_allreduce(state, bucket):
        buckets.append(bucket.index())
        return allreduce_hook(state, bucket)

    trainer.train_model.register_comm_hook(None, counting_allreduce)
    trainer.fit()
    syncs = len(buckets) // len(set(buckets))
    assert syncs == cfg.max_steps, f"{syncs} gradient syncs in {cfg.max_steps} steps"


def test_two_processes_match_one_process_on_the_combined_batch(tmp_path):
    """2 ranks × batch 2 (gloo) == 1 process × batch 4: same losses and weights. Rank 1 starts
    from other weights: DDP must broadcast rank 0's. Each rank also counts DDP's gradient
    all-reduces: one per step, not one per micro-batch (no_sync on the first of the 2)."""
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)

    model = tiny_model(seed=0, dtype=torch.float64)
    cfg = config(tmp_path, "single", batch_size=4, grad_accum=2, max_steps=4, eval_every=2,
                 save_checkpoint=True)  # fmt: skip
    Trainer(model, random_windows(), random_windows(seed=1), next_token_loss, cfg).fit()

    np.testing.assert_allclose(train_losses(out), train_losses(tmp_path / "single"), rtol=1e-5)
    records = read_metrics(out / METRICS_NAME)
    assert [r["tokens_seen"] for r in records if r["kind"] == "train"] == [128, 256, 384, 512]
    ddp_model = tiny_model(seed=1, dtype=torch.float64)
    ddp_model.load_state_dict(torch.load(out / CHECKPOINT_NAME, weights_only=False)["model"])
    assert_same_weights(ddp_model, model)
    ckpt = torch.load(out / CHECKPOINT_NAME, weights_only=False)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


# --- command-line options (fastgpt/train/runner.py) -------------------------------------


@dataclasses.dataclass
class _Options:  # a task's own options: none
    pass


def _task(name: str, **defaults) -> type[Task]:
    class T(Task, name=name, options=_Options, defaults=defaults):
        pass

    return T


def parse(*argv, task=None) -> argparse.Namespace:
    task = task or _task("pretrain", epochs=1)
    parser = argparse.ArgumentParser(prog=f"fastgpt {task.name}")
    add_task_arguments(parser, task)
    return resolve_defaults(parser.parse_args([str(a) for a in argv]))


def model_options(args: argparse.Namespace) -> ModelOptions:
    return ModelOptions(
        init=args.init, model=args.model, dropout=args.dropout, backend=args.backend
    )


def test_training_arguments_defaults_and_config():
    args = parse()
    assert args.out_dir == "runs/pretrain" and args.resume is False and args.seed == 123
    cfg = train_config_from_args(args)
    assert cfg.epochs == 1 and cfg.max_steps is None
    cfg = train_config_from_args(parse("--max-steps", 7, "--grad-accum", 2, "--resume"))
    assert cfg.max_steps == 7 and cfg.epochs is None and cfg.grad_accum == 2 and cfg.resume
    assert train_config_from_args(parse("--resume", "x.pt")).resume == "x.pt"


def test_a_commands_default_epochs_yield_to_max_steps(capsys):
    """finetune-classify trains 5 epochs by default, but --max-steps alone sets the length."""
    task = _task("finetune-classify", epochs=5)
    parser = argparse.ArgumentParser(prog="fastgpt finetune-classify")
    add_task_arguments(parser, task)
    assert train_config_from_args(parse(task=task)).epochs == 5
    cfg = train_config_from_args(parse("--max-steps", "1000", task=task))
    assert cfg.max_steps == 1000 and cfg.epochs is None
    cfg = train_config_from_args(parse("--max-steps", "9", "--epochs", "2", task=task))
    assert (cfg.max_steps, cfg.epochs) == (9, 2)
    parser.print_help()
    assert "(default 5 unless" in capsys.readouterr().out
    assert train_config_from_args(parse("--no-checkpoint")).save_checkpoint is False


@pytest.mark.parametrize("command", ["finetune-classify", "finetune-instruct"])
def test_a_commands_defaults_reach_every_options_dataclass(command):
    """The fine-tunings' defaults={"dropout": 0.0} (a ModelOptions field, not TrainConfig's)
    apply: given no flags, ModelOptions.dropout is 0.0, not None (the model's 0.1)."""
    import importlib

    from fastgpt.cli import SUBCOMMANDS
    from fastgpt.options import options_from_args

    commands = importlib.import_module(SUBCOMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"fastgpt {command}")
    commands.add_arguments(parser)
    args = resolve_defaults(parser.parse_args([]))
    assert options_from_args(ModelOptions, args).dropout == 0.0
    assert train_config_from_args(args).lr == 5e-5
    args = resolve_defaults(parser.parse_args(["--dropout", "0.2"]))
    assert options_from_args(ModelOptions, args).dropout == 0.2
    assert options_from_args(ModelOptions, parse()).dropout is None  # pretrain: the model's


def test_a_dropout_finer_than_the_kernels_draw_needs_the_torch_backend():
    """The attention kernels drop at multiples of 1/256 (`kernel_dropout_p`): a rate that
    rounds to 0 is refused before training, unless the torch backend (exact rates) runs."""
    assert ModelOptions(dropout=0.001, backend="torch").dropout == 0.001
    assert ModelOptions(dropout=0.1).dropout == 0.1
    for backend in ("auto", "triton"):
        with pytest.raises(UsageError, match="multiples of 1/256"):
            ModelOptions(dropout=0.001, backend=backend)


def test_a_default_that_matches_no_option_is_an_error_at_the_class_line():
    with pytest.raises(TypeError, match=r"defaults \['drop_out'\] match no option"):
        _task("pretrain", drop_out=0.0)
    with pytest.raises(TypeError, match="lora_rank"):  # LoRA's options need uses_lora=True
        _task("pretrain", lora_rank=8)
    assert _task("pretrain", dropout=0.0, seed=1).defaults == {"dropout": 0.0, "seed": 1}


def test_every_option_is_a_field_with_its_docstring(capsys):
    """The help of each training option is the docstring of its TrainConfig field."""
    from fastgpt.options import field_docs

    parser = argparse.ArgumentParser(prog="fastgpt pretrain")
    add_task_arguments(parser, _task("pretrain"))
    parser.print_help()
    text = " ".join(capsys.readouterr().out.split())
    docs = field_docs(TrainConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert docs["grad_accum"].split(" (")[0] in text
    assert "--grad-accum GRAD_ACCUM" in text and "(default 1)" in text
    assert "--no-checkpoint" in text and "--resume [CHECKPOINT]" in text


def test_build_model(tmp_path):
    model = build_model(model_options(parse("--model", "tiny", "--dropout", 0.2)), seed=123)
    assert model.config.emb_dim == 32 and model.config.drop_rate == 0.2
    again = build_model(model_options(parse("--model", "tiny", "--dropout", 0.2)), seed=123)
    assert_same_weights(model, again, exact=True)  # seeded with --seed

    config_path = tmp_path / "config.json"
    GPTConfig.from_name("tiny", n_layers=1).to_json(config_path)
    assert len(build_model(model_options(parse("--model", config_path))).trf_blocks) == 1

    model.save_pretrained(tmp_path / "ckpt")
    loaded = build_model(model_options(parse("--init", tmp_path / "ckpt")))
    assert loaded.training
    assert_same_weights(loaded, model, exact=True)

    with pytest.raises(ValueError, match="unknown model preset"):
        build_model(model_options(parse("--model", "gpt5")))
    with pytest.raises(FileNotFoundError):
        build_model(model_options(parse("--model", tmp_path / "missing.json")))


class _RandomWindowsTask(Task, name="pretrain", options=_Options):
    """A training command on random windows whose hooks record what they were handed."""

    latest: _RandomWindowsTask  # the instance run_task made last

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handed: dict[str, object] = {}
        self.collated = 0
        type(self).latest = self

    def load_data(self) -> dict[str, SlidingWindowDataset]:
        self.handed["loaded"] = {"train": random_windows(), "val": random_windows(16 * 4 + 1, 1)}
        return self.handed["loaded"]

    def model_overrides(self, data) -> dict[str, int]:
        self.handed["overrides"] = data
        return {"vocab_size": VOCAB, "context_length": 16}

    def build(self, model, data) -> TrainingParts:
        self.handed["build"] = (model, data)

        def collate(items):
            self.collated += 1
            return torch.utils.data.default_collate(items)

        def metrics(model, loader) -> dict[str, float]:
            return {"answer": 42.0}

        parts = TrainingParts(data["train"], data["val"], collate, metrics, lambda m: "sample")
        self.handed["parts"] = parts
        return parts

    def loss(self, model, batch):
        return next_token_loss(model, batch)

    def finish(self, model, parts, out_dir, final) -> None:
        self.handed["finish"] = (model, parts, out_dir, final)


def run_random_windows(tmp_path) -> _RandomWindowsTask:
    """run_task on _RandomWindowsTask for 2 steps; returns the task it made."""
    args = parse("--model", "tiny", "--backend", "torch", "--device", "cpu", "--out",
                 tmp_path / "run", "--max-steps", 2, "--batch-size", 4, "--no-progress",
                 "--no-plot", "--no-checkpoint", task=_RandomWindowsTask)  # fmt: skip
    assert run_task(_RandomWindowsTask, args) == 0
    return _RandomWindowsTask.latest


def test_run_task_hands_each_hook_what_the_one_before_returned(tmp_path):
    task = run_random_windows(tmp_path)
    data = task.handed["loaded"]
    assert task.handed["overrides"] is data
    model, built_from = task.handed["build"]
    assert built_from is data and model.config.vocab_size == VOCAB  # the overrides shaped it
    finished_model, parts, out_dir, final = task.handed["finish"]
    assert finished_model is model and parts is task.handed["parts"]
    assert out_dir == tmp_path / "run" and final["step"] == 2
    assert final["answer"] == 42.0 and task.collated > 0  # the Trainer got parts' functions
    records = read_metrics(out_dir / METRICS_NAME)
    assert [r["sample"] for r in records if "sample" in r] == ["sample"]  # at the last step
    options = read_run_records(out_dir / RUN_RECORD_NAME)[0]["options"]
    assert options["model"] == "tiny" and options["backend"] == "torch"  # ModelOptions
    assert options["max_steps"] == 2 and options["out_dir"] == str(out_dir)  # TrainConfig


def test_run_task_reports_bad_input_in_one_line_but_a_bug_in_the_loop_as_it_is(
    tmp_path, monkeypatch
):
    """A ValueError while the data is read is bad input (UsageError, exit status 2 at the
    CLI); one from inside the training loop is a bug and propagates as it was raised."""

    def bad_file(self):
        raise ValueError("data.txt: line 3 is not UTF-8")

    with monkeypatch.context() as patch:
        patch.setattr(_RandomWindowsTask, "load_data", bad_file)
        with pytest.raises(UsageError, match="line 3 is not UTF-8"):
            run_random_windows(tmp_path)

    def planted_train_step(self, micro_batches):
        loss, grad_norm = (1.0, 2.0, 3.0)
        return loss, grad_norm

    monkeypatch.setattr(Trainer, "_train_step", planted_train_step)
    with pytest.raises(ValueError, match="too many values to unpack") as info:
        run_random_windows(tmp_path)
    assert not isinstance(info.value, UsageError)
    assert info.traceback[-1].name == "planted_train_step"


def test_mfu_formula_and_peak_table(tmp_path, monkeypatch):
    from fastgpt.devices import peak_flops
    from fastgpt.model import flops_per_token

    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda", 0)) == 756e12  # the longest matching name wins
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda", 0)) == 989.4e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some New GPU")
    assert peak_flops(torch.device("cuda", 0)) is None

    model = tiny_model()
    trainer = Trainer(model, random_windows(), None, next_token_loss, config(tmp_path))
    assert trainer.throughput(1000, 2.0, 16) == (500.0, None)  # no peak known on CPU
    trainer.throughput.peak_flops = 1e9
    _, mfu = trainer.throughput(1000, 2.0, 16)
    assert mfu == pytest.approx(500.0 * flops_per_token(model.config, 16) / 1e9)
