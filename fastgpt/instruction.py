"""Instruction fine-tuning (the book's chapter 7): teach GPT to answer Alpaca-style requests.

    JSON list of {"instruction", "input", "output"}
      -> Alpaca text:  prompt (instruction [+ input] + "### Response:") + output
      -> token ids + <|endoftext|>, padded with <|endoftext|> to the batch's longest
      -> inputs = ids[:-1], targets = ids[1:]                              (B, T) each
         targets after the first <|endoftext|> are -100 (ignored by cross-entropy), and with
         mask_prompt also every target that is a prompt token
      -> next-token cross-entropy over the targets that are not -100

Why keep the first <|endoftext|> as a target: the model must learn to stop. Why -100 after it:
padding is not text to learn. Why mask the prompt (optional): the loss then measures only the
answer, not how well the model copies the instruction.

With packing (`finetune-instruct --pack`), the examples are laid one after another into rows
of up to max_length tokens instead (`PackedInstructionDataset`, `PackedInstructionCollate`),
each with exactly the inputs and targets above and a segment id of its own, so that the model
(`segment_ids=`) keeps each example to itself: no padding is computed, no loss changes.

The data is split in file order, 85% train, 10% test, 5% validation (the book's order).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fastgpt.errors import ConfigError
from fastgpt.files import parse_json
from fastgpt.segments import pack_batch
from fastgpt.tokenizer import EOT_ID

if TYPE_CHECKING:
    from fastgpt.classification import Splits

IGNORE_INDEX = -100
"""Target value cross-entropy skips (`ignore_index` of F.cross_entropy)."""
REQUIRED_KEYS = ("instruction", "output")
PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
RESPONSE_HEADER = "\n\n### Response:\n"


# --- reading and formatting --------------------------------------------------------------


def load_instruction_data(path: str | Path) -> list[dict[str, str]]:
    """Read a JSON list of records with string "instruction" and "output" and an optional
    string "input" (missing = ""). Raises ValueError naming the file and line/column of
    malformed JSON, or the index of a bad record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    from fastgpt.text_data import read_utf8

    text = read_utf8(path)
    if not text.strip():
        raise ValueError(f"{path}: empty file, expected a JSON list of records")
    data = parse_json(
        text,
        list,
        lambda exc: f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}",
        f"{path}: expected a JSON list of records, got",
    )
    if not data:
        raise ValueError(f"{path}: the list of records is empty")
    records = []
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}: record {index} is a {type(record).__name__}, expected an object "
                'with "instruction", "input" and "output"'
            )
        for key in REQUIRED_KEYS:
            if key not in record:
                raise ValueError(f"{path}: record {index} has no {key!r} key")
        for key in ("instruction", "input", "output"):
            if key in record and not isinstance(record[key], str):
                raise ValueError(
                    f"{path}: record {index}: {key!r} must be a string, got "
                    f"{type(record[key]).__name__}"
                )
        records.append({**record, "input": record.get("input", "")})
    return records


