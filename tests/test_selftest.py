"""`fastgpt selftest`: its GPU plan (--dry-run), its checks through the interpreter at small
sizes, and the compile check, which must pass a sound kernel config and fail a planted one.

The compile check needs the kernels defined without the interpreter, so it runs in a child
process with TRITON_INTERPRET unset; it compiles only one or two small specializations here
(the sweep itself is CI's .ci/compile_check).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgpt.cli import main
from fastgpt.selftest import gpu_check
from fastgpt.selftest.analysis import ARCHS, KernelUsage, occupancy, parse_arch
from fastgpt.selftest.compile_check import Record, allowed_spills, judge

ROOT = Path(__file__).resolve().parents[1]


def _compile_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_compile_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- the GPU plan ------------------------------------------------------------------------


def test_dry_run_lists_every_gpu_check(capsys):
    assert main(["selftest", "--dry-run", "--bench"]) == 0
    out = capsys.readouterr().out
    from fastgpt.kernels.flash_attention import SUPPORTED_HEAD_DIMS

    for dtype in ("fp32", "fp16", "bf16"):
        for d in SUPPORTED_HEAD_DIMS:
            assert f"{dtype} D={d} causal" in out
        assert f"{dtype} D=64 dropout" in out and f"{dtype} D=64 decode" in out
        assert re.search(rf"\nlayer_norm +{dtype} M=4096 N=50257\n", out)
    for group in ("gelu", "bias_gelu", "cross_entropy", "model", "compile", "train", "generate"):
        assert f"\n{group} " in out
    assert "torch.compile(fullgraph=True, backend=inductor) gpt2-small" in out
    assert "20 bf16 AdamW steps" in out
    assert "fastgpt bench --quick" in out


def test_without_a_gpu_it_says_what_to_run_instead(capsys):
    if torch.cuda.is_available():
        pytest.skip("there is a GPU")
    assert main(["selftest"]) == 2
    assert "--compile-only" in capsys.readouterr().err


# --- the checks through the interpreter --------------------------------------------------

TINY = dataclasses.replace(
    gpu_check.SMALL,
    dtypes=("fp32",),
    head_dims=(16,),
    attention=(1, 1, 20, 20),
    long_t=40,
    rows=3,
    widths=(33,),
    cross_entropy=(5, 16, 40),
    model_overrides=(("n_layers", 1), ("vocab_size", 256)),
    model_batch=(1, 6),
    train_steps=3,
    prompt=(1, 3),
    new_tokens=3,
)


def test_every_check_passes_through_the_interpreter(device):
    checks = gpu_check.plan(TINY, device)
    assert {c.group for c in checks} == {
        "attention", "layer_norm", "gelu", "bias_gelu", "cross_entropy", "model", "compile",
        "train", "generate",
    }  # fmt: skip
    results = gpu_check.run_checks(checks, print_fn=lambda line: None)
    failed = [(r.name, r.detail) for r in results if r.status != "pass"]
    assert not failed


def test_a_wrong_kernel_fails_its_check(device, monkeypatch):
    import importlib

    gelu_module = importlib.import_module("fastgpt.kernels.activation")
    real = gelu_module._gelu_forward
    monkeypatch.setattr(gelu_module, "_gelu_forward", lambda x: real(x) * 1.001)
    check = next(c for c in gpu_check.plan(TINY, device) if c.group == "gelu")
    (result,) = gpu_check.run_checks([check], print_fn=lambda line: None)
    assert result.status == "FAIL" and "kernel error" in result.detail


# --- the rules of the compile check ------------------------------------------------------


def _record(arch=90, spills=0, shared=1024, mma="wgmma", dot_16bit=True, dtype="fp16", d=64):
    usage = KernelUsage(128, spills, spills, shared, 8, 2, mma, "cp.async", dot_16bit, 16, "regs")
    params = {"dtype": dtype, "D": d}
    return Record(arch, "attention", "forward", params, "_attention_forward_kernel", "", usage)


def test_quiet_prints_only_the_failing_rows(tmp_path, capsys):
    import json

    from fastgpt.cli import main

    records = [_record(d=64), _record(d=128, spills=64)]
    path = tmp_path / "records.json"
    path.write_text(json.dumps({"records": [r.as_dict() for r in records]}))
    argv = ["selftest", "--compile-only", "--arch", "sm_90", "--from-json", str(path)]
    assert main(argv) == 1
    loud = capsys.readouterr().out
    assert main([*argv, "--quiet"]) == 1
    quiet = capsys.readouterr().out
    rows = [line for line in loud.splitlines() if line.startswith("attention_forward ")]
    assert len(rows) == 2 and "D=128" in rows[1] and "FAIL" in rows[1]
    assert [r for r in rows if r in quiet.splitlines()] == [rows[1]]
    assert "2 specializations" in quiet and "1 failing" in quiet  # the summary stays


def test_rules_of_the_compile_check():
    budget = {"spill_bytes": 0, "allow": []}
    cases = {
        "ok": _record(),
        "spills": _record(spills=8),
        "shared memory": _record(shared=ARCHS[90].smem_per_block + 1),
        "not wgmma": _record(mma="mma.sync"),
    }
    for expected, record in cases.items():
        judge(record, budget)
        if expected == "ok":
            assert record.ok, record.problems
        else:
            assert any(expected in p for p in record.problems), (expected, record.problems)
    ampere = _record(arch=80, mma="mma.sync")
    judge(ampere, budget)
    assert ampere.ok  # mma.sync is Ampere's tensor-core path
    over_ampere = _record(arch=80, shared=ARCHS[80].smem_per_block + 1)
    judge(over_ampere, budget)
    assert not over_ampere.ok


def test_budget_exceptions_match_only_their_kernels():
    rule = {"op": "attention", "dtype": "fp32", "head_dims": [128], "max_spill_bytes": 100}
    budget = {"spill_bytes": 0, "allow": [rule]}
    assert allowed_spills(_record(dtype="fp32", d=128), budget) == 100
    assert allowed_spills(_record(dtype="fp32", d=64), budget) == 0
    assert allowed_spills(_record(dtype="fp16", d=128), budget) == 0


def test_arch_names_and_occupancy():
    assert parse_arch("sm_90") == parse_arch("90") == 90
    with pytest.raises(ValueError, match="supported: sm_90, sm_80"):
        parse_arch("sm_75")
    assert occupancy(255, 0, 8, ARCHS[90]) == (8, "regs")  # 64K registers / (256 · 8 warps)
    assert occupancy(32, 200 * 1024, 4, ARCHS[90])[1] == "smem"


def test_bad_options_are_one_line_errors(capsys):
    before = os.environ.get("TRITON_INTERPRET")
    assert main(["selftest", "--compile-only", "--only", "softmax", "--dry-run"]) == 2
    assert "unknown op 'softmax'" in capsys.readouterr().err
    # The compile-only path unsets TRITON_INTERPRET while it runs and puts it back: this
    # process's later kernels (other tests in the same worker) still run through the interpreter.
    assert os.environ.get("TRITON_INTERPRET") == before


# --- the compile check, compiling (child processes) --------------------------------------


def test_compile_check_passes_a_sound_config():
    result = _python(
        "import sys; from fastgpt.cli import main; sys.exit(main(['selftest', '--compile-only', "
        "'--arch', 'sm_90', '--only', 'gelu', '--dtypes', 'fp16', '--jobs', '1']))"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gelu_forward" in result.stdout and "gelu_backward" in result.stdout
    assert "0 failing" in result.stdout


PLANTED_SPILL = """
import importlib
from fastgpt.selftest.compile_check import BUDGET_FILE, load_budget, run_compile_check
from fastgpt.selftest.sweep import SweepOptions

