"""One split's token stream, cut into uint16 shards of a fixed token count.

The stream is the split's documents in order, each after one <|endoftext|> except the first;
shard k holds stream tokens [k·S, (k+1)·S) for S = shard_tokens (the last one fewer), so the
shards depend on the documents and S only, never on how many workers tokenized them or on where
an earlier run was interrupted. A shard is written through `files.write_atomically` (a
temporary name, synced, renamed) and only then listed in the manifest: a listed shard is whole,
an unlisted file is never read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fastgpt.errors import DiskFullError, UsageError
from fastgpt.files import write_atomically

DTYPE = np.dtype("<u2")
"""Shards are raw little-endian uint16 (GPT-2's 50257 ids fit), no header: np.memmap reads them."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.bin"


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _write_file(path: Path, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def write_shard(path: Path, ids: np.ndarray) -> None:
    """Write `ids` to `path` whole or not at all (`write_atomically`, synced). A failed write
    (a full disk included) is a UsageError saying that a rerun continues; the temporary file is
    removed."""
    data = memoryview(np.ascontiguousarray(ids, dtype=DTYPE)).cast("B")
    kept = "the shards finished before it are kept, run the same command again to continue"
    try:
        write_atomically(path, lambda tmp: _write_file(tmp, data), durable=True)
    except DiskFullError as exc:
        raise UsageError(f"{exc}; {kept}") from exc
    except OSError as exc:
        raise UsageError(f"writing {path}: {exc.strerror or exc}; {kept}") from exc


class SplitWriter:
    """Appends documents to one split's stream and writes each shard as it fills.

    `state` is the split's entry in the manifest (updated in place); `save` is called after
    each shard is listed. A resumed writer starts after its last listed shard: the documents
    before that shard's "end" are not given to it again, and the tokens of the document at the
    end that the shard already holds are dropped."""

    def __init__(
        self, folder: Path, split: str, state: dict[str, Any], shard_tokens: int,
        save: Callable[[], None],
    ):  # fmt: skip
        self.folder, self.split, self.state, self.save = folder, split, state, save
        shards = state["shards"]
        self.resume = tuple(shards[-1]["end"]) if shards else None
        self.documents = shards[-1]["documents"] if shards else 0  # started, up to the resume point
        self.buffer = np.empty(shard_tokens, dtype=DTYPE)
        self.filled = 0
        self.doc: int | None = None  # the document being appended, and tokens of it so far
        self.pos = 0

    @property
    def start_doc(self) -> int:
        """The first document this writer needs."""
        return self.resume[0] if self.resume else 0

    def add(self, doc: int, ids: np.ndarray) -> None:
        """Append a piece of document `doc` (pieces of one document come in order)."""
        if len(ids) == 0:
            return
        if doc != self.doc:
            self.doc, self.pos = doc, 0
            if self.resume is None or doc != self.resume[0]:  # (that one is counted already)
                self.documents += 1
            if self.state["first_doc"] is None:
                self.state["first_doc"] = doc
            elif doc != self.state["first_doc"]:
                from fastgpt.tokenizer import EOT_ID

                ids = np.concatenate((np.array([EOT_ID], dtype=DTYPE), ids))
        start, self.pos = self.pos, self.pos + len(ids)
        if self.resume is not None and doc == self.resume[0]:
            ids = ids[max(0, self.resume[1] - start) :]  # already in the last listed shard
        while len(ids):
            n = min(len(ids), len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + n] = ids[:n]
            self.filled, ids = self.filled + n, ids[n:]
            if self.filled == len(self.buffer):
                self._finish_shard((doc, self.pos - len(ids)))

    def close(self) -> None:
        """Write the last, shorter shard."""
        if self.filled:
            self._finish_shard((self.doc, self.pos))
        self.state["documents"] = self.documents

    def _finish_shard(self, end: tuple[int | None, int]) -> None:
        shards = self.state["shards"]
        name = shard_name(self.split, len(shards))
        ids = self.buffer[: self.filled]
        write_shard(self.folder / name, ids)
        shards.append(
            {"file": name, "tokens": int(self.filled), "max_id": int(ids.max()), "end": list(end),
             "documents": self.documents}
        )  # fmt: skip
        self.state["tokens"] += int(self.filled)
        self.filled = 0
        self.save()
