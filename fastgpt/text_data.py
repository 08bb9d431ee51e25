"""Text corpora for pretraining: files -> GPT-2 token ids cached on disk -> sliding windows.

    text file(s), a folder of them, .jsonl / .parquet documents (`fastgpt.corpus`)
      -> tiktoken GPT-2 ids, tokenized once (in worker processes) into uint16 shard files of a
         cache folder, read back by memory map, so a corpus larger than memory works
      -> split by position: the first (1 - val_fraction) of the tokens train, the rest validate
      -> SlidingWindowDataset: window i: inputs ids[s : s + L], targets ids[s + 1 : s + L + 1]
         with s = i · stride and L = context_length (the book's GPTDatasetV1)

    or a folder written by `fastgpt prepare-data`: its train and val splits (whole documents,
    drawn when it was prepared) -> SlidingWindowDataset each

Documents (files, JSON lines, Parquet rows) are joined with one <|endoftext|> between them
(GPT-2's document separator). The cache folder is named by a hash of each file's absolute path,
size and modification time, so an edited file is tokenized again. Windows run over a split's
whole token stream, across shard boundaries: the shards are only how the stream is stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fastgpt.corpus.manifest import is_corpus_dir
from fastgpt.corpus.prepare import CHUNK_CHARS, CorpusOptions, cached_corpus
from fastgpt.corpus.sources import first_non_utf8 as _first_non_utf8
from fastgpt.corpus.sources import read_utf8, resolve_inputs
from fastgpt.corpus.sources import text_chunks as _text_chunks
from fastgpt.corpus.tokens import ShardedTokens, open_split
from fastgpt.errors import UsageError

DEFAULT_CORPUS = "the-verdict.txt"
"""The book's short story, used when no --data is given."""
__all__ = [
    "CHUNK_CHARS", "DEFAULT_CORPUS", "ShardedTokens", "SlidingWindowDataset", "_first_non_utf8",
    "_text_chunks", "cached_tokens", "load_text_datasets", "read_utf8", "resolve_text_files",
    "split_train_val", "tokenize_files",
]  # fmt: skip


# --- finding the files -------------------------------------------------------------------