layer_norm = importlib.import_module("fastgpt.kernels.normalization")
# A planted config: 8 x 1024 fp32 elements per array for one warp: 256 per thread, each.
layer_norm._tile = lambda m, n: (8, 1024, True, 1)
options = SweepOptions(ops=("layer_norm",), dtypes=("fp32",), widths=(768,), passes=("forward",))
records = run_compile_check([90], options, load_budget(BUDGET_FILE), jobs=1)
for r in records:
    print(r.params, r.usage.registers, r.usage.spill_bytes, r.problems)
# The planted config (one warp) at training rows (M = 1 masks 7 of the 8 rows away); the
# tuning candidates derived from it (more warps over the same tile) may well fit.
planted = [r for r in records if r.params["M"] > 1 and r.usage.num_warps == 1]
assert planted and all(any("spills" in p for p in r.problems) for r in planted)
print("PLANTED SPILL CAUGHT")
"""


def test_compile_check_fails_on_a_planted_spilling_config():
    result = _python(PLANTED_SPILL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PLANTED SPILL CAUGHT" in result.stdout


def test_saved_records_are_judged_again_against_the_budget():
    import json

    from fastgpt.selftest.compile_check import records_from_json

    record = _record(dtype="fp32", d=128, spills=64)
    payload = json.loads(json.dumps({"records": [record.as_dict()]}))
    (again,) = records_from_json(payload)
    assert again.usage == record.usage and again.arch == 90 and again.params == record.params
    judge(again, {"spill_bytes": 0})
    assert not again.ok
    again.problems.clear()
    rule = {"op": "attention", "dtype": "fp32", "max_spill_bytes": 64}
    judge(again, {"spill_bytes": 0, "allow": [rule]})
    assert again.ok
