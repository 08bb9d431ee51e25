"""Text corpora for pretraining: files -> GPT-2 token ids cached on disk -> sliding windows.

    text file(s), or a folder of .txt files
      -> tiktoken GPT-2 ids, written once to a cache file of uint16 (read back as a NumPy memmap,
         so a corpus larger than memory works; GPT-2's 50257 ids fit in 16 bits)
      -> split by position: the first (1 - val_fraction) of the tokens train, the rest validate
      -> SlidingWindowDataset: window i: inputs ids[s : s + L], targets ids[s + 1 : s + L + 1]
         with s = i · stride and L = context_length (the book's GPTDatasetV1)

Several files are joined with one <|endoftext|> between them (GPT-2's document separator).
A cache file is named by a hash of each file's absolute path, size and modification time, so an
edited file is tokenized again; it is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fastgpt.errors import UsageError
from fastgpt.tokenizer import EOT_ID, EOT_TEXT

DEFAULT_CORPUS = "the-verdict.txt"
"""The book's short story, used when no --data is given."""
CACHE_FORMAT = "gpt2-uint16-v1"
"""Part of every cache key: bump it when the way ids are produced changes."""
CHUNK_CHARS = 1 << 22
"""Characters read and tokenized at a time (4 Mi), so a huge file never sits in memory whole."""


# --- finding the files -------------------------------------------------------------------


def resolve_text_files(data: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """The text files named by `data`: a file, a folder (every *.txt below it, sorted), a glob
    pattern ("corpus/**/*.md"), or a list of those. None means the book's the-verdict.txt,
    fetched once with its sha256 checked (FileNotFoundError with instructions when offline and
    not cached)."""
    if data is None:
        from fastgpt.download import data_file

        return [data_file(None, DEFAULT_CORPUS)]
    items = [data] if isinstance(data, (str, Path)) else list(data)
    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if not path.exists() and any(c in str(item) for c in "*?["):  # a glob pattern
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise FileNotFoundError(f"no files match {item}")
            files.extend(matches)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise ValueError(f"{path}: folder holds no .txt files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"data file not found: {path}")
    return files


# --- tokenizing with an on-disk cache ----------------------------------------------------


def _cache_key(files: Sequence[Path]) -> str:
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _text_chunks(path: Path, chunk_chars: int):
    """Yield the text of `path` in pieces that tokenize exactly as the whole file would.

    GPT-2's pre-tokenizer makes a lone newline between two non-space characters a piece of its
    own (a letter, digit or punctuation after it starts a new piece; a longer whitespace run
    would be split differently at the end of a chunk), so cutting right after such a newline
    keeps every token intact. A chunk without such a cut point grows until one appears."""
    pending = ""
    with open(path, encoding="utf-8", newline="") as f:
        while True:
            try:
                block = f.read(chunk_chars)
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{_first_non_utf8(path)}") from None
            if not block:
                break
            pending += block
            cut = len(pending) - 1
            while cut > 0:
                cut = pending.rfind("\n", 0, cut)
                if cut < 0:
                    break
                lone = cut > 0 and not pending[cut - 1].isspace()
                if lone and cut + 1 < len(pending) and not pending[cut + 1].isspace():
                    yield pending[: cut + 1]
                    pending = pending[cut + 1 :]
                    break
    if pending:
        yield pending


def read_utf8(path: Path) -> str:
    """The whole text of a (small) data file; a UTF-8 byte-order mark (Excel's CSVs) is
    dropped and line ends are kept as they are. ValueError "FILE:LINE: not UTF-8 text ..."."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path}:{_first_non_utf8(path)}") from None


def _first_non_utf8(path: Path) -> str:
    """ "LINE: not UTF-8 text (byte 0xNN at offset K)" for the first byte of `path` that is not
    UTF-8, read in blocks (the text layer's error position is within its buffer, not the file)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1  # bytes and lines before `block`
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            pending = len(decoder.getstate()[0])  # a character's first bytes, from the last block
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                bad = offset - pending + exc.start
                line += block.count(b"\n", 0, max(0, bad - offset))
                f.seek(bad)
                return f"{line}: not UTF-8 text (byte 0x{f.read(1)[0]:02x} at offset {bad})"
            offset += len(block)
            line += block.count(b"\n")
    return f"{line}: not UTF-8 text (the file ends inside a character, at offset {offset})"


def tokenize_files(
    files: Sequence[Path],
    cache_dir: str | Path | None = None,
    chunk_chars: int = CHUNK_CHARS,
    progress: bool = True,
) -> np.ndarray:
    """GPT-2 token ids of the files joined by <|endoftext|>: a read-only uint16 memmap (N,).

    The ids are written once to `cache_dir` (default: FASTGPT_CACHE_DIR/tokens, i.e.
    ~/.cache/fastgpt/tokens) and reused while the files' paths, sizes and mtimes are unchanged.
    Raises ValueError naming the file when one is empty (no tokens)."""
    from tqdm.auto import tqdm

    from fastgpt.tokenizer import get_tokenizer

    files = [Path(f) for f in files]
    if not files:
        raise ValueError("no text files given")
    if cache_dir is None:
        from fastgpt.download import cache_dir as default_cache_dir

        cache_dir = default_cache_dir() / "tokens"
    cache_dir = Path(cache_dir)
    cache_path = cache_dir / f"tokens-{_cache_key(files)}.u16"
    if not cache_path.is_file():
        for path in files:
            if path.stat().st_size == 0:
                raise ValueError(f"{path}: empty file, no text to train on")
        tokenizer = get_tokenizer()
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.partial")
        total_bytes = sum(p.stat().st_size for p in files)
        bar = tqdm(
            total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress
        )
        try:
            with open(partial, "wb") as out:
                for index, path in enumerate(files):
                    if index > 0:
                        np.array([EOT_ID], dtype=np.uint16).tofile(out)
                    count = 0
                    for chunk in _text_chunks(path, chunk_chars):
                        ids = tokenizer.encode(chunk, allowed_special={EOT_TEXT})
                        np.asarray(ids, dtype=np.uint16).tofile(out)  # ids < 50257 < 2**16
                        count += len(ids)
                        bar.update(len(chunk.encode("utf-8")))
                    if count == 0:
                        raise ValueError(f"{path}: no tokens (the file holds no text)")
            os.replace(partial, cache_path)  # atomic: never a half-written cache under the name
        finally:
            bar.close()
            partial.unlink(missing_ok=True)
    if cache_path.stat().st_size == 0:
        raise ValueError(f"{files[0]}: no tokens (the file holds no text)")
    return np.memmap(cache_path, dtype=np.uint16, mode="r")


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
        window = np.asarray(self.token_ids[start : start + self.context_length + 1], dtype=np.int64)
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
) -> tuple[SlidingWindowDataset, SlidingWindowDataset | None]:
    """Files (see `resolve_text_files`) -> cached ids -> (train, validation) window datasets."""
    files = resolve_text_files(data)
    ids = tokenize_files(files, cache_dir=cache_dir, progress=progress)
    name = str(files[0]) if len(files) == 1 else f"{len(files)} files under {data}"
    return split_train_val(ids, context_length, stride, val_fraction, name=name)
