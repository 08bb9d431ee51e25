"""Download the data sets the book uses, once, with their sha256 checked.

    path = data_file(args.data, "the-verdict.txt")   # --data if given, else the book's file

Files are looked for, in order: in the folder named by FASTGPT_DATA_DIR (how tests and offline
machines provide them), then in the cache folder (FASTGPT_CACHE_DIR, default
~/.cache/fastgpt), and only then downloaded into the cache. A file whose sha256 does not match
is never used.
"""

from __future__ import annotations

import hashlib
import io
import os
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fastgpt.errors import ConfigError
from fastgpt.files import special_file_problem


@dataclass(frozen=True)
class DataFile:
    name: str
    url: str
    sha256: str
    member: str | None = None  # the file inside a zip archive at `url`, if it is one


_BOOK = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/28c65cdfbc3338e2e040016eea4b7fdf556e4d57"

DATA_FILES: dict[str, DataFile] = {
    f.name: f
    for f in (
        DataFile(
            "the-verdict.txt",
            f"{_BOOK}/ch02/01_main-chapter-code/the-verdict.txt",
            "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
        ),
        DataFile(
            "instruction-data.json",
            f"{_BOOK}/ch07/01_main-chapter-code/instruction-data.json",
            "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
        ),
        DataFile(
            "SMSSpamCollection",
            "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
            member="SMSSpamCollection",
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("FASTGPT_CACHE_DIR", Path.home() / ".cache" / "fastgpt"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str) -> Path:
    """Return a local path to data file `name`, downloading it once if needed.

    Raises FileNotFoundError with instructions when it cannot be found or downloaded, and
    ValueError when a downloaded file's sha256 does not match.
    """
    if name not in DATA_FILES:
        raise KeyError(f"unknown data file {name!r}; known: {', '.join(DATA_FILES)}")
    spec = DATA_FILES[name]
    candidates = []
    if os.environ.get("FASTGPT_DATA_DIR"):
        candidates.append(Path(os.environ["FASTGPT_DATA_DIR"]) / name)
    cached = cache_dir() / name
    candidates.append(cached)
    for path in candidates:
        if path.is_file() and sha256_of(path) == spec.sha256:
            return path

    try:
        with urllib.request.urlopen(spec.url, timeout=60) as response:
            payload = response.read()
    except OSError as exc:
        raise FileNotFoundError(
            f"could not download {name} from {spec.url} ({exc}); put a copy in FASTGPT_DATA_DIR "
            f"or {cache_dir()}"
        ) from exc
    if spec.member is not None:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            payload = archive.read(spec.member)
    digest = hashlib.sha256(payload).hexdigest()
    if digest != spec.sha256:
        raise ValueError(f"{name} from {spec.url} has sha256 {digest}, expected {spec.sha256}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(cached.suffix + ".partial")
    partial.write_bytes(payload)
    partial.replace(cached)  # atomic: a crash never leaves a half-written file under the name
    return cached


def data_file(data: str | Path | None, default: str) -> Path:
    """The file a command's --data names or, with no --data, the book's data set `default`
    (see `fetch`). Raises FileNotFoundError naming the missing file, or saying how to pass one
    when the default cannot be had offline (ConfigError: the CLI names --data); ConfigError
    for a folder."""
    if data:
        path = Path(data).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data file not found: {path}")
        if path.is_dir():
            raise ConfigError("data", f"{path} is a folder: give one file")
        if problem := special_file_problem(path):  # /dev/null, a FIFO: exists, no file
            raise ConfigError("data", problem)
        return path
    try:
        return fetch(default)
    except FileNotFoundError as exc:
        raise ConfigError(
            "data",
            f"not given, and the default data set {default} is not available offline ({exc}); "
            "pass a file of your own as {data}",
        ) from exc
