"""GPT-2's byte-pair encoding (tiktoken "gpt2"), tensor helpers around it, and the same BPE in
Hugging Face's files (vocab.json, merges.txt) for the folders fastgpt writes.

ids = text_to_token_ids("Hello<|endoftext|>")   # (1, T) long tensor
text = token_ids_to_text(ids)
vocab, merges = hf_vocab_and_merges()           # {"Ġthe": 262, ...}, ["Ġ t", "Ġ a", ...]
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

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


# --- the BPE in Hugging Face's layout ---------------------------------------------------
#
# tiktoken holds GPT-2's BPE as ranks: bytes -> id, the 256 single bytes and the 50,000 merged
# tokens in the order GPT-2 learnt them. Hugging Face's GPT2Tokenizer reads the same BPE as
# vocab.json (token string -> id) and merges.txt (the merges in order, "left right" per line),
# where a token's bytes are written as printable characters (`byte_level_alphabet`).

HF_MERGES_HEADER = "#version: 0.2"


@functools.cache
def byte_level_alphabet() -> tuple[str, ...]:
    """The character GPT-2's byte-level BPE writes for each byte 0..255. The printable Latin-1
    bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 (controls, space,
    no-break space, soft hyphen) take the code points 256, 257, ... in byte order, so that no
    token string holds whitespace or a control character (a space is 'Ġ', a newline 'Ċ')."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, spare = [], 256
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(spare))
            spare += 1
    return tuple(chars)


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair of tokens whose merge made `token`: its bytes put through BPE with the merges
    ranked before it (repeatedly join the adjacent pair whose join has the lowest rank) end
    as two tokens. ValueError when they do not (`ranks` is not a byte-pair encoding)."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, at = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < best:
                best, at = rank, i
        if at < 0:
            raise ValueError(f"token {token!r} (rank {limit}) is not a merge of two earlier ones")
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts[0], parts[1]


@functools.cache
def hf_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """GPT-2's BPE as Hugging Face's vocab.json ({token string: id}, "<|endoftext|>" included)
    and merges.txt lines ("Ġ t", ...; in rank order), recovered from tiktoken's ranks."""
    encoding = get_tokenizer()
    # bytes -> id for the 50,256 ordinary tokens; then {"<|endoftext|>": 50256}
    ranks = {token: encoding.encode_single_token(token) for token in encoding.token_byte_values()}
    special = {name: encoding.encode_single_token(name) for name in encoding.special_tokens_set}
    alphabet = byte_level_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab.update(special)
    merged = sorted((rank, token) for token, rank in ranks.items() if len(token) > 1)
    merges = []
    for _, token in merged:
        left, right = _last_merge(token, ranks)
        merges.append(f"{text(left)} {text(right)}")
    return vocab, tuple(merges)


def save_hf_vocab_and_merges(directory: Path) -> None:
    """Write vocab.json and merges.txt (GPT-2's, as `hf_vocab_and_merges`) into `directory`."""
    import json

    vocab, merges = hf_vocab_and_merges()
    with open(directory / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(directory / "merges.txt", "w", encoding="utf-8") as f:
        f.write("\n".join((HF_MERGES_HEADER, *merges)) + "\n")
