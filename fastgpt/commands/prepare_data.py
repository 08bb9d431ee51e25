"""`fastgpt prepare-data`: tokenize a corpus once, in parallel, into uint16 shards.

fastgpt prepare-data "owt/*.jsonl" --out data/owt                   # one process per core
fastgpt prepare-data fineweb/ --out data/fineweb --shard-tokens 100000000 --val-fraction 0.001
fastgpt prepare-data books/ notes.txt --out data/mine --workers 4
fastgpt pretrain --data data/owt --model gpt2-small ...             # trains on the shards

Inputs: .txt files (one document each), .jsonl lines (--text-field, default "text"), .parquet
rows (the --text-field column; pip install "fastgpt[data]" for pyarrow), folders of them and
quoted globs. Documents are joined by <|endoftext|>; a seeded draw of whole documents
(--val-fraction) becomes the validation split. --out gets manifest.json and train-NNNNNN.bin /
val-NNNNNN.bin shards (see fastgpt/corpus/__init__.py). Running it again over unchanged inputs
does nothing; an interrupted run continues after the shards it finished.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from fastgpt.corpus.prepare import CorpusOptions
from fastgpt.errors import ConfigError, UsageError
from fastgpt.options import add_options, options_from_args


@dataclass
class InputOptions:
    """What is tokenized."""

    inputs: list[str] = field(metadata={"positional": True, "nargs": "+", "metavar": "INPUT"})
    """A .txt, .jsonl or .parquet file, a folder of them, or a quoted glob pattern."""


@dataclass
class OutputOptions:
    """Where the shards go."""

    out: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Folder for the shards and manifest.json (required)."""
    overwrite: bool = False
    """Replace a corpus that --out holds from other inputs or settings (else an error)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("out", "is required: the folder to write the shards to")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, InputOptions)
    add_options(parser, CorpusOptions, "tokenizing")
    add_options(parser, OutputOptions, "output")


def run(args: argparse.Namespace) -> int:
    from fastgpt.corpus.prepare import prepare_corpus

    try:
        inputs = options_from_args(InputOptions, args)
        options = options_from_args(CorpusOptions, args)
        output = options_from_args(OutputOptions, args)
        prepare_corpus(
            inputs.inputs, output.out, options, overwrite=output.overwrite,
            progress=output.progress, log=print,
        )  # fmt: skip
    except UsageError:
        raise
    except (ValueError, FileNotFoundError) as exc:  # a bad input file: one line, exit 2
        raise UsageError(str(exc)) from exc
    return 0
