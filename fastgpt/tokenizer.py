"""GPT-2's byte-pair encoding (tiktoken "gpt2") and tensor helpers around it.

ids = text_to_token_ids("Hello<|endoftext|>")   # (1, T) long tensor
text = token_ids_to_text(ids)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

EOT_ID = 50256
"""Id of "<|endoftext|>", the separator between documents in GPT-2's training data."""
EOT_TEXT = "<|endoftext|>"


class TokenizerUnavailableError(RuntimeError):
    """The GPT-2 BPE files could be neither read from tiktoken's cache nor downloaded."""


@functools.cache
def get_tokenizer():
    """The GPT-2 BPE as a tiktoken Encoding (cached; offline it needs TIKTOKEN_CACHE_DIR).
    Raises TokenizerUnavailableError when its files can be neither read nor downloaded."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as exc:  # no network (requests' errors are OSErrors), bad hash
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "unset")
        raise TokenizerUnavailableError(
            f"cannot load the GPT-2 BPE (tiktoken 'gpt2': vocab.bpe and encoder.json): {exc}. "
            f"Offline, point TIKTOKEN_CACHE_DIR (now {cache}) at a folder holding tiktoken's "
            "cached copies of them"
        ) from exc


def encode(text: str, tokenizer=None) -> list[int]:
    """Token ids of `text`; "<|endoftext|>" is allowed and becomes EOT_ID. TypeError for
    anything but a str."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    tokenizer = tokenizer or get_tokenizer()
    return tokenizer.encode(text, allowed_special={EOT_TEXT})


def text_to_token_ids(text: str, tokenizer=None) -> torch.Tensor:
    """`text` -> (1, T) long tensor of token ids ("<|endoftext|>" allowed)."""
    return torch.tensor(encode(text, tokenizer), dtype=torch.long).unsqueeze(0)


def token_ids_to_text(ids: torch.Tensor | Sequence[int], tokenizer=None) -> str:
    """Token ids ((T,) or (1, T) tensor, or a list) -> text. ValueError naming an id outside
    the vocabulary, TypeError for one that is not an integer."""
    tokenizer = tokenizer or get_tokenizer()
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(
                    f"token_ids_to_text decodes one sequence, got a batch of {ids.shape[0]}; "
                    "decode each row separately"
                )
            ids = ids[0]
        elif ids.dim() != 1:
            raise ValueError(f"expected token ids of shape (T,) or (1, T), got {tuple(ids.shape)}")
        ids = ids.tolist()
    ids = list(ids)
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int):
            raise TypeError(f"token id at index {i} is not an int: {token!r}")
        if not 0 <= token < tokenizer.n_vocab:
            raise ValueError(
                f"token id {token} at index {i} is out of range [0, {tokenizer.n_vocab})"
            )
    return tokenizer.decode(ids)
