"""Instruction fine-tuning: reading and validating records, the Alpaca format, the split, the
collate function's shift / -100 / prompt-masking / truncation rules, and response generation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastgpt.classification import Splits
from fastgpt.instruction import (
    IGNORE_INDEX,
    InstructionCollate,
    InstructionDataset,
    extract_response,
    format_example,
    format_input,
    format_prompt,
    generate_responses,
    instruction_loss,
    load_instruction_data,
    perplexity,
    split_instruction_data,
)
from fastgpt.model import GPTModel
from fastgpt.model_config import GPTConfig
from fastgpt.tokenizer import EOT_ID

X = IGNORE_INDEX


class ToyTokenizer:
    """One token per character (id = code point): no BPE files needed."""

    def encode(self, text, disallowed_special=()):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i != EOT_ID)


def test_alpaca_format_as_the_book():
    record = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    expected_input = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd 2 and 3."
    )
    assert format_input(record) == expected_input
    assert format_prompt(record) == expected_input + "\n\n### Response:\n"
    assert format_example(record) == expected_input + "\n\n### Response:\n5"
    with_input = {**record, "input": "numbers"}
    assert format_input(with_input) == expected_input + "\n\n### Input:\nnumbers"


def test_load_real_data_and_book_split(data_dir):
    records = load_instruction_data(data_dir / "instruction-data.json")
    assert len(records) == 1100
    splits = split_instruction_data(records)
    assert isinstance(splits, Splits)  # one type and order for both fine-tunings' splits
    train, val, test = splits
    assert (splits.train, splits.val, splits.test) == (train, val, test)
    assert (len(train), len(test), len(val)) == (935, 110, 55)  # the book's sizes
    assert train[0] == records[0] and test[0] == records[935] and val[-1] == records[-1]


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"instruction": "a", "output": "b"},\n  {"instruction": }]',
         r"data.json:2:19: malformed"),
        ('{"instruction": "a"}', "expected a JSON list"),
        ("[]", "empty"),
        ('[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c"}]',
         "record 1 has no 'output'"),
        ('[{"input": "", "output": "b"}]', "record 0 has no 'instruction'"),
        ('[{"instruction": "a", "output": 3}]', "record 0: 'output' must be a string"),
        ('["just text"]', "record 0 is a str"),
    ],
)  # fmt: skip
def test_bad_instruction_files(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_instruction_data(path)


def test_instruction_file_not_utf8(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b'[\n{"instruction": "caf\xe9", "output": "b"}]')
    with pytest.raises(ValueError, match=r"data.json:2: not UTF-8 text"):
        load_instruction_data(path)


def test_missing_input_means_empty(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}]), encoding="utf-8")
    assert load_instruction_data(path) == [{"instruction": "a", "input": "", "output": "b"}]


def test_split_too_small_is_an_error():
    with pytest.raises(ValueError, match="split is empty"):
        split_instruction_data([{"instruction": "a", "output": "b"}] * 5)


# --- collate -----------------------------------------------------------------------------


def test_collate_shifts_pads_and_ignores_padding_after_first_end_token():
    items = [([1, 2, 3, 4], 2), ([5, 6], 1)]
    batch = InstructionCollate()(items)
    E = EOT_ID
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, E, E]]
    # The first end token stays a target (the model learns to stop); later padding is ignored.
    assert batch["targets"].tolist() == [[2, 3, 4, E], [6, E, X, X]]


def test_collate_masks_the_prompt():
    # prompt = first 3 tokens; the first response token (4) is predicted at position 2.
    batch = InstructionCollate(mask_prompt=True)([([1, 2, 3, 4, 5], 3), ([7, 8], 1)])
    E = EOT_ID
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, E, E, E]]
    assert batch["targets"].tolist() == [[X, X, 4, 5, E], [8, E, X, X, X]]


def test_collate_truncates_to_max_length():
    batch = InstructionCollate(max_length=3)([([1, 2, 3, 4, 5], 2), ([6], 1)])
    E = EOT_ID
    assert batch["input_ids"].tolist() == [[1, 2, 3], [6, E, E]]
    assert batch["targets"].tolist() == [[2, 3, 4], [E, X, X]]


def test_text_containing_end_token_is_not_mistaken_for_padding():
    E = EOT_ID
    batch = InstructionCollate()([([1, E, 2], 1), ([3], 1)])
    assert batch["targets"].tolist() == [[E, 2, E], [E, X, X]]


def test_dataset_drops_prompts_that_fill_max_length_with_a_warning():
    records = [
        {"instruction": "short", "input": "", "output": "ok"},
        {"instruction": "x" * 200, "input": "", "output": "never learned"},
        {"instruction": "tiny", "input": "in", "output": "fine"},
    ]
    prompt_lengths = [len(format_prompt(r)) for r in records]  # toy tokenizer: 1 char = 1 token
    max_length = prompt_lengths[2] + 1
    assert prompt_lengths[0] < max_length < prompt_lengths[1]
    with pytest.warns(UserWarning, match=r"dropped 1 of 3 records .*max_length=.*indices 1\)"):
        dataset = InstructionDataset(records, ToyTokenizer(), max_length=max_length)
    assert dataset.kept == [0, 2]
    assert dataset.longest_prompt == max(prompt_lengths[0], prompt_lengths[2])
    ids, masked_length = dataset[0]
    assert ids == [ord(c) for c in format_example(records[0])]
    # what --mask-prompt hides: the instruction and input, not the response header (the book's
    # exercise 7.2)
    assert masked_length == len(format_input(records[0])) < prompt_lengths[0]
    # Every kept record keeps at least one learnable target even with a masked prompt.
    collate = InstructionCollate(max_length=max_length, mask_prompt=True)
    for item in dataset:
        assert (collate([item])["targets"] != X).any()
    with pytest.raises(ValueError, match="no record fits"), pytest.warns(UserWarning):
        InstructionDataset(records[1:2], ToyTokenizer(), max_length=10)


# --- loss and generation -----------------------------------------------------------------


def tiny_model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig.from_name("tiny", context_length=48), backend="torch")


def test_loss_ignores_masked_targets_and_never_nans():
    model = tiny_model()
    batch = InstructionCollate(mask_prompt=True)([([1, 2, 3, 4, 5], 3), ([7, 8], 1)])
    loss = instruction_loss(model, batch)
    logits = model(batch["input_ids"])
    keep = batch["targets"] != X
    expected = torch.nn.functional.cross_entropy(logits[keep], batch["targets"][keep])
    torch.testing.assert_close(loss, expected)
    empty = {"input_ids": batch["input_ids"], "targets": torch.full_like(batch["targets"], X)}
    zero = instruction_loss(model, empty)
    assert zero.item() == 0.0 and zero.requires_grad
    assert perplexity(0.0) == 1.0 and math.isclose(perplexity(math.log(7)), 7.0)
    assert perplexity(1e6) == float("inf")


def test_generate_responses_adds_model_response():
    model = tiny_model()
    records = [{"instruction": "a", "input": "", "output": "b", "id": 7}]
    out = generate_responses(model, records, ToyTokenizer(), max_new_tokens=3, progress=False)
    assert out[0]["id"] == 7 and out[0]["output"] == "b"
    assert isinstance(out[0]["model_response"], str)
    # a prompt longer than the model's context keeps its end (context 48 here)
    long_record = {"instruction": "x" * 100, "input": "", "output": "b"}
    out = generate_responses(model, [long_record], ToyTokenizer(), max_new_tokens=3, progress=False)
    assert isinstance(out[0]["model_response"], str)
    assert extract_response("### Response:\n  hi there \n") == "hi there"
    assert extract_response("  plain ") == "plain"


def test_packed_rows_follow_data_order_and_truncate_like_padding():
    """Next fit in data order; an example longer than a row fills one row alone, truncated as
    the padded collate truncates it, its end token beyond the row left out."""
    from fastgpt.instruction import PackedInstructionCollate, PackedInstructionDataset

    items = [([1, 2, 3], 1), ([4, 5, 6, 7, 8, 9], 2), ([10], 0), ([11, 12], 1)]
    packed = PackedInstructionDataset(items, row_length=4)
    assert packed.rows == [[0], [1], [2, 3]]
    batch = PackedInstructionCollate(max_length=4)([packed[0], packed[1], packed[2]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, EOT_ID], [4, 5, 6, 7], [10, 11, 12, EOT_ID]]
    assert batch["targets"].tolist() == [
        [2, 3, EOT_ID, IGNORE_INDEX], [5, 6, 7, 8], [EOT_ID, 12, EOT_ID, IGNORE_INDEX]
    ]  # fmt: skip
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 2]]
    with pytest.raises(ValueError, match="row_length must be >= 1"):
        PackedInstructionDataset(items, row_length=0)
