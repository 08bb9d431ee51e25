"""`fastgpt selftest`: its GPU plan (--dry-run), its checks through the interpreter at small
sizes, and the compile check, which must pass a sound kernel config and fail a planted one.

The compile check needs the kernels defined without the interpreter, so it runs in a child
process with TRITON_INTERPRET unset; it compiles only one or two small specializations here
(the sweep itself is CI's .ci/compile_check).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgpt.cli import main
from fastgpt.selftest import gpu_check, op_checks
from fastgpt.selftest.analysis import (
    ARCHS,
    KernelUsage,
    LoopProfile,
    loop_bound,
    loop_profile,
    main_loop,
    occupancy,
    parse_arch,
    sass_instructions,
)
from fastgpt.selftest.compile_check import (
    Record,
    allowed_spills,
    budget_key,
    judge,
    record_instructions,
)

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
    assert {c.group for c in checks} == set(gpu_check.GROUPS)
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


def test_only_and_dtypes_pick_checks_and_unknown_names_are_refused(device):
    checks = gpu_check.plan(TINY, device, groups=("gelu", "train"), dtypes=("fp16",))
    assert [c.group for c in checks] == ["train"]  # TINY's kernels run in fp32 only
    checks = gpu_check.plan(TINY, device, groups=("attention_varlen", "generate"))
    assert {c.group for c in checks} == {"attention_varlen", "generate"}
    with pytest.raises(ValueError, match="unknown check group 'attn'"):
        gpu_check.plan(TINY, device, groups=("attn",))
    with pytest.raises(ValueError, match="unknown dtype 'f16'"):
        gpu_check.plan(TINY, device, dtypes=("f16",))


def test_the_default_results_folder_is_not_replaced_where_git_tracks_files(
    tmp_path, capsys, monkeypatch
):
    """As `fastgpt bench`: selftest.json (and --bench's results) replace committed results in
    the default folder, benchmarks/results/<device>/, only when --out names it."""
    from fastgpt.benchmarks import run

    folder = tmp_path / "benchmarks" / "results" / "cpu-x"
    folder.mkdir(parents=True)
    (folder / "selftest.json").write_text("committed\n")
    monkeypatch.setattr(run, "default_out_dir", lambda device: folder)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    command = ["selftest", "--device", "cpu", "--small", "--only", "gelu", "--dtypes", "fp32"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"--out: the default results folder {folder} holds files git tracks" in err, err
    assert (folder / "selftest.json").read_text() == "committed\n"
    assert main([*command, "--out", str(folder)]) == 0  # named: replaced
    assert json.loads((folder / "selftest.json").read_text())["complete"]


def _fake_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    """Make torch.cuda report a GPU of `capability` (no CUDA needed: planning launches nothing)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # torch's own rule: native bf16 from compute capability 8.0 on
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: capability >= (8, 0))


def test_the_plan_leaves_out_what_a_gpu_below_sm80_cannot_run_and_says_so(monkeypatch):
    # A T4: the attention ops refuse it and it has no bf16, so its plan has neither, one line
    # each saying so; the model checks run backend "auto", which is "triton+sdpa" there.
    every = gpu_check.plan(gpu_check.GPU, "cpu")
    _fake_gpu(monkeypatch, (7, 5))
    checks = gpu_check.plan(gpu_check.GPU, "cuda")
    assert checks and not [c for c in checks if c.group in ("attention", "attention_varlen")]
    assert not [c for c in checks if c.dtype == "bf16"]
    kept = {(c.group, c.dtype) for c in checks}
    assert ("layer_norm", "fp16") in kept and ("cross_entropy", "fp32") in kept
    assert {"model", "compile", "generate"} <= {c.group for c in checks}
    attention = [c for c in every if c.group in ("attention", "attention_varlen")]
    bf16 = [c for c in every if c.dtype == "bf16" and c not in attention and c.group != "train"]
    lines = gpu_check.plan_and_left_out(gpu_check.GPU, "cuda")[1]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert lines[0].startswith(f"left out: {len(attention)} checks of attention, attention_varlen:")
    assert "refuse sm_75" in lines[0]
    groups = "layer_norm, gelu, bias_gelu, cross_entropy, model"  # train runs in fp16
    assert lines[1] == f"left out: {len(bf16)} bf16 checks of {groups}: sm_75 has no bfloat16"
    assert len(checks) == len(every) - len(attention) - len(bf16)
    model = next(c for c in checks if c.group == "model")
    assert "logits auto (triton+sdpa) vs torch fp32" in model.name
    # only what the picked checks lose is named
    assert gpu_check.plan_and_left_out(gpu_check.GPU, "cuda", ("gelu",), ("fp16",))[1] == []
    assert gpu_check.plan(gpu_check.GPU, "cuda", groups=("attention",)) == []


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0), (12, 0)])
def test_the_plan_keeps_every_check_from_sm80_on(monkeypatch, capability):
    _fake_gpu(monkeypatch, capability)
    names = [c.name for c in gpu_check.plan(gpu_check.GPU, "cuda")]
    assert gpu_check.plan_and_left_out(gpu_check.GPU, "cuda")[1] == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --dry-run without a GPU
    every = [c.name for c in gpu_check.plan(gpu_check.GPU, "cuda")]
    assert [n.replace("auto (triton)", "auto") for n in names] == every
    assert "gpt2-small logits auto (triton) vs torch bf16" in " ".join(names)


