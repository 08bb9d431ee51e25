"""Tokenizing batches of documents, in worker processes or in this one.

A batch is (file, text_field, items): up to about a megabyte of one file's documents. A worker
parses them (JSON lines are parsed there, not in the process that reads the files) and encodes
them with tiktoken's batch encoder; "<|endoftext|>" inside a text becomes the separator token,
as `fastgpt.tokenizer.encode` does. `ordered_results` keeps a bounded number of batches in
flight and hands the results back in input order, so memory stays flat on any corpus size.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from fastgpt.corpus.sources import Item, document_text

Batch = tuple[str, str, list[Item]]
Encoded = tuple[list[int], np.ndarray, np.ndarray]
"""(document index of each item, token count of each item, all their ids as one uint16 array)."""


def encode_batch(batch: Batch) -> Encoded:
    from fastgpt.tokenizer import EOT_TEXT, get_tokenizer

    path, text_field, items = batch
    texts = [document_text(path, text_field, item) for item in items]
    # One thread: the worker processes are the parallelism (and --workers 1 means one core).
    encoded = get_tokenizer().encode_batch(texts, num_threads=1, allowed_special={EOT_TEXT})
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter(
        itertools.chain.from_iterable(encoded), dtype=np.uint16, count=int(lengths.sum())
    )
    return [item[0] for item in items], lengths, ids


@contextlib.contextmanager
def encoder(workers: int) -> Iterator[Callable[[Iterable[Batch]], Iterator[Encoded]]]:
    """A function from batches to their encodings, in order: in this process for one worker,
    else in a pool of `workers` processes (forked where the platform can: they inherit the
    loaded tokenizer and import nothing)."""
    if workers <= 1:
        yield lambda batches: map(encode_batch, batches)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers) as pool:  # leaving terminates the workers, on errors too
        yield lambda batches: ordered_results(pool, batches, depth=2 * workers)


def ordered_results(pool, batches: Iterable[Batch], depth: int) -> Iterator[Encoded]:
    """pool's encodings of `batches` in order, with at most `depth` batches in flight (Pool.imap
    would read the whole corpus ahead into its queue)."""
    pending: deque = deque()
    for batch in batches:
        pending.append(pool.apply_async(encode_batch, (batch,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()
