"""The inputs of a corpus: which files, how many documents each holds, and their text.

    .jsonl / .ndjson   one document per non-blank line: a JSON object whose `text_field` holds
                       the text (also a .json file named as an input, not found in a folder)
    .parquet           one document per row of the column `text_field` (FineWeb's layout; needs
                       pyarrow: pip install "fastgpt[data]")
    any other file     plain UTF-8 text, one document per file (.txt), read in pieces that
                       tokenize exactly as the whole file would

Errors name the place: "FILE:LINE: not UTF-8 text (byte 0xNN at offset K)", "FILE:LINE: ...
no "text" field", "FILE: no column "text"". They are ValueErrors (UsageErrors where an option is
the fix), so the commands print them as one line.
"""

from __future__ import annotations

import codecs
import glob
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from fastgpt.errors import UsageError
from fastgpt.files import parse_json, special_file_problem

TEXT, JSONL, PARQUET = "text", "jsonl", "parquet"
FOLDER_SUFFIXES = {".txt": TEXT, ".jsonl": JSONL, ".ndjson": JSONL, ".parquet": PARQUET}
"""The files a folder contributes, by suffix, and how each is read."""
PARQUET_ROWS = 1024
"""Rows read from a Parquet file at a time."""


def kind_of(path: Path) -> str:
    """How `path` is read: JSONL (also a .json file named as an input, not one in a folder),
    PARQUET, or TEXT (every other suffix)."""
    return {**FOLDER_SUFFIXES, ".json": JSONL}.get(path.suffix.lower(), TEXT)


def resolve_inputs(
    inputs: str | Path | Sequence[str | Path], suffixes: Sequence[str] = tuple(FOLDER_SUFFIXES)
) -> list[Path]:
    """The files named by `inputs`: files, folders (every file below with one of `suffixes`,
    by default .txt, .jsonl, .ndjson and .parquet, sorted), quoted glob patterns
    ("corpus/**/*.jsonl"), or a list of those."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not items:
        raise UsageError("no input files given")
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
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
            )
            if not found:
                kinds = ", ".join(s for s in suffixes if s != ".ndjson")
                raise ValueError(f"{path}: folder holds no {kinds} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif problem := special_file_problem(path):  # /dev/null, a FIFO: exists, no file
            raise UsageError(problem)
        else:
            raise FileNotFoundError(f"data file not found: {path}")
    return files


# --- counting documents (before any tokenizing, so that bad inputs fail early) -------------


def count_documents(path: Path, text_field: str) -> int:
    """The documents `path` holds; ValueError for an empty text file or a Parquet file
    without the column."""
    kind = kind_of(path)
    if kind == TEXT:
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: empty file, no text to train on")
        return 1
    if kind == JSONL:
        with open(path, "rb") as f:
            return sum(1 for line in f if not line.isspace())
    return _parquet_file(path, text_field).metadata.num_rows


def _parquet_file(path: Path, text_field: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(
            f'{path}: reading Parquet files needs pyarrow: pip install "fastgpt[data]"'
        ) from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's ArrowInvalid and friends
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise UsageError(
            f'{path}: no column "{text_field}" (columns: {", ".join(names[:8])}); name the '
            "column that holds the text with {text_field}"
        )
    return parquet


# --- reading documents ---------------------------------------------------------------------

Item = tuple[int, int, int, object]
"""(document index within the file, line number, byte offset of the line, payload): the payload
is a str of text, or the raw bytes of a JSON line (parsed by `document_text`)."""


def read_items(
    path: Path, text_field: str, chunk_chars: int, skip: Callable[[int], bool]
) -> Iterator[Item]:
    """The documents of `path` in order, except those whose index `skip` names; a text file's
    one document comes in pieces of about `chunk_chars` characters."""
    kind = kind_of(path)
    if kind == TEXT:
        if not skip(0):
            for chunk in text_chunks(path, chunk_chars):
                yield 0, 0, 0, chunk
    elif kind == JSONL:
        yield from _jsonl_items(path, skip)
    else:
        parquet, doc = _parquet_file(path, text_field), -1
        for batch in parquet.iter_batches(batch_size=PARQUET_ROWS, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                doc += 1
                if not skip(doc):
                    if text is not None and not isinstance(text, str):
                        raise ValueError(
                            f'{path}: row {doc + 1}: column "{text_field}" holds '
                            f"{type(text).__name__} values, not text"
                        )
                    yield doc, doc + 1, 0, text or ""


def _jsonl_items(path: Path, skip: Callable[[int], bool]) -> Iterator[Item]:
    offset, doc = 0, -1
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if line.isspace():
                continue
            doc += 1
            if not skip(doc):
                yield doc, line_no, start, line


def document_text(path: str, text_field: str, item: Item) -> str:
    """The text of one item: the payload itself, or the `text_field` of a JSON line."""
    _, line_no, offset, payload = item
    if isinstance(payload, str):
        return payload
    where = f"{path}:{line_no}"
    try:
        line = payload.decode("utf-8-sig" if line_no == 1 else "utf-8")  # type: ignore[union-attr]
    except UnicodeDecodeError as exc:
        bad = offset + exc.start
        raise ValueError(
            f"{where}: not UTF-8 text (byte 0x{payload[exc.start]:02x} at offset {bad})"  # type: ignore[index]
        ) from None
    record = parse_json(
        line,
        dict,
        lambda exc: f"{where}: not a JSON line ({exc.msg} at column {exc.colno})",
        f"{where}: a JSON line must be an object, got",
    )
    if text_field not in record:
        fields = ", ".join(f'"{k}"' for k in list(record)[:8]) or "none"
        raise UsageError(
            f'{where}: no "{text_field}" field (fields: {fields}); name the field that holds '
            "the text with {text_field}"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f'{where}: "{text_field}" is {type(text).__name__}, not a string')
    return text


# --- plain text ----------------------------------------------------------------------------


def text_chunks(path: Path, chunk_chars: int) -> Iterator[str]:
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
                raise ValueError(f"{path}:{first_non_utf8(path)}") from None
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
        raise ValueError(f"{path}:{first_non_utf8(path)}") from None


def first_non_utf8(path: Path) -> str:
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