@pytest.mark.parametrize(("capability", "dtype"), [((7, 5), "fp16"), ((8, 0), "bf16")])
def test_the_train_check_runs_in_the_precision_training_picks(monkeypatch, capability, dtype):
    # `--precision auto`: bf16 where the GPU has it, fp16 (with a loss scaler) on a T4.
    _fake_gpu(monkeypatch, capability)
    (train,) = gpu_check.plan(gpu_check.GPU, "cuda", groups=("train",))
    assert train.dtype == dtype and f" {dtype} AdamW steps" in train.name
    assert ("loss scaler" in train.name) == (dtype == "fp16")
    seen = []
    monkeypatch.setattr(op_checks, "train_check", lambda sizes, *a: seen.append(sizes) or "ok")
    gpu_check.run_checks([train], print_fn=lambda line: None)
    assert seen[0].train_dtype == dtype and seen[0].train_steps == gpu_check.GPU.train_steps


def test_the_fp16_train_check_scales_the_loss(monkeypatch):
    scalers = []
    real = torch.amp.GradScaler

    def recording(*args, **kwargs):
        scalers.append(real(*args, **kwargs))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", recording)
    for dtype in ("fp16", "fp32"):
        op_checks.train_check(dataclasses.replace(TINY, train_dtype=dtype), "cpu", "torch")
    assert [s.is_enabled() for s in scalers] == [True, False]
    assert scalers[0].get_scale() > 1  # the loss really was scaled


def test_the_model_checks_run_auto_on_a_gpu_and_triton_on_a_cpu(monkeypatch):
    # "auto" on a CPU is SDPA: the interpreter's checks must name "triton" to check our kernels.
    seen = []
    for name in ("logits_check", "compile_check", "train_check", "generate_check"):
        monkeypatch.setattr(op_checks, name, lambda *args: seen.append(args[-1]) or "ok")
    for device, backend in (("cpu", "triton"), ("cuda", "auto")):
        seen.clear()
        checks = gpu_check.plan(TINY, device, groups=("model", "compile", "train", "generate"))
        gpu_check.run_checks(checks, print_fn=lambda line: None)
        assert seen == [backend] * 4, device


def test_a_t4_is_told_what_its_selftest_leaves_out(monkeypatch, capsys):
    _fake_gpu(monkeypatch, (7, 5))
    assert main(["selftest", "--dry-run"]) == 0
    out = capsys.readouterr().out
    notes, table = out.split("fastgpt selftest: ")
    assert re.fullmatch(r"left out: \d+ checks of attention, .*\nleft out: \d+ bf16 .*\n", notes)
    assert "\nattention " not in table and " bf16 " not in table and "\nlayer_norm " in table
    assert main(["selftest", "--dry-run", "--only", "attention"]) == 2
    assert "nothing to check: this GPU runs none of them" in capsys.readouterr().err