def format_input(record: dict[str, str]) -> str:
    """The preamble, the instruction and, when non-empty, the input (no response header)."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{record['instruction']}"
    if record.get("input"):
        text += f"\n\n### Input:\n{record['input']}"
    return text


def format_prompt(record: dict[str, str]) -> str:
    """What the model sees before its answer: `format_input` + "\\n\\n### Response:\\n"."""
    return format_input(record) + RESPONSE_HEADER


def format_example(record: dict[str, str]) -> str:
    """The full training text: prompt followed by the output."""
    return format_prompt(record) + record["output"]


def split_instruction_data(
    records: Sequence[dict[str, Any]], fractions: Sequence[float] = (0.85, 0.10, 0.05)
) -> Splits:
    """Splits(train, val, test) cut in file order as the book does: train the first 85%, test
    the next 10%, validation the rest (`fractions` are those of train, test, validation, in
    that file order). Raises ValueError when a split comes out empty."""
    from fastgpt.classification import Splits, split_fractions

    ranges = split_fractions(len(records), fractions, ("train", "test", "validation"))
    train, test, val = (list(records[a:b]) for a, b in ranges)
    return Splits(train=train, val=val, test=test)


# --- dataset and batches -----------------------------------------------------------------


class InstructionDataset(Dataset):
    """Each record as (token_ids of the full text, number of tokens --mask-prompt hides).

    The hidden part is the instruction and input (`format_input`), as the book's exercise 7.2
    masks it: the "### Response:" header after it is learned.

    With `max_length`, a record whose prompt alone is longer than max_length would have no
    response token left to learn from after truncation (with a masked prompt, a batch of only
    such records has every target -100 and a NaN loss), so it is dropped with a warning.
    `kept` holds the indices of the records kept, `longest_prompt` the longest prompt among
    them in tokens.
    """

    def __init__(self, records: Sequence[dict[str, str]], tokenizer, max_length: int | None = None):
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.items: list[tuple[list[int], int]] = []
        self.kept: list[int] = []
        dropped, prompt_lengths = [], []
        for index, record in enumerate(records):
            prompt_ids = tokenizer.encode(format_prompt(record), disallowed_special=())
            output_ids = tokenizer.encode(record["output"], disallowed_special=())
            # Encoding the two parts separately keeps the prompt/response boundary exact (BPE
            # merges never cross it: the prompt ends in "\n").
            if max_length is not None and len(prompt_ids) > max_length:
                dropped.append(index)
                continue
            masked = len(tokenizer.encode(format_input(record), disallowed_special=()))
            self.items.append((prompt_ids + output_ids, masked))
            self.kept.append(index)
            prompt_lengths.append(len(prompt_ids))
        if dropped:
            shown = ", ".join(map(str, dropped[:10])) + (", ..." if len(dropped) > 10 else "")
            warnings.warn(
                f"dropped {len(dropped)} of {len(records)} records whose prompt alone is longer "
                f"than max_length={max_length} tokens (indices {shown})",
                stacklevel=2,
            )
        self.longest_prompt = max(prompt_lengths, default=0)
        if not self.items:
            raise ConfigError(
                "max_length", f"{max_length}: no record fits, every prompt is longer; raise it"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.items[i]


class InstructionCollate:
    """Batches (token_ids, masked_length) items into {"input_ids": (B, T), "targets": (B, T)}.

    Per item: ids + [<|endoftext|>], padded with <|endoftext|> to the batch's longest + 1;
    inputs = padded[:-1], targets = padded[1:]. Targets after the first <|endoftext|> target are
    IGNORE_INDEX; with mask_prompt so are the targets that are instruction tokens (positions
    before masked_length - 1, the book's exercise 7.2). Then both are truncated to max_length.
    Padding is found from each item's length, not by searching for token 50256, so a text that
    contains <|endoftext|> keeps it.
    """

    def __init__(
        self, max_length: int | None = None, mask_prompt: bool = False, pad_id: int = EOT_ID
    ):
        self.max_length = max_length
        self.mask_prompt = mask_prompt
        self.pad_id = pad_id

    def __call__(self, items: Sequence[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in items)  # = longest (ids + end token) - 1
        if self.max_length is not None:
            width = min(width, self.max_length)
        inputs = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, masked_length) in enumerate(items):
            # width >= min(len(ids), max_length): the example's own tokens always fit
            example = example_tensors(ids, masked_length, width, self.mask_prompt, self.pad_id)
            n = len(example[0])
            inputs[row, :n], targets[row, :n] = example
        return {"input_ids": inputs, "targets": targets}


def example_tensors(
    ids: Sequence[int], masked_length: int, max_length: int | None, mask_prompt: bool,
    pad_id: int = EOT_ID,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One example's (inputs, targets), (n,) long each, n = min(len(ids), max_length): what
    it contributes to a batch, padded (`InstructionCollate`) or packed (`PackedInstructionCollate`)
    alike. inputs = ids[:n], targets = (ids + [end token])[1 : n + 1]; with mask_prompt the
    targets before masked_length - 1 (the instruction) are IGNORE_INDEX."""
    sequence = torch.tensor([*ids, pad_id], dtype=torch.long)  # text + end token
    n = len(ids) if max_length is None else min(len(ids), max_length)
    inputs, targets = sequence[:n], sequence[1 : n + 1].clone()  # the end token if it fits
    if mask_prompt:
        targets[: max(masked_length - 1, 0)] = IGNORE_INDEX
    return inputs, targets


# --- packing ------------------------------------------------------------------------------


class PackedInstructionDataset(Dataset):
    """The examples of an InstructionDataset packed into rows of up to row_length tokens.

    The rule (deterministic, in data order): each example takes n = min(len(ids), row_length)
    tokens (what the padded collate gives it); it joins the current row when the row still has
    n tokens free, else it starts a new row. Concatenating the rows gives the examples in the
    dataset's order. Item r is row r's list of (token_ids, masked_length) items, which
    `PackedInstructionCollate` turns into one row of a batch. The rows, not the examples, are
    then what a training run shuffles and batches (--batch-size counts rows)."""

    def __init__(self, examples: Dataset, row_length: int):
        if row_length < 1:
            raise ValueError(f"row_length must be >= 1, got {row_length}")
        self.examples, self.row_length = examples, row_length
        self.rows: list[list[int]] = []  # example indices of each row
        free = 0  # tokens left in the last row
        for index in range(len(examples)):
            n = min(len(examples[index][0]), row_length)
            if n > free:
                self.rows.append([])
                free = row_length
            self.rows[-1].append(index)
            free -= n

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> list[tuple[list[int], int]]:
        return [self.examples[i] for i in self.rows[r]]


class PackedInstructionCollate:
    """Batches packed rows (lists of (token_ids, masked_length) items) into {"input_ids",
    "targets", "segment_ids"}, each (B, T) long, T the batch's longest row.

    A row is its examples' `example_tensors` one after another, example j of the row with
    segment id j, so that with `GPTModel.forward(..., segment_ids=...)` each example attends
    only to itself and its positions restart at 0: every example gets exactly the inputs and
    targets (and so the summed token loss) the padded `InstructionCollate` gives it, and no
    target crosses from one example into the next. A row shorter than T ends in padding
    (<|endoftext|> inputs, IGNORE_INDEX targets) with a segment id of its own."""

    def __init__(self, max_length: int, mask_prompt: bool = False, pad_id: int = EOT_ID):
        self.max_length, self.mask_prompt, self.pad_id = max_length, mask_prompt, pad_id

    def __call__(self, rows: Sequence[Sequence[tuple[list[int], int]]]) -> dict[str, torch.Tensor]:
        packed = [self._row(row) for row in rows]  # (inputs, targets, segment ids) (n_r,) each
        shape = (len(rows), max(len(inputs) for inputs, _, _ in packed))  # (B, T)
        inputs = torch.full(shape, self.pad_id, dtype=torch.long)
        targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        segment_ids = torch.zeros(shape, dtype=torch.long)
        for r, (row_inputs, row_targets, row_segments) in enumerate(packed):
            n = len(row_inputs)
            inputs[r, :n], targets[r, :n], segment_ids[r, :n] = (
                row_inputs,
                row_targets,
                row_segments,
            )
            segment_ids[r, n:] = len(rows[r])  # the padding: a run of its own
        return {"input_ids": inputs, "targets": targets, "segment_ids": segment_ids}

    def _row(self, row: Sequence[tuple[list[int], int]]) -> tuple[torch.Tensor, ...]:
        """One row's examples joined: (inputs, targets, segment ids), (n,) long each."""
        inputs, targets, segments = [], [], []
        for j, (ids, masked_length) in enumerate(row):
            example = example_tensors(ids, masked_length, self.max_length, self.mask_prompt,
                                      self.pad_id)  # fmt: skip
            inputs.append(example[0])
            targets.append(example[1])
            segments.append(torch.full_like(example[0], j))
        return torch.cat(inputs), torch.cat(targets), torch.cat(segments)


def instruction_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that are not IGNORE_INDEX (a scalar).

    A batch without any target gives 0 (connected to the graph) instead of NaN. A packed
    batch's "segment_ids" (B, T) keep each example to itself (`PackedInstructionCollate`)."""
    device = next(model.parameters()).device
    segment_ids = batch.get("segment_ids")
    if segment_ids is not None:  # found on the host (no device sync), then moved
        segment_ids = pack_batch(segment_ids, batch["input_ids"], device)
    inputs = batch["input_ids"].to(device)  # (B, T)
    targets = batch["targets"].to(device)  # (B, T)
    loss = model(inputs, targets=targets, ignore_index=IGNORE_INDEX, segment_ids=segment_ids)
    # No target: the mean is 0 / 0 = nan; 0 instead, chosen on the device (no sync). Its
    # gradient is 0: every row is ignored, so the loss's backward gives zeros, never nan.
    return torch.where((targets != IGNORE_INDEX).any(), loss, 0.0)


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy in nats); inf when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


