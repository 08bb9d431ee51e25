"""Folders and files a run writes: checked before any work, replaced only atomically; JSON
that a user's file holds, parsed with errors that say where."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastgpt.errors import ConfigError, DiskFullError

# The errors of a write that found no room: no space left, the file size limit, the quota.
DISK_FULL_ERRNOS = {errno.ENOSPC: "no space left", errno.EFBIG: "file too large",
                    errno.EDQUOT: "disk quota exceeded"}  # fmt: skip
# A library writing in its own code (safetensors' Rust) reports them as "os error N".
_OS_ERROR = re.compile(r"os error (\d+)")


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


@contextlib.contextmanager
def reports_disk_full(path: Path, reason_of: Callable[[], str | None] | None = None) -> Iterator:
    """Turn a failed write of `path` that found no room into a DiskFullError naming it: an
    OSError with one of DISK_FULL_ERRNOS, a library error whose message holds "os error N"
    with one of them, or any error when `reason_of()` returns a reason (e.g. `no_room_reason`
    of the file written, for a library that reports no errno). Other errors pass unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        code = getattr(exc, "errno", None)
        if code is None and (found := _OS_ERROR.search(str(exc))):
            code = int(found.group(1))
        reason = DISK_FULL_ERRNOS.get(code) or (reason_of() if reason_of is not None else None)
        if reason is None:
            raise
        raise DiskFullError(path, reason) from exc


TMP_MARK = ".tmp"  # a file being written is NAME.tmpPID until it is renamed to NAME


def write_atomically(
    path: Path, write: Callable[[Path], None], check_room: bool = False, durable: bool = False
) -> None:
    """`write(tmp)` into a temporary file beside `path` ("NAME.tmpPID": the next run in the
    folder removes one a killed process left, `train.out_folder.remove_leftovers` and the
    corpus's `remove_corpus_files`), then rename it over `path` (atomic on POSIX): readers see
    the old file or the new one, never half of one, and a failed write leaves nothing.
    DiskFullError naming `path` when there is no room; check_room: judge that from what the
    write left (`no_room_reason`), for a writer that reports a full disk without an errno.
    durable: the file is synced to disk before the rename, for a file that another one lists
    (a corpus shard in its manifest) and so must survive a crash whole."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with reports_disk_full(path, (lambda: no_room_reason(tmp)) if check_room else None):
            write(tmp)
            if durable:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def no_room_reason(path: Path) -> str | None:
    """Why a write of `path` that failed without saying why found no room, judged from what
    it left: the file at this process's file size limit, or its file system with less than
    1 MiB free. None when neither holds."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and path.stat().st_size >= limit:
            return DISK_FULL_ERRNOS[errno.EFBIG]
    except (ImportError, OSError):  # no such limit here (Windows), or no file
        pass
    try:
        fs = os.statvfs(path.parent)
    except (AttributeError, OSError):
        return None
    return DISK_FULL_ERRNOS[errno.ENOSPC] if fs.f_bavail * fs.f_frsize < 2**20 else None


def special_file_problem(path: Path) -> str | None:
    """What is wrong with reading `path` as a data file when it exists but is no regular file
    or folder ("/dev/null is a character device, not a regular file"), else None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))  # fmt: skip
    for test, kind in kinds:
        if test(mode):
            return f"{path} is {kind}, not a regular file"
    return None
