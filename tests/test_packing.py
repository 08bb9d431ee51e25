"""Several sequences per row: `GPTModel.forward(..., segment_ids=)` equals running each
sequence alone, finetune-instruct --pack gives every example exactly its padded loss, and
pretrain --document-mask keeps each document to itself (fastgpt/segments.py)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from fastgpt.cli import main
from fastgpt.instruction import (
    IGNORE_INDEX,
    InstructionCollate,
    PackedInstructionCollate,
    PackedInstructionDataset,
)
from fastgpt.losses import next_token_loss
from fastgpt.model import GPTModel
from fastgpt.model_config import GPTConfig
from fastgpt.segments import document_segment_ids, packed_rows
from fastgpt.tokenizer import EOT_ID

from .tolerance import assert_close_to_reference

# Row 0 holds runs of 1, 7 and 9 tokens (odd sizes); row 1 is one run of 17 whose value recurs
# in row 0 (runs are per row, not per value).
SEGMENTS = torch.tensor([[4] + [0] * 7 + [9] * 9, [0] * 17])
RUNS = [(0, 0, 1), (0, 1, 8), (0, 8, 17), (1, 0, 17)]  # (row, start, end)


def tiny_model(backend: str, context_length: int = 64, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    config = GPTConfig.from_spec("tiny", context_length=context_length)
    return GPTModel(config, backend=backend).eval()


def each_run_alone(model: GPTModel, ids: torch.Tensor) -> torch.Tensor:
    """The logits (B, T, V) of each run of SEGMENTS computed as a batch of its own."""
    out = torch.empty(*ids.shape, model.config.vocab_size, dtype=torch.float64)
    for row, a, b in RUNS:
        out[row, a:b] = model(ids[row : row + 1, a:b])[0].double()
    return out


def test_packed_rows_restart_positions_at_each_run():
    rows = packed_rows(torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [5, 5, 3, 3, 3, 5, 5, 5]]))
    assert rows.positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 2, 0, 1, 2]]
    assert rows.cu_seqlens.dtype == torch.int32
    assert rows.cu_seqlens.tolist() == [0, 3, 5, 8, 10, 13, 16]  # over the 16 flat tokens
    assert rows.max_seqlen == 8


@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
def test_segment_forward_equals_each_segment_alone(backend):
    """fp32 packed logits vs each run alone in fp32 (PyTorch's error) and in fp64 (the
    reference); the triton backend runs its kernels through the interpreter on CPU."""
    model = tiny_model(backend)
    ids = torch.randint(0, 50257, SEGMENTS.shape)
    packed = model(ids, segment_ids=SEGMENTS)
    alone = each_run_alone(model.set_backend("torch"), ids)
    reference = each_run_alone(model.double(), ids)
    assert_close_to_reference(packed, alone, reference, dtype=torch.float32)
    # Without segment_ids the runs see each other: the test can fail.
    whole = model.float().set_backend(backend)(ids)
    assert (whole[0, 1:] - packed[0, 1:]).abs().max() > 1e-4


def test_segment_gradients_equal_each_segment_alone():
    """The loss's gradients through attention_varlen (torch backend) match the per-run loss."""
    model = tiny_model("torch")
    ids = torch.randint(0, 50257, SEGMENTS.shape)
    targets = torch.randint(0, 50257, SEGMENTS.shape)
    model(ids, targets=targets, segment_ids=SEGMENTS).backward()
    packed_grad = model.trf_blocks[0].att.qkv.weight.grad.clone()
    model.zero_grad()
    total = sum(
        F.cross_entropy(model(ids[r : r + 1, a:b])[0], targets[r, a:b], reduction="sum")
        for r, a, b in RUNS
    )
    (total / ids.numel()).backward()
    torch.testing.assert_close(packed_grad, model.trf_blocks[0].att.qkv.weight.grad)


def test_one_run_per_row_equals_no_segment_ids():
    model = tiny_model("torch")
    ids = torch.randint(0, 50257, (2, 9))
    torch.testing.assert_close(model(ids, segment_ids=torch.zeros_like(ids)), model(ids))


