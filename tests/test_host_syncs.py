"""No host-device sync in a training step between reporting steps: pretraining (plain and with
the document mask), instruction fine-tuning (padded and packed) and classification fine-tuning,
on the triton backend (CPU: the kernels through Triton's interpreter), with the trainer's CUDA
configuration: a fused AdamW, whose `found_inf` lets the loop guard against a non-finite step
without a sync (`Trainer._reports`; on CPU the trainer's AdamW is not fused and every step
reports, as reading a value there waits on nothing).

A sync is any call that needs a tensor's values on the host: `Tensor.item`, `tolist`,
`__bool__`, `__int__`, `__float__`, `nonzero` (method and `torch.nonzero`) and `cpu`. They are
counted by patching those functions (a TorchFunctionMode or TorchDispatchMode would not see the
calls made inside our custom ops). On CPU host and device are one, so the count also sees the
one legitimate host read: the packing of a batch's segment ids (`fastgpt.segments.packed_rows`)
that the loss runs on the batch as the DataLoader gave it, on the host, before it moves to the
device (`pack_batch`). That call is told apart by its caller (`pack_batch`, never the model)
and counted on its own."""

from __future__ import annotations

import collections
import sys

import numpy as np
import pytest
import torch

from fastgpt.classification import ClassificationCollate, classification_loss, replace_head
from fastgpt.instruction import (
    IGNORE_INDEX,
    InstructionCollate,
    PackedInstructionCollate,
    PackedInstructionDataset,
    instruction_loss,
)
from fastgpt.losses import next_token_loss
from fastgpt.model import GPTModel
from fastgpt.model_config import GPTConfig
from fastgpt.text_data import SlidingWindowDataset
from fastgpt.train import NonFiniteLossError, TrainConfig, Trainer

VOCAB, CONTEXT = 97, 16
SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu")


class SyncCounter:
    """Counts the calls of SYNCS while `active`; calls of `nonzero` made by `packed_rows` for
    `pack_batch` (a loss packing its batch on the host) go to `host_packing` instead."""

    def __init__(self, monkeypatch):
        self.active = False
        self.calls: collections.Counter[str] = collections.Counter()
        self.host_packing = 0
        for name in SYNCS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch, "nonzero", self._wrap("nonzero", torch.nonzero))

    def _wrap(self, name, original):
        counter = self

        def counted(*args, **kwargs):
            if counter.active:
                counter.active = False  # a sync's own nested calls are not more syncs
                try:
                    counter._count(name)
                    return original(*args, **kwargs)
                finally:
                    counter.active = True
            return original(*args, **kwargs)

        return counted

    def _count(self, name: str) -> None:
        frame = sys._getframe(2)  # 0 _count, 1 counted, 2 the function making the call
        caller = frame.f_back
        if (
            name == "nonzero"
            and frame.f_code.co_name == "packed_rows"
            and caller is not None
            and caller.f_code.co_name == "pack_batch"
        ):
            self.host_packing += 1
        else:
            self.calls[name] += 1


def tiny_model(**overrides) -> GPTModel:
    torch.manual_seed(0)
    # No dropout (slow through the interpreter): the dropout paths are counted below, alone.
    fields = dict(vocab_size=VOCAB, context_length=CONTEXT, drop_rate=0.0, n_layers=1)
    config = GPTConfig.from_name("tiny", **{**fields, **overrides})
    model = GPTModel(config, backend="triton")
    model.check_inputs = False  # as the training commands do, having checked the data once
    return model


def windows(seed: int = 0) -> SlidingWindowDataset:
    ids = np.random.default_rng(seed).integers(0, VOCAB, CONTEXT * 12 + 1).astype(np.uint16)
    ids[::5] = VOCAB - 1  # a "document start" every 5 tokens for the document mask
    return SlidingWindowDataset(ids, context_length=CONTEXT)


def instruction_items(n: int = 12) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(1)
    return [(rng.integers(0, VOCAB, int(rng.integers(4, 9))).tolist(), 2) for _ in range(n)]


def classification_items(n: int = 12) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(2)
    return [
        (rng.integers(0, VOCAB, int(rng.integers(3, CONTEXT))).tolist(), i % 2) for i in range(n)
    ]


