"""Folders and files a run writes: checked before any work, replaced only atomically; JSON
that a user's file holds, parsed with errors that say where."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastgpt.errors import ConfigError


def check_writable_folder(path: Path, field: str) -> None:
    """ConfigError for option `field` naming `path` unless it is, or can be made, a folder
    this process can write in (checked before any work, leaving nothing behind)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(field, f"{path} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(field, f"{path}: {existing} is a file, not a folder")
    try:  # a probe folder, removed at once: the only sure test (read-only mounts, /proc, ...)
        os.rmdir(tempfile.mkdtemp(prefix=".fastgpt-probe-", dir=existing))
    except OSError as exc:
        raise ConfigError(field, f"{path}: cannot write in {existing} ({exc.strerror})") from None


def parse_json(
    text: str, kind: type, malformed: Callable[[json.JSONDecodeError], str], wrong_kind: str
) -> Any:
    """`json.loads(text)` when it is a `kind` (dict, list); otherwise a ValueError: the message
    `malformed(error)` for malformed JSON, or `wrong_kind` + " " + the name of the type found
    ("data.json: expected a JSON list of records, got" -> "..., got dict")."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(malformed(exc)) from None  # the message holds all the error says
    if not isinstance(value, kind):
        raise ValueError(f"{wrong_kind} {type(value).__name__}")
    return value
