"""What a run does to its output folder besides writing its files.

An --overwrite run whose folder holds an earlier run writes into a hidden staging folder inside
it, and moves its files out of it only once it has completed, so that the earlier run's files
stay byte-identical until then, and a run that fails or is stopped removes its staging folder
and leaves them as they were:

    runs/x/*                      the earlier run's files, untouched while this one runs
    runs/x/.overwrite-PID/        this run's files (PID: the process writing them)

Inside, not beside: out_dir is the one folder known to be writable, and a rename within it
never crosses a file system (out_dir may be a mount point). The move is one rename per file,
after a list of the earlier files to delete is written into the staging folder: a process
killed during the move leaves that list, and the next run in the folder finishes the move
instead of mixing the runs (`remove_leftovers`).

What a killed process left, a half-written NAME.tmpPID of a run file (`atomic_torch_save`,
loss.png) or a staging folder of a PID no longer running, is removed when the next run starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from fastgpt.files import TMP_MARK
from fastgpt.train.config import RUN_FILES

STAGING_PREFIX = ".overwrite-"
MOVE_LIST_NAME = ".replaces.json"  # in a staging folder being moved in: earlier files to delete


def staging_folder(out: Path, pid: int | None = None) -> Path:
    """Where process `pid` (default: this one) stages an --overwrite run of `out`."""
    return Path(out) / f"{STAGING_PREFIX}{pid if pid is not None else os.getpid()}"


def _temporary_name(name: str) -> str:
    """A pattern of the temporary files `name` is written through: NAME.tmpPID or, keeping
    the suffix (matplotlib picks the format from it), STEM.tmpPID.SUFFIX."""
    stem, dot, suffix = name.rpartition(".")
    mark = re.escape(TMP_MARK)
    return rf"{re.escape(name)}{mark}(\d+)|{re.escape(stem)}{mark}(\d+){re.escape(dot + suffix)}"


_TEMPORARY = re.compile("|".join(f"(?:{_temporary_name(n)})" for n in RUN_FILES))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class Staging:
    """The staging folder of an --overwrite run of `out`, which holds the earlier run's files
    `earlier` (names in RUN_FILES)."""

    def __init__(self, out: Path, earlier: list[str]):
        self.out = Path(out)
        self.earlier = list(earlier)
        self.folder = staging_folder(self.out)

    def begin(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)  # this PID's: an earlier process's
        self.folder.mkdir()

    def commit(self) -> list[str]:
        """Move this run's files into `out` in place of the earlier run's; delete the earlier
        run's files this run did not write. Returns the names deleted."""
        written = {p.name for p in self.folder.iterdir()}
        stale = [name for name in self.earlier if name not in written]
        (self.folder / MOVE_LIST_NAME).write_text(json.dumps(stale), "utf-8")
        return _move_in(self.folder, self.out)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _move_in(folder: Path, out: Path) -> list[str]:
    """Finish moving a staging folder's files into `out` (see the module docstring)."""
    stale = json.loads((folder / MOVE_LIST_NAME).read_text("utf-8"))
    for path in sorted(folder.iterdir()):
        if path.name == MOVE_LIST_NAME:
            continue
        target = out / path.name
        if path.is_dir() and target.is_dir():  # a folder is replaced whole
            shutil.rmtree(target)
        os.replace(path, target)
    for name in stale:
        (out / name).unlink(missing_ok=True)
    (folder / MOVE_LIST_NAME).unlink()
    folder.rmdir()
    return stale


def remove_leftovers(out: Path) -> list[Path]:
    """Remove what processes no longer running left in `out`: temporary files of its run
    files, and staging folders (one that was being moved in is moved in first). Returns what
    was removed or moved in."""
    found = []
    for path in sorted(Path(out).iterdir()) if Path(out).is_dir() else []:
        pid = _writer_pid(path)
        if pid is None or _alive(pid):
            continue
        if path.is_dir() and (path / MOVE_LIST_NAME).is_file():
            _move_in(path, Path(out))
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        found.append(path)
    return found


def _writer_pid(path: Path) -> int | None:
    """The PID in the name of a staging folder or a run file's temporary file (else None)."""
    if path.is_dir():
        pid = path.name.removeprefix(STAGING_PREFIX)
        return int(pid) if path.name.startswith(STAGING_PREFIX) and pid.isdigit() else None
    match = _TEMPORARY.fullmatch(path.name)
    return next((int(g) for g in match.groups() if g), None) if match else None