def _pretrain(document_mask: bool):
    loss = next_token_loss
    if document_mask:

        def loss(model, batch):
            return next_token_loss(model, batch, document_start_id=VOCAB - 1)

    return tiny_model(), windows(), loss, {}


def _instruct(pack: bool):
    items = instruction_items()
    if pack:
        data = PackedInstructionDataset(items, CONTEXT)
        collate = PackedInstructionCollate(CONTEXT, mask_prompt=True, pad_id=0)
    else:
        data, collate = items, InstructionCollate(CONTEXT, mask_prompt=True, pad_id=0)
    return tiny_model(), data, instruction_loss, {"collate_fn": collate}


def _classify():
    model = tiny_model()
    replace_head(model, 2)
    collate = ClassificationCollate(pad_to=CONTEXT, pad_id=0)
    return model, classification_items(), classification_loss, {"collate_fn": collate}


RUNS = {
    "pretrain": lambda: _pretrain(False),
    "pretrain --document-mask": lambda: _pretrain(True),
    "finetune-instruct": lambda: _instruct(False),
    "finetune-instruct --pack": lambda: _instruct(True),
    "finetune-classify": _classify,
}


def fused_adamw(monkeypatch) -> None:
    """The trainer builds a fused AdamW, as on CUDA (torch's fused AdamW also runs on CPU)."""
    from fastgpt.train import loop

    make = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda *args, **kw: make(*args, fused=True))


def _counted_steps(tmp_path, monkeypatch, run: str, max_steps: int = 3, grad_accum: int = 1):
    """[(syncs counted, host packings)] of each optimizer step of `run` (log_every 3: steps 1
    (the first) and 3 (a log step, the last) report; step 2 must not sync)."""
    model, data, loss_fn, extra = RUNS[run]()
    fused_adamw(monkeypatch)
    config = TrainConfig(
        out_dir=str(tmp_path / "run"), batch_size=2, grad_accum=grad_accum, lr=1e-3,
        max_steps=max_steps, log_every=3, eval_every=0, progress=False, plot=False,
        save_checkpoint=False, seed=0,
    )  # fmt: skip
    trainer = Trainer(model, data, None, loss_fn, config, **extra)
    counter = SyncCounter(monkeypatch)
    steps = []
    train_step = trainer._train_step

    def counted_step(micro_batches):
        counter.calls.clear()
        counter.host_packing = 0
        counter.active = True
        try:
            return train_step(micro_batches)
        finally:
            counter.active = False
            steps.append((dict(counter.calls), counter.host_packing))

    monkeypatch.setattr(trainer, "_train_step", counted_step)
    trainer.fit()
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_no_sync_between_reporting_steps(tmp_path, monkeypatch, run):
    steps = _counted_steps(tmp_path, monkeypatch, run)
    assert len(steps) == 3
    assert steps[1][0] == {}, f"{run}: step 2 synced: {steps[1][0]}"
    # The reporting steps copy the held losses to the host: one tolist, nothing else.
    for step in (0, 2):
        assert steps[step][0] == {"tolist": 1}, f"{run}: step {step + 1}: {steps[step][0]}"
    packed = run.endswith(("--document-mask", "--pack"))
    assert all(host == (1 if packed else 0) for _, host in steps)  # once per micro-batch


