"""`--compile`: the model under torch.compile computes what it computes eagerly (loss and every
gradient, by the tolerance rule against float64), and a training command runs with it end to
end, its evaluation and text sample included. On CPU, Inductor compiles the torch backend."""

from __future__ import annotations

import copy

import pytest
import torch

from fastgpt.cli import main
from fastgpt.model import GPTModel
from fastgpt.model_config import GPTConfig
from fastgpt.train.metrics import METRICS_NAME, read_metrics
from fastgpt.train.runner import compile_model
from tests.tolerance import assert_close_to_reference


def _loss_and_grads(model: GPTModel, ids: torch.Tensor, targets: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss = model(ids, targets=targets)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_compiled_model_matches_eager_by_the_tolerance_rule():
    torch.manual_seed(0)
    config = GPTConfig.from_spec("tiny", context_length=16, drop_rate=0.0, vocab_size=97)
    eager = GPTModel(config, backend="torch").train()
    reference = copy.deepcopy(eager).double()
    compiled = compile_model(copy.deepcopy(eager))
    ids = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    targets[0, :3] = -100  # ignored targets, as padded batches have

    loss_eager, grads_eager = _loss_and_grads(eager, ids, targets)
    loss_ref, grads_ref = _loss_and_grads(reference, ids, targets)
    for _ in range(2):  # the second call runs the cached graph
        loss_compiled, grads_compiled = _loss_and_grads(compiled, ids, targets)
    assert compiled._compiled_call_impl is not None  # it did run compiled
    assert_close_to_reference(loss_compiled, loss_eager, loss_ref, dtype=torch.float32, name="loss")
    for name, grad in grads_compiled.items():
        assert_close_to_reference(
            grad, grads_eager[name], grads_ref[name], dtype=torch.float32, backward=True,
            name=name,
        )  # fmt: skip


@pytest.mark.usefixtures("tiktoken_available")
def test_pretrain_with_compile_runs_its_steps_evaluation_and_sample(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out = tmp_path / "run"
    rc = main([
        "pretrain", "--data", str(data), "--model", "tiny", "--context-length", "16",
        "--out", str(out), "--max-steps", "4", "--batch-size", "2", "--eval-every", "2",
        "--log-every", "1", "--sample-tokens", "4", "--no-progress", "--compile",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    records = read_metrics(out / METRICS_NAME)
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert "sample:" in capsys.readouterr().out
