"""What a run does to its output folder besides writing its files.

An --overwrite run whose folder holds an earlier run writes into a hidden staging folder beside
it, and moves its files in only once it has completed, so that the earlier run's files stay
byte-identical until then, and a run that fails or is stopped removes its staging folder and
leaves them as they were:

    runs/x/                       the earlier run, untouched while this one runs
    runs/.x.overwrite-PID/        this run's files (PID: the process writing them)

The move is one rename per file, after a list of the earlier files to delete is written into
the staging folder: a process killed during the move leaves that list, and the next run in the
folder finishes the move instead of mixing the runs (`remove_leftovers`).

What a killed process left, a half-written NAME.tmpPID of a run file (`atomic_torch_save`,
loss.png) or a staging folder of a PID no longer running, is removed when the next run starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from fastgpt.train.checkpoint import TMP_MARK
from fastgpt.train.config import RUN_FILES

STAGING_MARK = ".overwrite-"
MOVE_LIST_NAME = ".replaces.json"  # in a staging folder being moved in: earlier files to delete


def staging_folder(out: Path, pid: int | None = None) -> Path:
    """Where process `pid` (default: this one) stages an --overwrite run of `out`."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}{STAGING_MARK}{pid if pid is not None else os.getpid()}"


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
        self.folder.mkdir(parents=True)

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
    """Remove what processes no longer running left in and beside `out`: temporary files of
    its run files, and staging folders (one that was being moved in is moved in first).
    Returns what was removed or moved in."""
    out = Path(out)
    found = []
    if out.is_dir():
        for path in out.iterdir():
            match = _TEMPORARY.fullmatch(path.name)
            pid = next((int(g) for g in match.groups() if g), None) if match else None
            if pid is not None and not _alive(pid) and path.is_file():
                path.unlink(missing_ok=True)
                found.append(path)
    prefix = staging_folder(out, pid=0).name[:-1]  # ".NAME.overwrite-"
    parent = staging_folder(out, pid=0).parent
    for folder in parent.iterdir() if parent.is_dir() else []:
        pid = folder.name[len(prefix) :]
        ours = folder.name.startswith(prefix) and pid.isdigit() and folder.is_dir()
        if not ours or _alive(int(pid)):
            continue
        if (folder / MOVE_LIST_NAME).is_file():
            out.mkdir(parents=True, exist_ok=True)
            _move_in(folder, out)
        else:
            shutil.rmtree(folder, ignore_errors=True)
        found.append(folder)
    return found