def test_selftest_json_is_rewritten_after_every_check(tmp_path, monkeypatch, capsys):
    """A run stopped between checks (a timeout's signal, here a KeyboardInterrupt planted in the
    second check) leaves selftest.json with the checks it finished."""
    real = op_checks.layer_norm_check
    calls = []

    def stopped_after_one(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(op_checks, "layer_norm_check", stopped_after_one)
    small = ["selftest", "--small", "--device", "cpu", "--out", str(tmp_path)]
    assert main([*small, "--only", "layer_norm", "--dtypes", "fp32"]) == 130  # interrupted
    saved = json.loads((tmp_path / "selftest.json").read_text())
    assert saved["complete"] is False and saved["planned"] == 2
    assert [(r["group"], r["status"]) for r in saved["results"]] == [("layer_norm", "pass")]
    monkeypatch.setattr(op_checks, "layer_norm_check", real)
    assert main([*small, "--only", "layer_norm", "--dtypes", "fp32"]) == 0
    saved = json.loads((tmp_path / "selftest.json").read_text())
    assert saved["complete"] is True and len(saved["results"]) == 2
    assert main([*small, "--only", "layer_norm", "--dtypes", "bf16"]) == 2
    assert "match no check" in capsys.readouterr().err


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
    for arch in (75, 86, 89):  # mma.sync is their tensor-core path; no MMA at all fails
        with_mma, without = _record(arch=arch, mma="mma.sync"), _record(arch=arch, mma="none")
        judge(with_mma, budget)
        judge(without, budget)
        assert with_mma.ok and not without.ok
        assert "16-bit dot lowered to none, not mma.sync" in without.problems[0]


def test_budget_exceptions_match_only_their_kernels():
    rule = {"op": "attention", "dtype": "fp32", "head_dims": [128], "max_spill_bytes": 100}
    budget = {"spill_bytes": 0, "allow": [rule]}
    assert allowed_spills(_record(dtype="fp32", d=128), budget) == 100
    assert allowed_spills(_record(dtype="fp32", d=64), budget) == 0
    assert allowed_spills(_record(dtype="fp16", d=128), budget) == 0


def test_arch_names_and_occupancy():
    assert parse_arch("sm_90") == parse_arch("90") == 90
    assert [parse_arch(f"sm_{a}") for a in (75, 80, 86, 89, 90, 100, 120)] == list(ARCHS)
    with pytest.raises(ValueError, match="supported: sm_75, sm_80, sm_86, sm_89, sm_90"):
        parse_arch("sm_70")
    # The CUDA guide's per-arch limits: a T4 block gets 64 KB and 32 warps per SM, an RTX
    # 30xx/40xx block 99 KB of 100 KB and 48 warps.
    assert ARCHS[75].smem_per_block == 64 * 1024 and ARCHS[75].max_warps_per_sm == 32
    assert ARCHS[86].smem_per_block == 99 * 1024 and ARCHS[89].max_warps_per_sm == 48
    assert occupancy(128, 0, 8, ARCHS[86]) == (16, "regs")  # 64K / (128 regs x 32 x 8 warps)
    assert occupancy(32, 0, 8, ARCHS[86]) == (48, "warps")
    assert occupancy(255, 0, 8, ARCHS[90]) == (8, "regs")  # 64K registers / (256 · 8 warps)
    assert occupancy(32, 200 * 1024, 4, ARCHS[90])[1] == "smem"


def test_bad_options_are_one_line_errors(capsys):
    before = os.environ.get("TRITON_INTERPRET")
    assert main(["selftest", "--compile-only", "--only", "softmax", "--dry-run"]) == 2
    assert "unknown op 'softmax'" in capsys.readouterr().err
    # The compile-only path unsets TRITON_INTERPRET while it runs and puts it back: this
    # process's later kernels (other tests in the same worker) still run through the interpreter.
    assert os.environ.get("TRITON_INTERPRET") == before


def test_the_sweep_leaves_attention_and_bf16_out_below_sm80_and_says_so(capsys):
    # Below sm_80 the attention ops refuse to run (Triton's dots are FFMA there) and every op
    # refuses bf16: the sweep compiles neither for sm_75, in one line per arch saying so. CI's
    # subset compiles the attention ops in fp16 only on archs other than sm_90.
    args = ["selftest", "--compile-only", "--subset", "ci", "--arch", "sm_75,sm_86,sm_90"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    sections = dict(
        re.findall(r"^(sm_\d+): \d+ launcher calls\n((?:.*\n)*?)(?=sm_\d+: \d+|\Z)", out, re.M)
    )
    t4, ampere, hopper = sections["sm_75"], sections["sm_86"], sections["sm_90"]
    assert "sm_75: not compiled: attention, attention_varlen, decode_attention (below sm_80" in t4
    assert "not compiled: bf16" in t4
    assert "  layer_norm forward dtype=fp16" in t4 and "  cross_entropy forward dtype=fp32" in t4
    assert not re.search(r"^  (attention|attention_varlen|decode_attention) ", t4, re.M)
    assert "dtype=bf16" not in t4
    assert "sm_86: CI subset: attention, attention_varlen, decode_attention in fp16 only" in ampere
    assert "  attention forward dtype=fp16 D=64" in ampere
    assert (
        "  attention forward dtype=bf16" not in ampere
        and "  layer_norm forward dtype=bf16" in ampere
    )
    assert "  attention forward dtype=bf16 D=64" in hopper and "CI subset" not in hopper


def test_the_launchers_read_their_tiles_for_the_stub_drivers_arch(monkeypatch):
    # The compile check's stub driver names the arch; the attention launchers' tile lookups
    # must see it (sm_86/89 have tiles of their own, sm_80 and sm_90 theirs).
    import importlib

    from fastgpt.selftest.stub_driver import compiling_for

    attention = importlib.import_module("fastgpt.kernels.flash_attention")
    varlen = importlib.import_module("fastgpt.kernels.flash_attention_varlen")
    tiles = attention.ATTENTION_TILES
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    families = {80: "sm_80", 86: "sm_86", 89: "sm_86", 90: "sm_90", 100: "sm_100", 120: "sm_120"}
    families |= {103: "sm_100", 110: "sm_90"}  # B300; Jetson Thor: not in SM_100_FAMILY
    names = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    for arch, family in families.items():
        with compiling_for(arch, lambda *a: None):
            config = attention._block_config(torch.float16, 64)
            varlen_config = varlen._varlen_block_config(torch.float16, 64)
        for got, table in ((config, tiles), (varlen_config, varlen.VARLEN_TILES)):
            want = [dict(zip(names, tile, strict=True)) for tile in table[(family, "16-bit", 64)]]
            assert [got[k] for k in ("forward", "dkdv")] == want[:2], arch
    assert tiles[("sm_86", "16-bit", 64)] != tiles[("sm_80", "16-bit", 64)]
    assert tiles[("sm_120", "16-bit", 64)][1] == (16, 128, 8, 2)  # sm_120's own dk/dv
    # sm_100's own 16-bit tiles at head dims 64 and 128 (sm_90's spilled there)
    assert tiles[("sm_100", "16-bit", 128)] != tiles[("sm_90", "16-bit", 128)]
    assert tiles[("sm_100", "16-bit", 64)] != tiles[("sm_90", "16-bit", 64)]


def test_layer_norms_tiles_follow_the_stub_drivers_arch(monkeypatch):
    # LayerNorm's tile bounds are per arch family: sm_75 loops over rows wider than one tile in
    # 2 x 2048 chunks (its ptxas spilled the 1 x 4096 16-warp chunk), every other arch in
    # 1 x 4096; widths that fit one tile take the same tiles everywhere.
    import importlib

    from fastgpt.selftest.stub_driver import compiling_for

    ln = importlib.import_module("fastgpt.kernels.normalization")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    chunks = {arch: (1, 4096, False, 16) for arch in (80, 86, 89, 90, 100, 120)}
    chunks[75] = (2, 2048, False, 16)
    for arch, chunk in chunks.items():
        with compiling_for(arch, lambda *a: None):
            assert ln._tile(4096, 50257) == chunk, arch
            assert ln._tile(4096, 768) == (4, 1024, True, 8), arch
            candidates = ln._tile_candidates(4096, 50257)
        assert candidates[0] == dict(zip(ln.TILE_KEYS, chunk, strict=True)), arch


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


# --- the cycle model ---------------------------------------------------------------------

# A kernel in cuobjdump's format: a prologue, an outer loop 0x0040..0x0120 around an inner loop
# 0x0060..0x00f0 (the hot one), a second innermost loop 0x0130..0x0150 (smaller), EXIT and the
# branch-to-itself padding.
SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                /* 0x0 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;      /* 0x0 */
        /*0020*/                   NOP ;
        /*0030*/                   IMAD R0, R1, R2, RZ ;
        /*0040*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0050*/                   MOV R3, R0 ;
        /*0060*/                   HGMMA.64x64x16.F32 R24, gdesc[UR12], RZ, !UPT ;
        /*0070*/                   HGMMA.64x32x16.F32 R24, gdesc[UR12], R24 ;
        /*0080*/                   MUFU.EX2 R5, R5 ;
        /*0090*/                   MUFU.RCP R6, R6 ;
        /*00a0*/                   LDGSTS.E.BYPASS.128 [R13+0x4000], desc[UR22][R4.64], P4 ;
        /*00b0*/                   LDG.E R7, desc[UR4][R8.64] ;
        /*00c0*/                   UTMALDG.2D [UR8], [UR4] ;
        /*00d0*/                   NOP ;
        /*00e0*/                   FFMA R1, R2, R3, R4 ;
        /*00f0*/               @!P3 BRA 0x60 ;
        /*0100*/                   FADD R1, R2, R3 ;
        /*0110*/                   FMUL R1, R2, R3 ;
        /*0120*/               @P0 BRA 0x40 ;
        /*0130*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0140*/                   FADD R1, R2, R3 ;
        /*0150*/               @P1 BRA 0x130 ;
        /*0160*/                   EXIT ;
        /*0170*/                   BRA 0x170;
"""
TTGIR = (
    "%x = ttng.async_tma_copy_global_to_local %d[%a] %b : !tt.ptr -> !ttg.memdesc<64x64xf16, #s>"
)


def test_the_main_loop_is_the_largest_innermost_backward_branch():
    code = sass_instructions(SASS)
    assert len(code) == 24 and code[6][1] == "HGMMA.64x64x16.F32"
    assert main_loop(code) == (0x60, 0xF0)
    assert main_loop(code[:3]) is None  # straight-line code


def test_loop_profile_counts_one_iteration_per_warp_and_its_bytes():
    loop = loop_profile(SASS, TTGIR, num_warps=8)
    assert loop.found and loop.instructions == 9  # 0x60..0xf0 less the NOP
    assert loop.mma == {"HGMMA.64x64x16": 1, "HGMMA.64x32x16": 1} and not loop.tf32
    # A warpgroup instruction per 4 warps: 2 warpgroups x 2 x 64 x (64 + 32) x 16 FLOP.
    assert loop.mma_flops == 2 * 2 * 64 * 96 * 16
    assert (loop.mufu, loop.ex2) == (2, 1)
    # LDGSTS 16 B and LDG 4 B per lane over 8 warps, plus one 64 x 64 fp16 TMA tile per block.
    assert loop.bytes_loaded == (16 + 4) * 32 * 8 + 64 * 64 * 2
    whole = loop_profile(SASS.split("/*0060*/")[0], "", num_warps=4)  # no loop: whole kernel
    assert not whole.found and whole.instructions == 5 and whole.bytes_loaded == 16 * 32 * 4


# sm_100 (tcgen05) in cuobjdump's format: UTCHMMA names the uniform register of its
# instruction descriptor, which a UMOV sets to an immediate holding the input type, M and N
# (0x8080010: f16, M 128, N 32); a loop 0x30..0xa0 of five UTCHMMA.
TCGEN05_SASS = """
        /*0000*/  UMOV UR31, 0x8080010 ;
        /*0010*/  UMOV UR5, 0x8200010 ;
        /*0020*/  UMOV UR9, 0x4080910 ;
        /*0030*/  UTCHMMA gdesc[UR4], gdesc[UR12], tmem[UR9], tmem[UR30], idesc[UR31], !UPT ;
        /*0040*/  UTCHMMA gdesc[UR34], gdesc[UR14], tmem[UR9], tmem[UR30], idesc[UR31], UPT ;
        /*0050*/  UTCHMMA gdesc[UR36], gdesc[UR16], tmem[UR9], tmem[UR30], idesc[UR5], UPT ;
        /*0060*/  UTCHMMA gdesc[UR36], gdesc[UR16], tmem[UR7], tmem[UR30], idesc[UR9], UPT ;
        /*0070*/  UIADD3 UR5, UPT, UPT, UR5, 0x10, URZ ;
        /*0080*/  UTCHMMA gdesc[UR36], gdesc[UR16], tmem[UR7], tmem[UR30], idesc[UR5], UPT ;
        /*0090*/  UTCBAR [UR10], URZ ;
        /*00a0*/  @P0 BRA 0x30 ;
        /*00b0*/  EXIT ;
"""


def test_loop_profile_reads_tcgen05_shapes_from_the_instruction_descriptor():
    loop = loop_profile(TCGEN05_SASS, "", num_warps=8)
    assert loop.found and loop.instructions == 8
    # UR31: M 8 x 16 = 128, N 4 x 8 = 32; UR5: N 16 x 8 = 128; UR9: A type 2 (tf32), M 64,
    # N 32, K 8; the last names a register computed in the loop, whose shape is not known.
    assert loop.mma == {
        "UTCHMMA.128x32x16": 2, "UTCHMMA.128x128x16": 1, "UTCHMMA.64x32x8": 1, "UTCHMMA.?": 1
    }  # fmt: skip
    assert loop.tf32
    # One instruction per block, whatever the warps.
    assert loop.mma_flops == 2 * (2 * 128 * 32 * 16 + 128 * 128 * 16 + 64 * 32 * 8)
    loop_bound(loop, num_warps=8, peak=ARCHS[100].peak)
    assert loop.cycles["tensor"] == loop.mma_flops / (8192 / 2)  # tf32: half the 16-bit rate


def test_loop_bound_is_the_largest_of_four_throughput_limits():
    peak = ARCHS[90].peak  # H100 SXM5: 4096 FLOP, 4 instructions, 16 MUFU per clock per SM
    loop = LoopProfile(True, 1000, {}, 4096 * 300, False, 10, 10, 0)
    loop_bound(loop, num_warps=8, peak=peak)
    # tensor 300, issue 1000 x 8 / 4 = 2000, exp 10 x 256 / 16 = 160, memory 0
    assert loop.cycles == {"tensor": 300, "issue": 2000, "exp": 160, "memory": 0, "bound": 2000}
    assert loop.limiter == "issue" and loop.peak_fraction == 0.15
    tf32 = LoopProfile(True, 10, {}, 4096 * 300, True, 0, 0, 0)
    loop_bound(tf32, num_warps=8, peak=peak)
    assert tf32.limiter == "tensor" and tf32.cycles["tensor"] == 600 and tf32.peak_fraction == 1
    copy = LoopProfile(False, 10, {}, 0, False, 0, 0, 1 << 20)  # no tensor core: DRAM share
    loop_bound(copy, num_warps=4, peak=peak)
    assert copy.limiter == "memory" and copy.peak_fraction == 1
    assert copy.cycles["memory"] == round((1 << 20) / (3352 / (132 * 1.83)), 1)


def _looped(instructions: int, triton: str = "3.9.0") -> Record:
    record = _record()
    record.usage.loop = LoopProfile(True, instructions, {}, 0, False, 0, 0, 0)
    record.config, record.triton = "BLOCK_M=128 w8 s2", triton
    return record


def test_instruction_budget_fails_growth_over_ten_percent():
    budget = record_instructions([_looped(1000)], {"spill_bytes": 0})
    sm90 = budget["instructions_per_iteration"]["triton 3.9"]["sm_90"]
    assert sm90 == {budget_key(_looped(1000)): 1000}
    for instructions, ok in ((1000, True), (1100, True), (1101, False), (500, True)):
        record = _looped(instructions)
        judge(record, budget)
        assert record.ok == ok, (instructions, record.problems)
    grown = _looped(1200)
    judge(grown, budget)
    assert grown.problems == [
        "_attention_forward_kernel: 1200 SASS instructions per loop iteration > budget 1000 "
        "+ 10% = 1100"
    ]
    other_triton = _looped(5000, triton="3.6.0")  # unlisted for its version: not judged on it
    judge(other_triton, budget)
    assert other_triton.ok


def test_updating_the_budget_replaces_the_entries_of_the_cases_it_compiled():
    # A tile changed since the budget was written: the run's entry replaces the old config's,
    # while the cases it did not compile (another head dim), the other arch and the other
    # Triton version keep theirs.
    old = _looped(900)
    old.config = "BLOCK_M=64 w8 s2"
    other_case = _looped(700)
    other_case.params = {"dtype": "fp16", "D": 128}
    other_arch = _looped(800)
    other_arch.arch = 80
    budget = record_instructions(
        [old, other_case, other_arch, _looped(600, triton="3.6.0")], {"spill_bytes": 0}
    )
    new = _looped(1000)
    table = record_instructions([new], budget)["instructions_per_iteration"]
    assert table["triton 3.9"]["sm_90"] == {budget_key(new): 1000, budget_key(other_case): 700}
    assert table["triton 3.9"]["sm_80"] == {budget_key(other_arch): 800}
    assert table["triton 3.6"]["sm_90"] == {budget_key(_looped(600, triton="3.6.0")): 600}
    stale = budget["instructions_per_iteration"]["triton 3.9"]["sm_90"]
    assert stale[budget_key(old)] == 900  # the input budget is left as it was


def test_saved_records_keep_their_loop_profile():
    import json

    from fastgpt.selftest.compile_check import records_from_json

    record = _looped(1234)
    payload = json.loads(json.dumps({"triton": "3.9.0", "records": [record.as_dict()]}))
    (again,) = records_from_json(payload)
    assert again.usage.loop == record.usage.loop and again.triton == "3.9.0"


LOOP_OF_ATTENTION = """
import json
from fastgpt.selftest.compile_check import load_budget, run_compile_check
from fastgpt.selftest.sweep import SweepOptions

options = SweepOptions(ops=("attention",), dtypes=("fp16",), head_dims=(64,), subset="ci",
                       passes=("forward",))
for arch in (90, 80):
    for r in run_compile_check([arch], options, load_budget(), jobs=1):
        if r.pass_name == "forward":
            loop = r.usage.loop
            print(json.dumps([arch, r.usage.pipelined, loop.found, loop.mma, loop.ex2,
                              loop.bytes_loaded]))
"""


def test_attention_forward_loop_on_hopper_and_ampere():
    result = _python(LOOP_OF_ATTENTION, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
    assert {(arch, loads) for arch, loads, *_ in rows} == {
        (90, "TMA"), (90, "cp.async"), (80, "cp.async")
    }  # fmt: skip
    for arch, _, found, mma, ex2, loaded in rows:
        # 128 x 64 scores per iteration of 8 warps: QK^T and PV, 128 x 64 x 64 each (on sm_90
        # 64 x 64 x 16 per warpgroup, 2 x 4 k-steps per warp; on sm_80 16 x 8 x 16 per warp,
        # 2 x 32), one exp2 per score (32 per warp) and the row rescale; K and V tiles loaded.
        assert found
        assert mma == ({"HGMMA.64x64x16": 8} if arch == 90 else {"HMMA.16816": 64})
        assert 32 <= ex2 <= 40 and loaded >= 2 * 64 * 64 * 2


def test_ratio_to_the_tutorial_is_per_score_element():
    from fastgpt.selftest.report import tutorial_ratios

    def forward(pass_name, config, bound, instructions, warps):
        record = _looped(instructions)
        record.pass_name, record.config = pass_name, config
        record.params = {"dtype": "fp16", "D": 64, "causal": True}
        record.usage.num_warps = warps
        record.usage.loop.cycles = {"bound": bound}
        return record

    tutorial = forward("tutorial", "BLOCK_M=128 BLOCK_N=64 w4 s3", 1000, 500, 4)
    ours = forward("forward", "BLOCK_D=64 BLOCK_M=128 BLOCK_N=32 w8 s2", 1000, 1000, 8)
    ratios = tutorial_ratios([ours, tutorial])
    # Half the scores per iteration at the same bound: 2x the cycles per score element;
    # 8000 instructions for 4096 scores against 2000 for 8192: 8x.
    assert ratios == {id(ours): "2.00x (instr 8.00x)"}
    judge(tutorial, {"spill_bytes": 0})
    assert tutorial.ok  # a reference, never judged


def test_tutorial_forward_is_taken_out_of_its_file(tmp_path, monkeypatch):
    from fastgpt.selftest import sweep

    tutorial = tmp_path / "06-fused-attention.py"
    tutorial.write_text(
        "import triton\nimport triton.language as tl\n"
        "raise RuntimeError('module code needs a GPU')\n\n"
        "@triton.jit\ndef _attn_fwd_inner(x):\n    return x\n\n"
        "@triton.autotune([], key=[])\n@triton.jit\ndef _attn_fwd(X, BLOCK_M: tl.constexpr):\n"
        "    tl.store(X, _attn_fwd_inner(1.0))\n"
    )
    monkeypatch.setenv("FASTGPT_TRITON_TUTORIAL", str(tutorial))
    assert sweep.tutorial_path() == tutorial
    kernel = sweep._tutorial_forward(tutorial)
    assert kernel.fn.__name__ == "_attn_fwd"
    text = (tmp_path / "tutorial_attention_forward.py").read_text()
    assert "autotune" not in text and text.count("@triton.jit") == 2
    (tmp_path / "06-fused-attention.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="no _attn_fwd_inner/_attn_fwd"):
        sweep._tutorial_forward(tutorial)
