"""Folders and files a run writes: checked before any work, replaced only atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
