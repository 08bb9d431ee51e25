"""Reading a prepared corpus: each split's shards as one token array, by memory map.

    tokens = open_split("corpus/", "train")   # ShardedTokens: len(), [a:b] views, read(a, b)
    window = tokens.read(s, s + 1025)         # np.uint16 (1025,), across a shard boundary too

Nothing is read until it is asked for, and every process (every torchrun rank, every DataLoader
worker) maps the same files, so the page cache holds one copy of the corpus whatever their
number.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastgpt.corpus.manifest import MANIFEST_NAME, read_manifest
from fastgpt.corpus.writer import DTYPE
from fastgpt.errors import UsageError

# Tokens read at a time when max() scans a part of a shard (2 MB of uint16).
MAX_SCAN_TOKENS = 1 << 20
# Tokens read at a time when a shard is checked whole as it is opened (32 MB of uint16).
CHECK_SCAN_TOKENS = 1 << 24


class ShardedTokens:
    """Token ids stored in shard files, as one 1-D array: `len`, `read(start, stop)` (an
    ndarray: a memmap slice, or a copy joining two shards), `[start:stop]` (a lazy view),
    `[i]`, `max()` and `np.asarray` (which reads everything: small data only)."""

    def __init__(
        self, files: Sequence[str | Path], lengths: Sequence[int],
        maxima: Sequence[int] | None = None, start: int = 0, stop: int | None = None,
    ):  # fmt: skip
        self.files = [str(f) for f in files]
        self.lengths = [int(n) for n in lengths]
        self.maxima = None if maxima is None else [int(m) for m in maxima]
        self.offsets = [0, *np.cumsum(self.lengths, dtype=np.int64).tolist()]
        self.start = start
        self.stop = self.offsets[-1] if stop is None else stop
        self._maps: list[np.memmap | None] = [None] * len(self.files)

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def num_shards(self) -> int:
        return len(self.files)

    def shard(self, index: int) -> np.memmap:
        """Shard `index` as a read-only memmap (opened once)."""
        mapped = self._maps[index]
        if mapped is None:
            mapped = np.memmap(
                self.files[index], dtype=DTYPE, mode="r", shape=(self.lengths[index],)
            )
            self._maps[index] = mapped
        return mapped

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of this array (clipped to it), as an ndarray."""
        a = self.start + max(0, start)
        b = self.start + min(len(self), stop)
        if b <= a:
            return np.empty(0, dtype=DTYPE)
        i = bisect.bisect_right(self.offsets, a) - 1
        if b <= self.offsets[i + 1]:  # within one shard: a view of the map, no copy
            return self.shard(i)[a - self.offsets[i] : b - self.offsets[i]]
        parts = []
        while a < b:
            end = min(b, self.offsets[i + 1])
            parts.append(self.shard(i)[a - self.offsets[i] : end - self.offsets[i]])
            a, i = end, i + 1
        return np.concatenate(parts)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("ShardedTokens slices take no step")
            view = ShardedTokens.__new__(ShardedTokens)
            view.__dict__.update(self.__dict__)
            view.start, view.stop = self.start + start, self.start + max(start, stop)
            return view
        index = int(key) + (len(self) if key < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"token {key} out of range [0, {len(self)})")
        return int(self.read(index, index + 1)[0])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        ids = self.read(0, len(self))
        return ids if dtype is None else ids.astype(dtype)

    def tolist(self) -> list[int]:
        return self.read(0, len(self)).tolist()

    def max(self) -> int:
        """The largest id, exact, reading little: a whole shard's from the manifest; a part of
        one (a train/val split by position cuts a shard) read in chunks until one holds the
        shard's max id (the part's cannot be larger). In GPT-2 data that id is <|endoftext|>
        (50256, the largest), so the scan stops at the first document boundary instead of
        reading the whole split (nor is a part read when a whole shard's max is already as
        large). Without maxima the part is read whole."""
        largest, parts = -1, []  # parts: (shard, first, end stream position) to read
        for i in range(self.num_shards):
            a, b = max(self.start, self.offsets[i]), min(self.stop, self.offsets[i + 1])
            if a >= b:
                continue
            if self.maxima is not None and (a, b) == (self.offsets[i], self.offsets[i + 1]):
                largest = max(largest, self.maxima[i])
            else:
                parts.append((i, a, b))
        for i, a, b in parts:  # with maxima at most two: the view's first and last shard
            bound = None if self.maxima is None else self.maxima[i]  # >= the part's max
            while a < b and (bound is None or largest < bound):
                end = min(b, a + MAX_SCAN_TOKENS)
                largest = max(largest, int(self.read(a - self.start, end - self.start).max()))
                a = end
        if largest < 0:
            raise ValueError("max() of no tokens")
        return largest

    def __getstate__(self) -> dict[str, Any]:  # pickled (DataLoader workers): maps reopen there
        return {**self.__dict__, "_maps": [None] * len(self.files)}


def _shard_path(folder: Path, name: object) -> Path:
    """The shard file a manifest names, which must be a file inside the corpus folder (a
    manifest is data a user may have been handed: "../secret.txt" is refused)."""
    path = folder / str(name)
    if not isinstance(name, str) or not path.resolve().is_relative_to(folder.resolve()):
        raise UsageError(
            f"{folder / MANIFEST_NAME}: shard file {name!r} is not inside the corpus folder; "
            "prepare the corpus again"
        )
    return path


def open_split(folder: str | Path, split: str) -> ShardedTokens | None:
    """The tokens of one split ("train" or "val") of a complete prepared corpus, or None when
    it has none. UsageError for an unfinished preparation or a shard of the wrong size."""
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    if manifest is None:
        raise UsageError(f"{folder}: no {MANIFEST_NAME}, not a corpus fastgpt prepare-data wrote")
    if not manifest.get("complete"):
        raise UsageError(
            f"{folder}: its preparation has not finished; run fastgpt prepare-data again to "
            "complete it"
        )
    shards = manifest["splits"][split]["shards"]
    if not shards:
        return None
    files = [_shard_path(folder, s.get("file")) for s in shards]
    for path, shard in zip(files, shards, strict=True):
        size = path.stat().st_size if path.is_file() else None
        if size != shard["tokens"] * DTYPE.itemsize:
            raise UsageError(
                f"{path}: {size if size is not None else 'missing'} bytes, the manifest says "
                f"{shard['tokens'] * DTYPE.itemsize}; prepare the corpus again"
            )
    maxima = [_checked_max_id(path, shard) for path, shard in zip(files, shards, strict=True)]
    return ShardedTokens(files, [s["tokens"] for s in shards], maxima)


def _checked_max_id(path: Path, shard: dict[str, Any]) -> int:
    """The largest id shard file `path` holds, read whole (once, as the corpus is opened: a
    damaged shard would otherwise fail at the batch that holds its bad id, with an IndexError
    or a device-side assert); UsageError unless it is the manifest's max_id."""
    if not shard["tokens"]:  # nothing to map (an empty file cannot be)
        return -1
    ids = np.memmap(path, dtype=DTYPE, mode="r", shape=(shard["tokens"],))
    largest = max(
        (int(ids[a : a + CHECK_SCAN_TOKENS].max()) for a in range(0, len(ids), CHECK_SCAN_TOKENS)),
        default=-1,
    )
    if largest != shard.get("max_id"):
        raise UsageError(
            f"{path} holds token ids up to {largest}, but {MANIFEST_NAME} says max_id "
            f"{shard.get('max_id')!r}: the corpus is damaged; prepare it again"
        )
    return largest
