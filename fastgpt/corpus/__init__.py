"""Pretraining corpora tokenized once, in parallel, into uint16 shards every rank memory-maps.

    fastgpt prepare-data "owt/*.jsonl" fineweb/ notes.txt --out data/corpus --workers 16
    fastgpt pretrain --data data/corpus ...      # trains on its shards as they are

A prepared folder holds

    manifest.json                  inputs (path, size, mtime), settings, tokenizer, format, and
                                   per split its shards with their token counts (manifest.py)
    train-000000.bin, ...          raw little-endian uint16 token ids, --shard-tokens each
    val-000000.bin, ...            (the last shard of a split holds the rest)
    .lock                          taken while a process writes the folder

Each split is one token stream: its documents in input order, joined by <|endoftext|> (50256).
Documents are a .txt file, a .jsonl line's text field, a .parquet row's text column
(sources.py); the validation split is a seeded draw of whole documents (prepare.py). Tokenizing
runs on worker processes (encode.py); shards are written whole or not at all and listed in the
manifest only then, which makes a second run over unchanged inputs a no-op and an interrupted
one resume after its last listed shard (writer.py). Reading: `open_split` gives a split as one
memory-mapped array across its shards (tokens.py).

`fastgpt pretrain --data FILES` (not a prepared folder) runs the same preparation into a cache
folder named by the inputs' fingerprint, with every document in the training stream (its
--val-fraction then holds out the end of that stream, as it always did).
"""

from fastgpt.corpus.manifest import FORMAT, MANIFEST_NAME, is_corpus_dir, read_manifest
from fastgpt.corpus.prepare import (
    CorpusOptions,
    PrepareResult,
    cached_corpus,
    prepare_corpus,
    prepare_or_wait,
)
from fastgpt.corpus.sources import resolve_inputs
from fastgpt.corpus.tokens import ShardedTokens, open_split

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "CorpusOptions",
    "PrepareResult",
    "ShardedTokens",
    "cached_corpus",
    "is_corpus_dir",
    "open_split",
    "prepare_corpus",
    "prepare_or_wait",
    "read_manifest",
    "resolve_inputs",
]