def test_counter_sees_syncs_inside_custom_ops(monkeypatch):
    """The counter is not blind inside our ops: the fused loss's own target check (on by default
    for a direct call) and the varlen attention's cu_seqlens check are seen."""
    from fastgpt.kernels import attention_varlen, fused_linear_cross_entropy

    counter = SyncCounter(monkeypatch)
    counter.active = True
    h, w = torch.randn(4, 16), torch.randn(10, 16)
    fused_linear_cross_entropy(h, w, torch.tensor([1, 2, 3, 4]))
    q = torch.randn(8, 2, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    attention_varlen(q, q, q, cu, cu, 8, 8)
    counter.active = False
    assert counter.calls["__bool__"] >= 1 and counter.calls["tolist"] >= 1


def test_dropout_needs_no_sync(monkeypatch):
    """Dropout draws its seed on the device; the varlen kernel's Tq·Tk < 2^31 check is answered
    by max_seqlen on the host. Forward and backward of both attentions, as the model calls them."""
    from fastgpt.backends import BACKENDS

    ops = BACKENDS["triton"]
    torch.manual_seed(0)
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    packed = torch.randn(8, 2, 16, requires_grad=True)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    counter = SyncCounter(monkeypatch)
    counter.active = True
    out = ops.attention(q, q, q, causal=True, dropout_p=0.5)
    out_varlen = ops.attention_varlen(packed, packed, packed, cu, cu, 8, 8, dropout_p=0.5)
    (out.sum() + out_varlen.sum()).backward()
    counter.active = False
    assert dict(counter.calls) == {}
    assert packed.grad is not None and q.grad is not None


def test_a_non_finite_step_between_reports_is_skipped_and_raised_at_the_next(tmp_path, monkeypatch):
    """Step 2 (not a reporting step) has a nan loss: no sync there, so fused AdamW's found_inf
    skips it and step 3; step 3 reports and raises naming step 2, with the parameters of step
    1, as a run that syncs every step would leave them."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = next_token_loss(model, batch)
        return loss * float("nan") if calls["n"] == 2 else loss

    def run(name, max_steps, loss):
        torch.manual_seed(0)
        config = GPTConfig.from_name("tiny", vocab_size=VOCAB, context_length=CONTEXT)
        model = GPTModel(config, backend="torch")
        cfg = TrainConfig(
            out_dir=str(tmp_path / name), batch_size=2, lr=1e-3, max_steps=max_steps,
            lr_decay_steps=5, log_every=3, eval_every=0, progress=False, plot=False,
            save_checkpoint=False, seed=0,
        )  # fmt: skip
        return model, Trainer(model, windows(), None, loss, cfg)

    fused_adamw(monkeypatch)
    model, trainer = run("nan", 5, loss_fn)
    assert trainer.optimizer.defaults["fused"]
    with pytest.raises(NonFiniteLossError, match=r"step 2: non-finite training loss nan"):
        trainer.fit()
    assert trainer.step == 1 and calls["n"] == 3
    clean, clean_trainer = run("clean", 1, next_token_loss)
    clean_trainer.fit()
    for (name, got), want in zip(
        model.state_dict().items(), clean.state_dict().values(), strict=True
    ):
        assert torch.equal(got, want), name
    state = trainer.optimizer.state[next(iter(model.parameters()))]
    assert int(state["step"]) == 1


def test_ignored_targets_need_no_sync(monkeypatch):
    """instruction_loss of a batch whose targets are all IGNORE_INDEX: 0 with zero gradients,
    found without reading the targets on the host."""
    model = tiny_model(drop_rate=0.0)
    batch = {
        "input_ids": torch.ones(2, 8, dtype=torch.long),
        "targets": torch.full((2, 8), IGNORE_INDEX),
    }
    counter = SyncCounter(monkeypatch)
    counter.active = True
    loss = instruction_loss(model, batch)
    loss.backward()
    counter.active = False
    assert dict(counter.calls) == {}
    assert loss.detach().numpy().item() == 0.0
    assert all(not p.grad.any().numpy() for p in model.parameters() if p.grad is not None)


def test_tma_legality_is_decided_once_per_layout():
    """The attention launcher asks `_tma_legal` on every forward call; the answer is kept per
    layout (shapes, strides, element size, base alignment), so a training loop's calls after
    the first are a dictionary lookup."""
    import importlib

    attention_module = importlib.import_module("fastgpt.kernels.flash_attention")
    attention_module._tma_legal_layout.cache_clear()
    fused = torch.zeros(2, 17, 3, 2, 16, dtype=torch.float16)
    q, k, v = fused.permute(2, 0, 3, 1, 4).unbind(0)
    for _ in range(3):
        assert attention_module._tma_legal(q, k, v)
    assert not attention_module._tma_legal(q, k, v.transpose(-1, -2))
    info = attention_module._tma_legal_layout.cache_info()
    assert (info.misses, info.hits) == (2, 2)
