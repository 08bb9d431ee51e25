"""manifest.json: what a prepared corpus folder holds, and what it was made from.

    {"format": "fastgpt-corpus-v1", "tokenizer": "gpt2", "dtype": "uint16", "eot_id": 50256,
     "settings": {"text_field": "text", "val_fraction": 0.01, "seed": 123,
                  "shard_tokens": 100000000},
     "inputs": [{"path": "/abs/a.jsonl", "size": 123, "mtime_ns": 456}, ...],
     "complete": true, "documents": 1000,
     "splits": {"train": {"documents": 990, "tokens": N, "first_doc": 0,
                          "shards": [{"file": "train-000000.bin", "tokens": 100000000,
                                      "max_id": 50256, "end": [DOC, POS],
                                      "documents": 12}, ...]},
                "val": {...}}}

The format, tokenizer, settings and inputs are the fingerprint: a run whose fingerprint matches
a complete manifest has nothing to do. A shard is listed only once its file is complete and
renamed into place, so a listed shard is always whole; "end" is where the next shard starts (a
document and a token position within it, its separator counted), which is what lets an
interrupted run resume after its last listed shard ("documents": how many the split had begun
by then). The manifest is rewritten atomically, after each shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastgpt.errors import DiskFullError, UsageError
from fastgpt.files import write_atomically

FORMAT = "fastgpt-corpus-v1"
"""Bump when the shards' layout or the way documents become tokens changes."""
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
TOKENIZER = "gpt2"


def fingerprint(files: list[Path], settings: dict[str, Any]) -> dict[str, Any]:
    """What determines a corpus's shards: the format, tokenizer, settings and every input's
    absolute path, size and modification time (an edited file is tokenized again)."""
    inputs = []
    for path in files:
        stat = path.stat()
        inputs.append(
            {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        )
    return {"format": FORMAT, "tokenizer": TOKENIZER, "settings": dict(settings), "inputs": inputs}


def fingerprint_of(manifest: dict[str, Any]) -> dict[str, Any]:
    return {key: manifest.get(key) for key in ("format", "tokenizer", "settings", "inputs")}


def new_manifest(fp: dict[str, Any]) -> dict[str, Any]:
    from fastgpt.tokenizer import EOT_ID

    splits = {s: {"documents": 0, "tokens": 0, "first_doc": None, "shards": []} for s in SPLITS}
    return {**fp, "dtype": "uint16", "eot_id": EOT_ID, "complete": False, "documents": 0,
            "splits": splits}  # fmt: skip


def is_corpus_dir(path: str | Path | None) -> bool:
    """Whether `path` is a folder written by `fastgpt prepare-data` (it holds a manifest)."""
    if not isinstance(path, (str, Path)):  # None, or a list of inputs
        return False
    return (Path(path).expanduser() / MANIFEST_NAME).is_file()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest in `folder`, or None when there is none yet."""
    path = folder / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not a readable corpus manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise UsageError(
            f"{path}: a corpus of format {found!r}, this fastgpt reads {FORMAT!r}; prepare it "
            "again with fastgpt prepare-data"
        )
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest through `write_atomically` (a temporary name, synced, renamed)."""
    path = folder / MANIFEST_NAME
    text = json.dumps(manifest, indent=1) + "\n"
    try:
        write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=True)
    except DiskFullError as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc


def describe(manifest: dict[str, Any]) -> str:
    """ "N tokens (T training in k shards, V validation in j), D documents"."""
    train, val = (manifest["splits"][s] for s in SPLITS)
    total = train["tokens"] + val["tokens"]
    return (
        f"{total:,} tokens ({train['tokens']:,} training in {len(train['shards'])} shards, "
        f"{val['tokens']:,} validation in {len(val['shards'])}) from {manifest['documents']:,} "
        f"documents in {len(manifest['inputs'])} files"
    )