@pytest.mark.parametrize(
    ("segment_ids", "error", "message"),
    [
        ([[0, 0, 1]], TypeError, "must be a torch.Tensor"),
        (torch.zeros(1, 3), TypeError, "integer tensor, got torch.float32"),
        (torch.zeros(1, 3, dtype=torch.bool), TypeError, "integer tensor, got torch.bool"),
        (torch.zeros(1, 4, dtype=torch.long), ValueError, "token_ids' shape (1, 3)"),
        (torch.zeros(3, dtype=torch.long), ValueError, "got (3,)"),
        (torch.zeros(1, 3, dtype=torch.long, device="meta"), ValueError, "one device"),
    ],
)
def test_bad_segment_ids_are_clear_errors(segment_ids, error, message):
    model = tiny_model("torch")
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        model(torch.tensor([[1, 2, 3]]), segment_ids=segment_ids)


def test_segment_ids_with_a_kv_cache_is_a_clear_error():
    model = tiny_model("torch")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="cannot be combined with kv_cache"):
        model(ids, kv_cache=model.new_kv_cache(), segment_ids=torch.zeros_like(ids))


# --- packed instruction examples ---------------------------------------------------------


def instruction_items(seed: int = 0) -> list[tuple[list[int], int]]:
    """(token_ids, masked_length) items of odd lengths 1..40, some longer than the rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 17, 5, 40, 9, 2, 23, 31, 3, 11, 29, 13]
    return [(torch.randint(0, EOT_ID, (n,), generator=g).tolist(), (n * 2) // 3) for n in lengths]


def summed_example_losses(model, batches) -> list[torch.Tensor]:
    """Each example's summed token cross-entropy, in data order, from padded batches (one
    example a row) or packed ones (the examples are a row's runs of segment_ids, but for the
    padding run at the end of a short row)."""
    losses = []
    for batch in batches:
        segment_ids = batch.get("segment_ids")
        logits = model(batch["input_ids"], segment_ids=segment_ids)  # (B, T, V)
        token_losses = F.cross_entropy(
            logits.transpose(1, 2), batch["targets"], ignore_index=IGNORE_INDEX, reduction="none"
        )  # (B, T)
        for r in range(len(token_losses)):
            runs = [slice(None)] if segment_ids is None else row_runs(segment_ids[r])
            losses += [token_losses[r, run].sum() for run in runs if is_example(batch, r, run)]
    return losses


def row_runs(row: torch.Tensor) -> list[slice]:
    """The runs of equal consecutive values of one row (T,) as slices."""
    starts = [0, *((row[1:] != row[:-1]).nonzero().squeeze(1) + 1).tolist(), len(row)]
    return [slice(a, b) for a, b in itertools.pairwise(starts)]


def is_example(batch, r: int, run: slice) -> bool:
    """False for the padding at the end of a short packed row: its inputs are all
    <|endoftext|>, which the test items never hold."""
    return not bool((batch["input_ids"][r, run] == EOT_ID).all())


def example_targets(batches) -> list[list[int]]:
    """Each example's targets (IGNORE_INDEX included, padding left out) in data order."""
    out = []
    for batch in batches:
        for r, targets in enumerate(batch["targets"]):
            if "segment_ids" not in batch:
                n = int((batch["input_ids"][r] != EOT_ID).sum())  # the items hold no EOT
                out.append(targets[:n].tolist())
                continue
            runs = [run for run in row_runs(batch["segment_ids"][r]) if is_example(batch, r, run)]
            out += [targets[run].tolist() for run in runs]
    return out


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_packed_examples_keep_their_padded_targets_and_losses(mask_prompt):
    """Each example: the same targets packed as padded, and the same summed token loss
    (packed fp32 vs padded fp32 and fp64, the tolerance rule); so the dataset's sum too."""
    items, row_length = instruction_items(), 32
    packed_set = PackedInstructionDataset(items, row_length)
    # the rule: next fit in data order, each item taking min(len, 32) tokens
    assert packed_set.rows == [[0, 1, 2], [3], [4, 5], [6], [7], [8, 9], [10], [11]]
    padded = InstructionCollate(row_length, mask_prompt)
    packed = PackedInstructionCollate(row_length, mask_prompt)
    padded_batches = [padded(items[i : i + 4]) for i in range(0, len(items), 4)]
    rows = [packed_set[r] for r in range(len(packed_set))]
    packed_batches = [packed(rows[i : i + 3]) for i in range(0, len(rows), 3)]
    assert max(b["input_ids"].shape[1] for b in packed_batches) == row_length
    targets = example_targets(padded_batches)
    assert example_targets(packed_batches) == targets  # none crosses into the next example
    assert sum(t != IGNORE_INDEX for row in targets for t in row) > 60

    model = tiny_model("torch", context_length=row_length)
    packed_losses = torch.stack(summed_example_losses(model, packed_batches))
    padded_losses = torch.stack(summed_example_losses(model, padded_batches))
    padded64 = torch.stack(summed_example_losses(model.double(), padded_batches))
    assert packed_losses.shape == (len(items),)
    assert_close_to_reference(packed_losses, padded_losses, padded64, dtype=torch.float32)
    total = packed_losses.sum(), padded_losses.sum(), padded64.sum()
    assert_close_to_reference(*total, dtype=torch.float32)


