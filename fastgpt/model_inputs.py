"""What `GPTModel.forward` is given, checked before it reaches an embedding or a kernel (where a
bad id would be a device-side assert or a silent wrong answer): token ids, targets, logits_at.

Each range check reads the tensor on the host (one device sync per call); the model skips them
(`check_range=False`) when its `check_inputs` is off, as a training loop that checked its data
once sets it, and under torch.compile.
"""

from __future__ import annotations

import torch


def check_token_ids(token_ids: torch.Tensor, vocab_size: int, check_range: bool) -> None:
    """Raise TypeError / ValueError unless `token_ids` is a non-empty (batch, seq_len) integer
    tensor whose ids all lie in [0, vocab_size) (the range part only with `check_range`). The
    length is not checked here."""
    if not isinstance(token_ids, torch.Tensor):
        raise TypeError(f"token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex:
        raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    if token_ids.dtype == torch.bool:
        raise TypeError("token_ids must be an integer tensor, got torch.bool")
    if token_ids.dim() != 2:
        raise ValueError(
            f"token_ids must have shape (batch, seq_len), got {tuple(token_ids.shape)}"
        )
    if token_ids.numel() == 0:
        raise ValueError(f"token_ids is empty: shape {tuple(token_ids.shape)}")
    if not check_range:
        return
    lo, hi = torch.aminmax(token_ids)
    lo, hi = torch.stack([lo, hi]).tolist()  # one sync
    if lo < 0 or hi >= vocab_size:
        bad = ((token_ids < 0) | (token_ids >= vocab_size)).nonzero()[0].tolist()
        value = token_ids[bad[0], bad[1]].item()
        raise ValueError(
            f"token id {value} at position (batch {bad[0]}, index {bad[1]}) is out of "
            f"range [0, {vocab_size})"
        )


def check_targets(
    targets: torch.Tensor, vocab_size: int, ignore_index: int, check_range: bool
) -> None:
    """ValueError unless every target is in [0, vocab_size) or ignore_index: one sync, only
    with `check_range` (the losses then read the targets unchecked)."""
    if not check_range:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(
            f"target {int(targets[tuple(where)])} at position {tuple(where)} is outside "
            f"[0, {vocab_size}) and is not ignore_index ({ignore_index})"
        )


def rows_at(
    x: torch.Tensor, logits_at: torch.Tensor, targets: torch.Tensor | None, check_range: bool
) -> torch.Tensor:
    """x (B, T, d) at position logits_at[b] of each row b -> (B, d), after checking that there
    are no targets and logits_at's shape, dtype and (only with `check_range`) range [0, T)."""
    if targets is not None:
        raise ValueError("logits_at cannot be combined with targets (a loss reads all)")
    b, t = x.shape[:2]
    if not isinstance(logits_at, torch.Tensor) or logits_at.shape != (b,):
        got = tuple(logits_at.shape) if isinstance(logits_at, torch.Tensor) else logits_at
        raise ValueError(f"logits_at must be a ({b},) tensor, one position per row, got {got}")
    if logits_at.dtype.is_floating_point or logits_at.dtype == torch.bool:
        raise TypeError(f"logits_at must be an integer tensor, got {logits_at.dtype}")
    if check_range:
        lo, hi = torch.stack(torch.aminmax(logits_at)).tolist()  # one sync
        if lo < 0 or hi >= t:
            raise ValueError(f"logits_at must lie in [0, {t}) (positions), got {lo}..{hi}")
    return x[torch.arange(b, device=x.device), logits_at.long()]  # (B, d)