def resolve_text_files(data: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """The text files named by `data`: a file, a folder (every *.txt below it, sorted), a glob
    pattern ("corpus/**/*.md"), or a list of those. None means the book's the-verdict.txt,
    fetched once with its sha256 checked (FileNotFoundError with instructions when offline and
    not cached)."""
    if data is None:
        from fastgpt.download import data_file

        return [data_file(None, DEFAULT_CORPUS)]
    return resolve_inputs(data, suffixes=(".txt",))


# --- tokenizing with an on-disk cache (fastgpt.corpus) -----------------------------------


def tokenize_files(
    files: Sequence[Path],
    cache_dir: str | Path | None = None,
    chunk_chars: int = CHUNK_CHARS,
    progress: bool = True,
) -> np.ndarray | ShardedTokens:
    """GPT-2 token ids of the files joined by <|endoftext|>, read-only uint16: an np.memmap
    when they fit in one shard (100M tokens), else a ShardedTokens over the shards.

    The ids are written once to a folder of `cache_dir` (default: FASTGPT_CACHE_DIR/tokens,
    i.e. ~/.cache/fastgpt/tokens) by `fastgpt.corpus` and reused while the files' paths, sizes
    and mtimes are unchanged. Raises ValueError naming the file when one is empty."""
    tokens = cached_tokens(files, cache_dir, progress=progress, chunk_chars=chunk_chars)
    return tokens.shard(0) if tokens.num_shards == 1 else tokens


def cached_tokens(
    files: Sequence[str | Path],
    cache_dir: str | Path | None = None,
    text_field: str = "text",
    workers: int | None = None,
    progress: bool = True,
    chunk_chars: int = CHUNK_CHARS,
) -> ShardedTokens:
    """The files (.txt, .jsonl, .parquet) as one token stream holding every document, prepared
    once into the token cache (under torchrun by LOCAL_RANK 0 while the other ranks wait)."""
    if not files:
        raise ValueError("no text files given")
    if cache_dir is None:
        from fastgpt.download import cache_dir as default_cache_dir

        cache_dir = default_cache_dir() / "tokens"
    options = CorpusOptions(text_field=text_field, val_fraction=0.0, workers=workers)
    log = print if progress else None
    result = cached_corpus(files, cache_dir, options, progress=progress, log=log,
                           chunk_chars=chunk_chars)  # fmt: skip
    tokens = open_split(result.folder, "train")
    assert tokens is not None  # prepare_corpus refuses a corpus without training tokens
    return tokens


# --- sliding windows ---------------------------------------------------------------------


class SlidingWindowDataset(Dataset):
    """Next-token windows over a 1-D array of token ids (the book's GPTDatasetV1).

    Item i is (inputs, targets), two (context_length,) long tensors: inputs = ids[s : s + L],
    targets = ids[s + 1 : s + L + 1], s = i · stride. There are ceil((N - L) / stride) windows,
    each with a full target row. `ids` may be a memmap: windows are read on demand."""

    def __init__(self, token_ids: np.ndarray, context_length: int, stride: int | None = None):
        stride = context_length if stride is None else stride
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.token_ids = token_ids
        self.context_length = context_length
        self.stride = stride
        self.num_windows = max(0, math.ceil((len(token_ids) - context_length) / stride))

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range [0, {self.num_windows})")
        start = i * self.stride
        stop = start + self.context_length + 1
        if isinstance(self.token_ids, ShardedTokens):  # a view of the maps, or two shards joined
            window = np.asarray(self.token_ids.read(start, stop), dtype=np.int64)
        else:
            window = np.asarray(self.token_ids[start:stop], dtype=np.int64)
        window = torch.from_numpy(window)  # (L + 1,)
        return window[:-1], window[1:]  # (L,), (L,)


def split_train_val(
    token_ids: np.ndarray,
    context_length: int,
    stride: int | None = None,
    val_fraction: float = 0.1,
    name: str = "the data",
) -> tuple[SlidingWindowDataset, SlidingWindowDataset | None]:
    """Train and validation windows: the first (1 - val_fraction) of the tokens and the rest.

    val_fraction 0 gives no validation set. Raises ValueError naming `name` when a part has
    fewer than context_length + 1 tokens (not even one window)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(token_ids)
    need = context_length + 1
    if n < need:
        raise UsageError(
            f"{name} has {n} tokens, fewer than one training window of context_length + 1 = "
            f"{need}; use more text or a smaller {{context_length}}"
        )
    split = round(n * (1.0 - val_fraction)) if val_fraction > 0 else n
    train = SlidingWindowDataset(token_ids[:split], context_length, stride)
    if len(train) == 0:
        raise UsageError(
            f"{name}: its training part has {split} tokens, fewer than one window of {need}; "
            "use more text, a smaller {context_length} or a smaller {val_fraction}"
        )
    if val_fraction == 0:
        return train, None
    val = SlidingWindowDataset(token_ids[split:], context_length, stride)
    if len(val) == 0:
        raise UsageError(
            f"{name}: its validation part ({val_fraction:g} of {n} tokens = {n - split}) is "
            f"shorter than one window of {need} tokens; use more text, a smaller "
            "{context_length} or a larger {val_fraction} (0 for none)"
        )
    return train, val


def load_text_datasets(
    data: str | Path | Sequence[str | Path] | None,
    context_length: int,
    stride: int | None = None,
    val_fraction: float = 0.1,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    text_field: str = "text",
    workers: int | None = None,
) -> tuple[SlidingWindowDataset, SlidingWindowDataset | None]:
    """(train, validation) window datasets of `data`: a folder `fastgpt prepare-data` wrote
    (its own splits; `val_fraction` does not apply), or files (see `resolve_text_files`;
    .jsonl and .parquet too) -> cached ids -> split by position."""
    if is_corpus_dir(data):
        return prepared_datasets(Path(data).expanduser(), context_length, stride)  # type: ignore[arg-type]
    files = resolve_text_files(None) if data is None else resolve_inputs(data)  # type: ignore[arg-type]
    ids = cached_tokens(files, cache_dir, text_field, workers, progress=progress)
    name = str(files[0]) if len(files) == 1 else f"{len(files)} files under {data}"
    return split_train_val(ids, context_length, stride, val_fraction, name=name)


def prepared_datasets(
    folder: Path, context_length: int, stride: int | None = None
) -> tuple[SlidingWindowDataset, SlidingWindowDataset | None]:
    """The windows of a prepared corpus's train and val splits (val None when it has none)."""
    need = context_length + 1
    train, val = open_split(folder, "train"), open_split(folder, "val")
    if train is None or len(train) < need:
        raise UsageError(
            f"{folder}: its training split has {len(train) if train else 0} tokens, fewer "
            f"than one window of context_length + 1 = {need}; use a smaller {{context_length}}"
        )
    if val is not None and len(val) < need:
        raise UsageError(
            f"{folder}: its validation split has {len(val)} tokens, fewer than one window of "
            f"{need}; use a smaller {{context_length}}, or prepare it again with a larger "
            "{val_fraction} (0 for none)"
        )
    train_set = SlidingWindowDataset(train, context_length, stride)
    return train_set, None if val is None else SlidingWindowDataset(val, context_length, stride)
