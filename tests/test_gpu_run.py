"""benchmarks/gpu_run.sh, the one command of a GPU lease: it runs the self-check and then the
quick benchmarks under their own timeouts, passes --out to both, fits 9 minutes, and exits with
the worse status. `python` is a stub here (no GPU): it records its arguments."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_run.sh"


def _run_with_stub(tmp_path: Path, stub_body: str, *args: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/calls\n{stub_body}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_both_steps_run_with_the_out_folder_and_the_worse_status_wins(tmp_path):
    body = 'case "$*" in *selftest*) exit 1;; *) exit 0;; esac'
    done = _run_with_stub(tmp_path, body, str(tmp_path / "out"))
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [
        f"-m fastgpt selftest --out {tmp_path / 'out'}",
        f"-m fastgpt bench --quick --out {tmp_path / 'out'}",
    ]
    assert done.returncode == 1
    assert "selftest --out" in done.stderr and "exit 1" in done.stderr


def test_the_timeouts_fit_nine_minutes():
    text = SCRIPT.read_text()
    seconds = {k: int(v) for k, v in re.findall(r"^(\w+_S)=(\d+)", text, re.MULTILINE)}
    assert seconds["SELFTEST_S"] + seconds["BENCH_S"] + 2 * seconds["GRACE_S"] <= 9 * 60