# --- generating responses ----------------------------------------------------------------


def extract_response(text: str) -> str:
    """The answer part of generated text: what follows "### Response:", stripped."""
    marker = RESPONSE_HEADER.strip()
    if marker in text:
        text = text.split(marker, 1)[1]
    return text.strip()


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    records: Sequence[dict[str, Any]],
    tokenizer,
    max_new_tokens: int = 256,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Each record with "model_response": the greedy continuation of its instruction and input
    (`format_input`, as the book generates: the model writes the "### Response:" header
    itself, which `extract_response` strips), stopped at <|endoftext|> (fastgpt.generate).
    Prompts longer than the context keep their last tokens."""
    from tqdm.auto import tqdm

    from fastgpt.generation import generate

    device = next(model.parameters()).device
    context = model.config.context_length
    results = []
    for record in tqdm(records, desc="generating responses", disable=not progress):
        prompt_ids = tokenizer.encode(format_input(record), disallowed_special=())
        prompt_ids = prompt_ids[-max(context - 1, 1) :]
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
        out = generate(model, prompt, max_new_tokens, temperature=0.0, eos_id=EOT_ID)
        new_ids = out[0, prompt.shape[1] :].tolist()
        if EOT_ID in new_ids:
            new_ids = new_ids[: new_ids.index(EOT_ID)]
        response = extract_response(tokenizer.decode(new_ids))
        results.append({**record, "model_response": response})
    return results
