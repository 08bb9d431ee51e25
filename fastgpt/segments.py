"""Several sequences in one row of a batch: `segment_ids` -> positions and cu_seqlens.

    segment_ids (B, T) integer, e.g. a row [0 0 0 1 1 2 2 2]: three sequences of 3, 2, 3 tokens
      -> positions (B, T):           [0 1 2 0 1 0 1 2]   (restart at each sequence's start)
      -> cu_seqlens (n + 1,) int32:  the starts of the n sequences of the B·T flattened tokens,
                                     then B·T (what `attention_varlen` takes)

Each maximal run of equal consecutive values in a row is one sequence (a document, or one packed
instruction example); a run never crosses rows. `GPTModel.forward(..., segment_ids=...)` feeds
these to the position embedding and to `Ops.attention_varlen`, so a token attends (causally)
only to the tokens of its own run.

Where they are found: the number of runs sizes cu_seqlens, so `packed_rows` reads the segment
ids (`nonzero`). The training losses find them with `pack_batch` on the batch as the
DataLoader gives it, on the host, and move the result to the device: a step then waits on no
device.
cu_seqlens built here are valid by construction (start at 0, non-decreasing, end at B·T, no run
longer than T), which is why the model's varlen attention skips re-reading them.

`document_segment_ids` makes the segment ids of pretraining's document mask: a new document
starts at each <|endoftext|>, which is the document's first token, as in GPT-2's data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedRows:
    """The runs of one batch's segment_ids, as the model's layers need them."""

    positions: torch.Tensor
    """(B, T) long: each token's position within its run (0 at the run's first token)."""
    cu_seqlens: torch.Tensor
    """(num_runs + 1,) int32 prefix sums of the runs' lengths over the B·T flattened tokens."""
    max_seqlen: int
    """A bound on the longest run: T (a run never crosses rows; no device-to-host sync)."""

    def to(self, device: torch.device | str) -> PackedRows:
        """These runs on `device` (a copy that does not wait for the device)."""
        positions = self.positions.to(device, non_blocking=True)
        return PackedRows(positions, self.cu_seqlens.to(device, non_blocking=True), self.max_seqlen)


def check_segment_ids(segment_ids: object, token_ids: torch.Tensor) -> None:
    """Raise TypeError / ValueError unless `segment_ids` is an integer (not bool) tensor of
    token_ids' shape (B, T) on token_ids' device."""
    if not isinstance(segment_ids, torch.Tensor):
        raise TypeError(f"segment_ids must be a torch.Tensor, got {type(segment_ids).__name__}")
    dtype = segment_ids.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"segment_ids must be an integer tensor, got {dtype}")
    if segment_ids.shape != token_ids.shape:
        raise ValueError(
            f"segment_ids must have token_ids' shape {tuple(token_ids.shape)}, got "
            f"{tuple(segment_ids.shape)}"
        )
    if segment_ids.device != token_ids.device:
        raise ValueError(
            f"segment_ids is on {segment_ids.device}, token_ids on {token_ids.device}: put "
            "them on one device"
        )


def packed_rows(segment_ids: torch.Tensor) -> PackedRows:
    """Positions and cu_seqlens of the runs of equal consecutive values in each row of
    segment_ids (B, T), on its device. Reads the values (the number of runs): a device-to-host
    sync unless segment_ids is on the host."""
    b, t = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)  # (B, T): a run starts here
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    index = torch.arange(t, device=segment_ids.device).expand(b, t)  # (B, T)
    run_start = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T) its run's start
    positions = index - run_start
    first_tokens = starts.flatten().nonzero().squeeze(1)  # (num_runs,), in flattened order
    total = first_tokens.new_full((1,), b * t)
    cu_seqlens = torch.cat([first_tokens, total]).to(torch.int32)  # (num_runs + 1,)
    return PackedRows(positions, cu_seqlens, t)


def pack_batch(
    segment_ids: torch.Tensor, token_ids: torch.Tensor, device: torch.device | str
) -> PackedRows:
    """The runs of a batch's segment_ids (B, T), checked against its token_ids (B, T), found
    where the batch is (on the host, as a DataLoader gives it: no device sync) and moved to
    `device` for the model (`GPTModel.forward(..., segment_ids=<PackedRows>)`)."""
    check_segment_ids(segment_ids, token_ids)
    return packed_rows(segment_ids).to(device)


def document_segment_ids(token_ids: torch.Tensor, document_start_id: int) -> torch.Tensor:
    """(B, T) long segment ids of token_ids (B, T) whose documents begin with
    `document_start_id` (GPT-2's <|endoftext|>, 50256): a new segment starts at each such
    token. The token before it (the last of the previous document) keeps its target, the
    separator, so the model still learns to end a document."""
    return (token_ids == document_start_id).long().cumsum(dim=1)
