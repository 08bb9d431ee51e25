"""Preparing a corpus: inputs -> documents -> tokens in worker processes -> shards + manifest.

    prepare_corpus(["owt/*.jsonl"], "data/owt")            # what `fastgpt prepare-data` runs
    prepare_or_wait(files, folder, options)                # under torchrun: LOCAL_RANK 0 prepares
    cached_corpus(files, cache_dir, options)               # pretrain --data FILES: a cache folder

Steps: count the documents of every input (bad inputs fail here, before any work); draw the
validation documents (exactly round(n · val_fraction) of the n, at least one when there are
two or more, seeded); read the documents in order and tokenize them in batches on --workers
processes; append each to its split's stream, which writes a shard whenever S tokens are in
(`fastgpt.corpus.writer`). A run whose fingerprint (inputs, settings, format) matches a complete
manifest does nothing; an interrupted one continues after the shards it listed.

Under torchrun every rank may call `prepare_or_wait`: the one with LOCAL_RANK 0 prepares (under
an exclusive lock on the folder, so two nodes sharing a file system do not both write) and the
others poll the manifest until it is complete. A file-based wait rather than a process-group
barrier: tokenizing a real corpus takes longer than the process group's timeout (30 minutes for
gloo, 10 for NCCL), and the trainer creates the group later anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastgpt.corpus.encode import Batch, encoder
from fastgpt.corpus.manifest import (
    MANIFEST_NAME,
    SPLITS,
    describe,
    fingerprint,
    fingerprint_of,
    new_manifest,
    read_manifest,
    write_manifest,
)
from fastgpt.corpus.sources import count_documents, read_items, resolve_inputs
from fastgpt.corpus.writer import SplitWriter
from fastgpt.errors import ConfigError, UsageError, require
from fastgpt.files import TMP_MARK

CHUNK_CHARS = 1 << 22
"""Characters of a text file read and tokenized at a time (4 Mi), so a huge file never sits in
memory whole."""
BATCH_CHARS = 1 << 20
"""About this many characters (or bytes of JSON) go to a worker at a time."""
LOCK_NAME = ".lock"
WAIT_POLL_S = 0.2


@dataclass
class CorpusOptions:
    """How the inputs become shards."""

    text_field: str = "text"
    """The field of each .jsonl line, or the column of a .parquet file, that holds the text."""
    val_fraction: float = 0.01
    """Share of the documents held out as the validation split, drawn at random with --seed (at
    least one document when there are two or more); 0 = none."""
    seed: int = 123
    """Seed of the draw of validation documents."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file (2 bytes each; the last shard of a split holds the rest)."""
    workers: int | None = field(default=None, metadata={"metavar": "N"})
    """Processes that tokenize (default: the machine's cores, but no more than the inputs have
    megabytes: small inputs are tokenized in this process)."""

    def __post_init__(self) -> None:
        if not self.text_field:
            raise ConfigError("text_field", "must not be empty")
        require(self, "val_fraction", 0.0 <= self.val_fraction < 1.0, "in [0, 1)")
        require(self, "shard_tokens", self.shard_tokens >= 1, ">= 1")
        require(self, "workers", self.workers is None or self.workers >= 1, ">= 1")

    def settings(self) -> dict[str, Any]:
        """The options that shape the shards (not --workers: the shards never depend on it)."""
        return {k: v for k, v in asdict(self).items() if k != "workers"}

    def worker_count(self, input_bytes: int) -> int:
        """--workers, or the cores, but no more than the inputs have batches (the-verdict.txt
        is tokenized in this process, without starting any)."""
        if self.workers is not None:
            return self.workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return max(1, min(cores or os.cpu_count() or 1, input_bytes // BATCH_CHARS))


@dataclass
class PrepareResult:
    folder: Path
    manifest: dict[str, Any]
    up_to_date: bool = False  # nothing was done: the folder already held this corpus
    resumed_shards: int = 0  # shards an earlier, interrupted run had finished
    tokenized: int = 0  # tokens this run produced (and, in a resumed run, those it dropped)
    waited: bool = False  # another rank prepared it; this one waited


def prepare_corpus(
    inputs: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    options: CorpusOptions | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    chunk_chars: int = CHUNK_CHARS,
    batch_chars: int = BATCH_CHARS,
) -> PrepareResult:
    """Tokenize `inputs` into shards and a manifest in `out_dir` (see the module docstring).
    `log` gets one line: what was done or why nothing was. UsageError when `out_dir` holds a
    corpus made from other inputs or settings, unless `overwrite`."""
    options = options or CorpusOptions()
    say = log or (lambda line: None)
    files = resolve_inputs(inputs)
    folder = Path(out_dir).expanduser()
    fp = fingerprint(files, options.settings())
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {folder}: {exc.strerror or exc}") from exc
    with folder_lock(folder):
        manifest = read_manifest(folder)
        if manifest is not None and fingerprint_of(manifest) != fp:
            if not overwrite:
                raise UsageError(
                    f"{folder} holds a corpus prepared from other {_differences(manifest, fp)}; "
                    "pass {overwrite} to replace it, or choose another {out}"
                )
            remove_corpus_files(folder, manifest)
            manifest = None
        if manifest is not None and manifest["complete"]:
            say(f"{folder} is up to date, nothing to do: {describe(manifest)}")
            return PrepareResult(folder, manifest, up_to_date=True)
        manifest = manifest or new_manifest(fp)
        result = PrepareResult(folder, manifest)
        result.resumed_shards = sum(len(manifest["splits"][s]["shards"]) for s in SPLITS)
        if result.resumed_shards:
            say(f"resuming {folder}: the {result.resumed_shards} shards finished before are kept")
        remove_corpus_files(folder, manifest, unlisted_only=True)
        start = time.perf_counter()
        result.tokenized = tokenize_into_shards(
            files, folder, manifest, options, progress, chunk_chars, batch_chars
        )
        seconds = time.perf_counter() - start
        rate = result.tokenized / max(seconds, 1e-9)
        say(f"prepared {folder}: {describe(manifest)}; tokenized in {seconds:.1f} s "
            f"({rate:,.0f} tokens/s)")  # fmt: skip
        return result


def tokenize_into_shards(
    files: list[Path], folder: Path, manifest: dict[str, Any], options: CorpusOptions,
    progress: bool, chunk_chars: int, batch_chars: int,
) -> int:  # fmt: skip
    """Tokenize the documents the manifest's splits still need, appending them to their
    splits; mark the manifest complete. Returns the number of tokens produced."""
    from tqdm.auto import tqdm

    from fastgpt.tokenizer import get_tokenizer

    counts = [count_documents(path, options.text_field) for path in files]
    split_of = choose_validation(sum(counts), options.val_fraction, options.seed)
    manifest["documents"] = sum(counts)
    manifest["input_documents"] = counts

    def save() -> None:
        write_manifest(folder, manifest)

    writers = [SplitWriter(folder, s, manifest["splits"][s], options.shard_tokens, save)
               for s in SPLITS]  # fmt: skip
    first = [w.start_doc for w in writers]  # per split, the first document still needed
    batches = make_batches(
        files, counts, lambda doc: doc >= first[split_of[doc]], options.text_field,
        chunk_chars, batch_chars,
    )  # fmt: skip
    get_tokenizer()  # loaded before the workers fork (they inherit it); fails here if it cannot
    tokenized = 0
    bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not progress)
    try:
        workers = options.worker_count(sum(path.stat().st_size for path in files))
        with encoder(workers) as encode:
            for docs, lengths, ids in encode(batches):
                ends = np.cumsum(lengths).tolist()
                for doc, start, end in zip(docs, [0, *ends[:-1]], ends, strict=True):
                    writers[split_of[doc]].add(doc, ids[start:end])
                tokenized += len(ids)
                bar.update(len(ids))
    finally:
        bar.close()
    for writer in writers:
        writer.close()
    if manifest["splits"]["train"]["tokens"] == 0:
        where = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
        raise UsageError(f"empty corpus: {where} hold no text ({sum(counts)} documents)")
    manifest["complete"] = True
    save()
    return tokenized


def choose_validation(documents: int, fraction: float, seed: int) -> list[int]:
    """For each document its split's index in SPLITS (0 train, 1 validation): exactly
    round(documents · fraction) validation documents, at least one when fraction > 0 and there
    are two or more documents, drawn with `seed`."""
    k = min(max(round(documents * fraction), 1), documents - 1) if fraction > 0 else 0
    k = max(k, 0)  # one document (or none): all of it trains
    split_of = np.zeros(documents, dtype=np.uint8)
    split_of[np.random.default_rng(seed).choice(documents, size=k, replace=False)] = 1
    return split_of.tolist()


def make_batches(
    files: list[Path], counts: list[int], needed: Callable[[int], bool], text_field: str,
    chunk_chars: int, batch_chars: int,
) -> Iterator[Batch]:  # fmt: skip
    """The needed documents of every file, in order, in batches of about `batch_chars`;
    documents are numbered across all files."""
    base = 0
    for path, count in zip(files, counts, strict=True):
        items, size = [], 0
        skip = lambda doc, base=base: not needed(base + doc)
        for doc, line, offset, payload in read_items(path, text_field, chunk_chars, skip):
            items.append((base + doc, line, offset, payload))
            size += len(payload)  # type: ignore[arg-type]
            if size >= batch_chars:
                yield str(path), text_field, items
                items, size = [], 0
        if items:
            yield str(path), text_field, items
        base += count


def remove_corpus_files(folder: Path, manifest: dict[str, Any], unlisted_only=False) -> None:
    """Delete the shards (only those the manifest does not list, with `unlisted_only`: a
    partial shard of an interrupted run) and temporary files of a corpus folder."""
    listed = {s["file"] for split in SPLITS for s in manifest["splits"][split]["shards"]}
    for split in SPLITS:
        for path in folder.glob(f"{split}-*.bin*"):
            if not (unlisted_only and path.name in listed):
                path.unlink(missing_ok=True)
    for path in folder.glob(f"{MANIFEST_NAME}{TMP_MARK}*"):
        path.unlink(missing_ok=True)
    if not unlisted_only:
        (folder / MANIFEST_NAME).unlink(missing_ok=True)


def _differences(manifest: dict[str, Any], fp: dict[str, Any]) -> str:
    old = fingerprint_of(manifest)
    if old["inputs"] != fp["inputs"]:
        return "inputs (files added, removed or changed)"
    settings = old["settings"] or {}
    names = [k for k in fp["settings"] if settings.get(k) != fp["settings"][k]]
    return "settings (" + ", ".join("{" + k + "}" for k in names) + ")" if names else "format"


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the corpus folder (one writer, even across nodes sharing it)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(folder / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_or_wait(
    inputs: str | Path | Sequence[str | Path], out_dir: str | Path,
    options: CorpusOptions | None = None, *, timeout_s: float = 7 * 24 * 3600, **kwargs: Any,
) -> PrepareResult:  # fmt: skip
    """`prepare_corpus` on LOCAL_RANK 0 of each node (or without torchrun); the other ranks
    wait until the folder holds the complete corpus of these inputs and settings."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("LOCAL_RANK", "0")) == 0:
        return prepare_corpus(inputs, out_dir, options, **kwargs)
    options = options or CorpusOptions()
    folder = Path(out_dir).expanduser()
    fp = fingerprint(resolve_inputs(inputs), options.settings())
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(UsageError):  # a manifest of another format, being replaced
            manifest = read_manifest(folder)
            if manifest is not None and manifest["complete"] and fingerprint_of(manifest) == fp:
                return PrepareResult(folder, manifest, up_to_date=True, waited=True)
        if time.monotonic() > deadline:
            raise UsageError(f"waited {timeout_s:.0f} s for LOCAL_RANK 0 to prepare {folder}")
        time.sleep(WAIT_POLL_S)


def cached_corpus(
    inputs: str | Path | Sequence[str | Path], cache_dir: str | Path,
    options: CorpusOptions | None = None, **kwargs: Any,
) -> PrepareResult:  # fmt: skip
    """The corpus of `inputs` prepared in a folder of `cache_dir` named by its fingerprint
    (`prepare_or_wait`): the second call with unchanged files does nothing."""
    options = options or CorpusOptions()
    files = resolve_inputs(inputs)
    fp = fingerprint(files, options.settings())
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:32]
    folder = Path(cache_dir).expanduser() / f"corpus-{key}"
    return prepare_or_wait(files, folder, options, overwrite=True, **kwargs)