# --- document masks in pretraining -------------------------------------------------------


def test_document_segments_start_at_each_end_of_text():
    ids = torch.tensor([[7, 8, EOT_ID, 9, EOT_ID, EOT_ID, 3]])
    assert document_segment_ids(ids, EOT_ID).tolist() == [[0, 0, 1, 1, 2, 3, 3]]


def test_document_mask_loss_equals_each_document_alone():
    """Windows with documents of 1, 5, 11 and 3 tokens (each after the first begins with
    <|endoftext|>): the masked mean loss equals the mean over each document run alone, the
    token before a separator still predicting it."""
    model = tiny_model("torch", context_length=32)
    g = torch.Generator().manual_seed(1)
    window = torch.randint(0, EOT_ID, (2, 21), generator=g)
    for row, starts in enumerate(([1, 6, 17], [4])):
        window[row, starts] = EOT_ID
    inputs, targets = window[:, :-1], window[:, 1:]  # (2, 20)
    assert targets[0, 5] == EOT_ID  # the last token of document 1 predicts the separator
    masked = next_token_loss(model, (inputs, targets), document_start_id=EOT_ID)
    documents = [(0, 0, 1), (0, 1, 6), (0, 6, 17), (0, 17, 20), (1, 0, 4), (1, 4, 20)]
    total = sum(
        F.cross_entropy(model(inputs[r : r + 1, a:b])[0], targets[r, a:b], reduction="sum")
        for r, a, b in documents
    )
    torch.testing.assert_close(masked, total / inputs.numel())
    assert (masked - next_token_loss(model, (inputs, targets))).abs() > 1e-6  # it can fail


# --- the commands ------------------------------------------------------------------------


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture
def long_tiny(tmp_path):
    """The tiny preset with a context of 256 tokens, room to pack a few examples a row."""
    path = tmp_path / "tiny-256.json"
    config = GPTConfig.from_spec("tiny", context_length=256)
    path.write_text(json.dumps(config.to_dict()), encoding="utf-8")
    return path


def test_finetune_instruct_pack_trains(tmp_path, data_dir, tiktoken_available, long_tiny, capsys):
    records = json.loads((data_dir / "instruction-data.json").read_text(encoding="utf-8"))[:40]
    data = tmp_path / "instructions.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    rc = run_cli(
        "finetune-instruct", "--model", long_tiny, "--data", data, "--out", tmp_path / "out",
        "--pack", "--mask-prompt", "--max-steps", 1, "--batch-size", 2, "--num-responses", 0,
        "--no-progress",
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    packed = int(printed.split("packed: 34 training examples into ")[1].split()[0])
    assert 34 // 4 <= packed < 34 // 2, printed  # records of about 50-100 tokens
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["validation_loss"] > 0


def test_pretrain_document_mask_on_files_and_prepared_shards(tmp_path, tiktoken_available, capsys):
    docs = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"Document {i} says hello {i} times."}) for i in range(120)]
    docs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = tmp_path / "corpus"
    assert run_cli("prepare-data", docs, "--out", corpus, "--val-fraction", 0.2,
                   "--no-progress") == 0  # fmt: skip
    for name, data in (("files", docs), ("shards", corpus)):
        rc = run_cli(
            "pretrain", "--data", data, "--model", "tiny", "--context-length", 32,
            "--document-mask", "--max-steps", 1, "--batch-size", 2, "--sample-tokens", 0,
            "--out", tmp_path / name, "--no-progress",
        )  # fmt: skip
        assert rc == 0, capsys.readouterr()
        assert "model saved to" in capsys.readouterr().out


def test_packing_refuses_compile(tmp_path, capsys):
    for command in (["finetune-instruct", "--pack"], ["pretrain", "--document-mask"]):
        rc = run_cli(*command, "--compile", "--model", "tiny", "--out", tmp_path / "x")
        assert rc == 2
        assert "does not work with --compile" in capsys.readouterr().err
