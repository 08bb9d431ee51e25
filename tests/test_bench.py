"""The benchmark harness and `fastgpt bench`: formulas, ratios, the report writer, the SDPA
baseline model, and the CPU run end to end (GPU timings are not testable without a GPU)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from fastgpt.benchmarks import harness, report
from fastgpt.benchmarks.run import SUITES, parse_dtypes, parse_only

from fastgpt import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --- formulas --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"), [("fwd", 2 * 1000 * 2), ("bwd", 3 * 1000 * 2), ("fwd+bwd", 5 * 1000 * 2)]
)
def test_memory_bound_bytes(mode, expected):
    assert harness.memory_bound_bytes(mode, numel=1000, element_size=2) == expected


def test_formulas_reject_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        harness.memory_bound_bytes("forward", 10, 2)
    with pytest.raises(ValueError, match="mode"):
        harness.attention_flops(1, 1, 8, 8, True, "backward")


def test_attention_flops_known_numbers():
    # GPT-2 small, one sequence of 1024: 4·1·12·1024²·64 = 3,221,225,472 FLOPs forward.
    full = harness.attention_flops(1, 12, 1024, 64, causal=False, mode="fwd")
    assert full == 4 * 12 * 1024**2 * 64 == 3_221_225_472
    causal = harness.attention_flops(1, 12, 1024, 64, causal=True, mode="fwd")
    assert causal == full / 2
    assert harness.attention_flops(1, 12, 1024, 64, True, "bwd") == 2.5 * causal
    assert harness.attention_flops(1, 12, 1024, 64, True, "fwd+bwd") == 3.5 * causal
    assert harness.attention_flops(3, 12, 1024, 64, True, "fwd") == 3 * causal


def test_throughput_and_mfu_known_numbers():
    # 2 GB moved in 1 ms is 2 TB/s; 1e12 FLOPs in 10 ms is 100 TFLOP/s.
    assert harness.throughput(2e9, 1.0) == pytest.approx(2e12)
    assert harness.throughput(1e12, 10.0) / 1e12 == pytest.approx(100.0)
    # 100k tokens/s × 1 GFLOP/token on a 400 TFLOP/s device = 25% MFU.
    assert harness.mfu(1e5, 1e9, 4e14) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        harness.throughput(1.0, 0.0)
    with pytest.raises(ValueError):
        harness.mfu(1.0, 1.0, 0.0)


def test_gpt2_small_flops_per_token_matches_6n_plus_attention():
    from fastgpt.model import count_parameters, flops_per_token
    from fastgpt.model_config import GPTConfig

    config = GPTConfig.from_name("gpt2-small")
    n = count_parameters(config, non_embedding=True)
    assert flops_per_token(config, 1024) == 6 * n + 12 * 12 * 1024 * 768


def test_slug_and_spec_sheet():
    assert harness.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert harness.slugify("  ??  ") == "unknown"
    assert harness.spec_sheet("NVIDIA H100 80GB HBM3")["board"] == "H100 SXM"
    assert harness.spec_sheet("NVIDIA H100 PCIe")["board"] == "H100 PCIe"
    assert harness.spec_sheet("NVIDIA GeForce RTX 4090")["hbm_gbps"] is None  # bf16 peak only
    assert harness.spec_sheet("Some Future GPU") is None
    assert harness.results_slug("cpu").startswith("cpu-")


def test_cpu_timers_count_calls():
    calls = []
    ms = harness.time_steps_ms(lambda: calls.append(1), "cpu", warmup=2, reps=5)
    assert len(calls) == 7 and ms >= 0
    calls.clear()
    ms = harness.time_ms(lambda: calls.append(1), "cpu", warmup_ms=0, rep_ms=0, min_reps=4)
    assert len(calls) == 1 + 4 and ms >= 0  # one first call, then min_reps timed calls
    assert harness.peak_memory_mb(lambda: None, "cpu") is None


# --- ratios and tables -----------------------------------------------------------------------


def _rec(provider, role, ms, case=None, status="ok", suite="layernorm"):
    case = case or {"op": "layernorm", "dtype": "bf16", "rows": 4096, "width": 768, "mode": "fwd"}
    r = {"suite": suite, "case": dict(case), "provider": provider, "role": role, "status": status}
    r.update(note=None if status == "ok" else "out of memory", ms=ms if status == "ok" else None)
    if status == "ok":
        r.update(gbps=1000.0 / ms, pct_copy_bw=50.0, peak_mem_mb=12.0)
    return r


def test_ratio_is_best_baseline_time_over_own_time():
    other_case = {"op": "layernorm", "dtype": "bf16", "rows": 4096, "width": 768, "mode": "bwd"}
    records = [
        _rec("fastgpt", "ours", 1.0),
        _rec("torch eager", "baseline", 3.0),
        _rec("torch.compile", "baseline", 2.0),
        _rec("broken", "baseline", None, status="skipped"),
        _rec("fastgpt", "ours", 4.0, case=other_case),  # no baseline in this case
        _rec("torch eager", "baseline", 0.5, case=other_case, status="skipped"),
    ]
    report.add_ratios(records)
    ours, eager, compiled, broken, lonely, skipped = records
    assert ours["vs_best_baseline"] == pytest.approx(2.0)  # 2 ms best baseline / 1 ms
    assert ours["best_baseline"] == "torch.compile"
    assert compiled["vs_best_baseline"] == pytest.approx(1.0)
    assert eager["vs_best_baseline"] == pytest.approx(2.0 / 3.0)
    assert broken["vs_best_baseline"] is None
    assert lonely["vs_best_baseline"] is None and lonely["best_baseline"] is None
    assert skipped["vs_best_baseline"] is None
    head = report.headline(records)
    assert head == {"cases": 1, "geomean": pytest.approx(2.0), "min": 2.0, "max": 2.0}


def test_geometric_mean():
    assert report.geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert report.geometric_mean([None, 0.0]) is None


def test_markdown_table_has_ratio_column_and_skips():
    records = report.add_ratios(
        [
            _rec("fastgpt", "ours", 1.0),
            _rec("torch eager", "baseline", 2.0),
            _rec("SDPA cuDNN", "baseline", None, status="skipped"),
        ]
    )
    table = report.markdown_table("layernorm", records)
    header = table.splitlines()[0]
    columns = ("op", "width", "mode", "provider", "ms", "GB/s", "% copy BW", "vs best baseline")
    for column in columns:
        assert column in header
    assert "2.00×" in table and "1.00×" in table
    assert "fastgpt **(ours)**" in table
    assert "skipped: out of memory" in table
    # every row has as many cells as the header
    widths = {line.count("|") for line in table.strip().splitlines()}
    assert len(widths) == 1


# --- the report writer on synthetic records ---------------------------------------------------

ENV = {
    "device_name": "Test GPU",
    "gpu_name": "Test GPU",
    "torch_version": "2.x",
    "triton_version": "3.x",
    "cuda_version": "12.x",
    "python_version": "3.x",
    "git_commit": "abc123",
    "date_utc": "2026-01-01T00:00:00Z",
}
HARDWARE = {
    "copy_bandwidth_gbps": 3000.0,
    "matmul_tflops": 700.0,
    "matmul_dtype": "bf16",
    "matmul_shape": [8192] * 3,
}


def _synthetic_suites():
    kernels = []
    for width in (768, 1024, 4096):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            case = {"op": "gelu", "dtype": "bf16", "rows": 4096, "width": width, "mode": mode}
            kernels += [
                _rec("fastgpt", "ours", 1.0, case, suite="gelu"),
                _rec("torch eager", "baseline", 1.5, case, suite="gelu"),
            ]
    attention = []
    for t in (512, 1024):
        case = {"dtype": "bf16", "batch": 2, "heads": 12, "head_dim": 64, "seq_len": t}
        for mode in ("fwd", "bwd"):
            for provider, role, ms in [("fastgpt", "ours", 1.0), ("SDPA flash", "baseline", 1.1)]:
                attention.append(
                    {
                        "suite": "attention",
                        "case": {**case, "mode": mode},
                        "provider": provider,
                        "role": role,
                        "status": "ok",
                        "note": None,
                        "ms": ms,
                        "tflops": 300.0 / ms,
                        "pct_matmul": 40.0,
                        "peak_mem_mb": 100.0,
                    }
                )
    train = []
    for provider, role, ms in [("fastgpt", "ours", 100.0), ("torch compile", "baseline", 120.0)]:
        train.append(
            {
                "suite": "train",
                "case": {"model": "gpt2-small", "batch": 8, "seq_len": 1024},
                "provider": provider,
                "role": role,
                "status": "ok",
                "note": None,
                "ms": ms,
                "tokens_per_s": 8192 / (ms / 1e3),
                "mfu_pct": 40.0,
                "peak_mem_mb": 9000.0,
            }
        )
    return {"gelu": kernels, "attention": attention, "train": train}


def test_report_writer_on_synthetic_records(tmp_path):
    for suite, records in _synthetic_suites().items():
        report.add_ratios(records)
        report.write_suite_json(tmp_path, suite, records, ENV, HARDWARE, notes=[f"{suite} note"])
    written = report.write_all(tmp_path)
    assert set(written) == {"gelu.png", "attention.png", "train.png", "summary.md"}
    for name in ("gelu.png", "attention.png", "train.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    summary = (tmp_path / "summary.md").read_text()
    assert "# fastgpt bench: Test GPU" in summary
    assert "abc123" in summary and "2026-01-01T00:00:00Z" in summary
    assert "vs best baseline" in summary
    assert "1.50×" in summary  # gelu ours vs eager
    assert "![gelu](gelu.png)" in summary and "gelu note" in summary
    # suites appear in the fixed order, and the JSON round-trips with its headline
    assert summary.index("## gelu") < summary.index("## attention") < summary.index("## train")
    # the headline: gelu fwd+bwd at the largest rows, every train case, with the baseline
    headline = summary.split("## Headline")[1].split("## gelu")[0]
    row = "| gelu | op=gelu, dtype=bf16, rows=4096, width=4096, mode=fwd+bwd | fastgpt: 1000 GB/s "
    assert row + "| torch eager | 666.7 GB/s | 1.50× |" in headline
    assert "mode=fwd |" not in headline  # forward-only rows stay in the suite table
    assert "| train | model=gpt2-small" in headline and "1.20×" in headline
    payload = json.loads((tmp_path / "train.json").read_text())
    assert payload["env"] == ENV and payload["hardware"] == HARDWARE
    assert payload["headline"]["geomean"] == pytest.approx(1.2)


def test_attention_plot_draws_packed_documents_apart_from_the_dense_lines(tmp_path, monkeypatch):
    """The varlen case (16 documents packed into 2048 tokens) is not one more point on the
    lines of dense batches over sequence length: it has panels of its own."""
    records = _synthetic_suites()["attention"]
    varlen = {"dtype": "bf16", "layout": "varlen, 16 documents", "heads": 12, "head_dim": 64,
              "seq_len": 2048, "mode": "fwd"}  # fmt: skip
    records.append({**records[0], "case": varlen})  # the provider of the dense lines, "fastgpt"
    drawn = []
    monkeypatch.setattr(report, "_line_panels", lambda ax, panels, *a: drawn.extend(panels))
    report.plot_suite("attention", {"records": records, "hardware": HARDWARE, "env": ENV}, tmp_path)
    lengths = {title: {r["case"]["seq_len"] for r in rows} for title, rows in drawn}
    assert lengths == {
        "dtype=bf16, heads=12, head_dim=64, mode=fwd": {512, 1024},
        "dtype=bf16, heads=12, head_dim=64, mode=bwd": {512, 1024},
        "layout=varlen, 16 documents, dtype=bf16, heads=12, head_dim=64, mode=fwd": {2048},
    }


def test_cpu_varlen_baselines_say_which_sdpa_call_they_are():
    from fastgpt.benchmarks import kernels_bench

    providers = kernels_bench._varlen_providers(torch.device("cpu"), [3, 5], 2, 8, torch.float32)
    assert [name for name, *_ in providers] == [
        "fastgpt torch backend", "torch SDPA, padded batch", "torch SDPA, block-diagonal mask"
    ]  # fmt: skip


def test_attention_headline_keeps_small_cpu_numbers(tmp_path):
    """The headline shows TFLOP/s with the detail table's 3 significant figures: a CPU run's
    0.0123 TFLOP/s is not printed as 0.0."""
    records = [r for r in _synthetic_suites()["attention"] if r["case"]["mode"] == "fwd"]
    for r in records:  # the headline shows forward+backward
        r["case"]["mode"] = "fwd+bwd"
        r["tflops"] = 0.0123 * (1.1 if r["role"] == "ours" else 1.0)
    report.write_suite_json(tmp_path, "attention", report.add_ratios(records), ENV, HARDWARE)
    summary = report.write_summary(tmp_path).read_text()
    headline = summary.split("## Headline")[1].split("## attention")[0]
    assert "| fastgpt: 0.0135 TFLOP/s | SDPA flash | 0.0123 TFLOP/s |" in headline
    assert "0.0 TFLOP/s" not in headline


def test_short_commit_cuts_only_hex_hashes(tmp_path):
    sha = "132d9bf49471166d3632b82e9fab7c949556299e"
    assert harness.short_commit(sha) == "132d9bf49471"
    assert harness.short_commit(sha + "-dirty") == "132d9bf49471-dirty"
    assert harness.short_commit("abc123") == "abc123"
    for name in ("fastgpt 0.1.0", "fastgpt 0.10.0rc1", "unknown"):
        assert harness.short_commit(name) == name
    # the summary's table keeps the package version whole
    report.write_suite_json(
        tmp_path,
        "train",
        report.add_ratios(_synthetic_suites()["train"]),
        {**ENV, "git_commit": "fastgpt 0.1.0"},
        HARDWARE,
    )
    summary = report.write_summary(tmp_path).read_text()
    assert "| fastgpt 0.1.0 |" in summary


def test_summary_merges_suites_written_by_separate_runs(tmp_path):
    suites = _synthetic_suites()
    report.write_suite_json(tmp_path, "train", report.add_ratios(suites["train"]), ENV, HARDWARE)
    later = {**ENV, "date_utc": "2026-02-02T00:00:00Z", "git_commit": "def456"}
    report.write_suite_json(tmp_path, "gelu", report.add_ratios(suites["gelu"]), later, HARDWARE)
    summary = report.write_summary(tmp_path).read_text()
    assert "abc123" in summary and "def456" in summary
    assert "## train" in summary and "## gelu" in summary


# --- the PyTorch baseline model computes the same function ---------------------------------


def test_sdpa_baseline_matches_torch_backend():
    from fastgpt.model import GPTModel
    from fastgpt.model_config import GPTConfig

    config = GPTConfig.from_name("tiny", vocab_size=97)
    torch.manual_seed(0)
    book = GPTModel(config, backend="torch").eval()
    fast = GPTModel(config, backend="torch").eval()
    fast.load_state_dict(book.state_dict())
    fast.set_backend("sdpa")
    assert fast.backend == "sdpa"
    assert set(fast.state_dict()) == set(book.state_dict())  # same parameters, same names
    ids = torch.randint(0, config.vocab_size, (2, 23))
    with torch.no_grad():
        expected = book(ids)  # (2, 23, V)
        torch.testing.assert_close(fast(ids), expected, rtol=1e-5, atol=1e-5)
        # Continuing a KV cache with several tokens needs the bottom-right causal mask.
        cache = fast.new_kv_cache()
        fast(ids[:, :9], kv_cache=cache)
        cont = fast(ids[:, 9:], kv_cache=cache)  # (2, 14, V)
        torch.testing.assert_close(cont, expected[:, 9:], rtol=1e-5, atol=1e-5)
        step = fast(ids[:, :1], kv_cache=fast.new_kv_cache())
        torch.testing.assert_close(step, expected[:, :1], rtol=1e-5, atol=1e-5)


def test_gpu_grids_and_providers_are_the_issues():
    """What a GPU run measures (checked without a GPU: these only build lists)."""
    from fastgpt.benchmarks import kernels_bench, train_bench

    cuda = torch.device("cuda")
    rowwise = kernels_bench.rowwise_grid(cuda, quick=False)
    assert max(rowwise["rows"]) == 65536 and rowwise["widths"] == [768, 1024, 1280, 1600, 4096]
    assert rowwise["dtypes"] == ["bf16", "fp16"]
    assert [n for n, _, _ in kernels_bench._rowwise_providers("gelu", cuda)] == [
        "fastgpt", "torch eager", "torch.compile"
    ]  # fmt: skip
    attention = kernels_bench.attention_grid(cuda, quick=False)
    assert attention["seq_lens"][0] == 512 and attention["seq_lens"][-1] == 16384
    assert {d for _, d in attention["heads_dims"]} == {64, 128}
    assert {h for h, _ in attention["heads_dims"]} >= {12, 16, 20, 25}  # GPT-2 small..xl
    assert [n for n, _, _ in kernels_bench._attention_providers(cuda)] == [
        "fastgpt", "SDPA flash", "SDPA mem-efficient", "SDPA cuDNN", "book attention"
    ]  # fmt: skip
    train = train_bench.train_grid(cuda, quick=False)
    assert [(m, t) for m, _, t, _ in train["models"]] == [
        ("gpt2-small", 1024),
        ("gpt2-medium", 1024),
    ]
    fastest = [p for p in train_bench.train_providers(cuda, quick=True) if p.role == "baseline"]
    assert any(p.backend == "sdpa" and p.compile and p.fused_adamw for p in fastest)
    assert any(p.backend == "triton" for p in train_bench.train_providers(cuda, quick=True))
    assert train_bench.generate_grid(cuda, quick=False)["batches"] == [1, 16]


# --- the command -----------------------------------------------------------------------------


def test_parse_only():
    assert parse_only(None) == list(SUITES)
    assert parse_only("train, attention") == ["attention", "train"]  # suite order
    assert parse_only("GELU") == ["gelu"]
    with pytest.raises(ValueError, match=r"'bogus'.*layernorm"):
        parse_only("gelu,bogus")


def test_parse_dtypes(tmp_path, capsys):
    assert parse_dtypes(None) is None
    assert parse_dtypes("BF16, fp16") == ("bf16", "fp16")
    with pytest.raises(ValueError, match=r"'fp64'"):
        parse_dtypes("bf16,fp64")
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--dtypes", "fp64", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "unknown dtype" in capsys.readouterr().err


def test_suite_narrows_dtypes_and_checkpoints_after_each_case():
    from fastgpt.benchmarks.kernels_bench import bench_gelu

    hardware = {"copy_bandwidth_gbps": 10.0, "matmul_tflops": 0.1}
    saved: list[int] = []
    options = harness.RunOptions(
        quick=True, dtypes=("bf16",), checkpoint=lambda records: saved.append(len(records))
    )
    records = bench_gelu(torch.device("cpu"), hardware, options)
    assert {r["case"]["dtype"] for r in records} == {"bf16"}
    # one checkpoint per case (gelu, bias_gelu), each holding every record so far
    assert len(saved) == 2 and saved[0] < saved[1] == len(records)
    for r in records:  # % of the hardware numbers passed in
        assert r["pct_copy_bw"] == pytest.approx(100 * r["gbps"] / 10.0)


def test_partial_suite_is_marked_in_the_summary(tmp_path):
    records = report.add_ratios(_synthetic_suites()["train"])
    report.write_suite_json(tmp_path, "train", records, ENV, HARDWARE, partial=True)
    assert json.loads((tmp_path / "train.json").read_text())["partial"] is True
    assert "Partial results" in report.write_summary(tmp_path).read_text()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("only", ["bogus", "layernorm,", "attention,flash"])
def test_bench_rejects_unknown_suite(only, capsys, tmp_path):
    if only == "layernorm,":  # a trailing comma is harmless
        assert parse_only(only) == ["layernorm"]
        return
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--only", only, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "unknown suite" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_bench_cpu_quick_end_to_end(tmp_path, capsys):
    """`fastgpt bench --quick --device cpu --out DIR`: every suite on CPU, in seconds."""
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Triton kernels are NOT timed on CPU" in out
    assert "vs best baseline" in out

    for suite in SUITES:
        payload = json.loads((tmp_path / f"{suite}.json").read_text())
        assert payload["partial"] is False
        env = payload["env"]
        for field in ("device_name", "torch_version", "triton_version", "git_commit", "date_utc"):
            assert env[field], field
        assert "gpu_name" in env and env["device_type"] == "cpu"
        hw = payload["hardware"]
        assert hw["copy_bandwidth_gbps"] > 0 and hw["matmul_tflops"] > 0
        records = payload["records"]
        assert records and all(r["status"] == "ok" for r in records), records
        assert all(not r["provider"].startswith("fastgpt") or r["role"] == "ours" for r in records)
        assert {r["role"] for r in records} == {"ours", "baseline"}
        for r in records:
            assert r["ms"] > 0 and math.isfinite(r["ms"])
            assert r["vs_best_baseline"] > 0
            # never a Triton provider on CPU
            assert r["provider"] in {
                "fastgpt torch backend",
                "torch eager",
                "torch SDPA (default)",
                "torch SDPA, padded batch",
                "torch SDPA, block-diagonal mask",
                "book attention",
                "torch SDPA + fused AdamW",
                "torch SDPA",
                "HF + fastgpt.patch_hf_gpt2",
                "HF eager",
                "HF SDPA",
            }
        assert (tmp_path / f"{suite}.png").read_bytes()[:8] == PNG_MAGIC

    kernels = json.loads((tmp_path / "layernorm.json").read_text())["records"]
    assert all(r["gbps"] > 0 and r["pct_copy_bw"] > 0 for r in kernels)
    assert {r["case"]["mode"] for r in kernels} == {"fwd", "bwd", "fwd+bwd"}
    train = json.loads((tmp_path / "train.json").read_text())["records"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu_pct"] < 100 for r in train)
    generate = json.loads((tmp_path / "generate.json").read_text())["records"]
    assert {(r["case"]["batch"], r["case"]["kv_cache"]) for r in generate} == {
        (1, True),
        (1, False),
        (16, True),
        (16, False),
    }
    summary = (tmp_path / "summary.md").read_text()
    assert "vs best baseline" in summary and "| layernorm |" in summary
    assert "No CUDA GPU" in summary or "as requested" in summary


def test_bench_only_one_suite(tmp_path, capsys):
    argv = ["bench", "--quick", "--device", "cpu", "--only", "gelu", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["gelu.json", "gelu.png", "summary.md"]
    ops = {r["case"]["op"] for r in json.loads((tmp_path / "gelu.json").read_text())["records"]}
    assert ops == {"gelu", "bias_gelu"}


def test_bench_report_only_rebuilds_summary(tmp_path, capsys):
    assert cli.main(["bench", "--report-only", "--out", str(tmp_path)]) == 2  # no JSON there
    assert "holds no <suite>.json files" in capsys.readouterr().err
    records = report.add_ratios(_synthetic_suites()["train"])
    report.write_suite_json(tmp_path, "train", records, ENV, HARDWARE)
    assert cli.main(["bench", "--report-only", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md", "train.json", "train.png"]
    assert "## train" in (tmp_path / "summary.md").read_text()


def test_bench_rejects_cuda_without_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert cli.main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bench_report_only_defaults_to_the_devices_folder_and_out_must_be_writable(
    tmp_path, capsys, monkeypatch
):
    from fastgpt.benchmarks import run

    monkeypatch.setattr(run, "default_out_dir", lambda device: tmp_path / "cpu-folder")
    assert cli.main(["bench", "--report-only", "--device", "cpu"]) == 2
    assert f"{tmp_path / 'cpu-folder'} holds no <suite>.json files" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert cli.main(["bench", "--device", "cpu", "--out", str(tmp_path / "a-file" / "x")]) == 2
    assert "--out" in (err := capsys.readouterr().err) and "is a file, not a folder" in err


def test_bench_refuses_a_default_folder_that_git_tracks_files_in(tmp_path, capsys, monkeypatch):
    """In a checkout the default folder, benchmarks/results/<device>/, may hold committed
    results: bench replaces them only when --out names the folder."""
    import subprocess

    from fastgpt.benchmarks import run

    folder = tmp_path / "benchmarks" / "results" / "cpu-x"
    folder.mkdir(parents=True)
    (folder / "summary.md").write_text("committed\n")
    monkeypatch.setattr(run, "default_out_dir", lambda device: folder)
    assert harness.tracked_files(folder) == []  # not a checkout
    assert cli.main(["bench", "--report-only", "--device", "cpu"]) == 2
    assert "holds no <suite>.json" in capsys.readouterr().err  # the folder was accepted
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    assert harness.tracked_files(folder) == ["summary.md"]
    # (--report-only: a measuring run, were it not refused, would take minutes)
    assert cli.main(["bench", "--device", "cpu", "--report-only"]) == 2
    err = capsys.readouterr().err
    assert f"--out: the default results folder {folder} holds files git tracks" in err, err
    assert "(summary.md)" in err
    assert (folder / "summary.md").read_text() == "committed\n"
    assert sorted(p.name for p in folder.iterdir()) == ["summary.md"]
    assert cli.main(["bench", "--report-only", "--device", "cpu", "--out", str(folder)]) == 2
    assert "holds no <suite>.json" in capsys.readouterr().err  # named: accepted


def test_results_go_under_the_current_folder_and_name_the_code(tmp_path, monkeypatch):
    """Installed or not, bench writes to ./benchmarks/results (never into the package) and
    records the commit of a checkout, the package version otherwise."""
    from fastgpt.benchmarks import run

    monkeypatch.chdir(tmp_path)
    assert run.default_out_dir(torch.device("cpu")).parent == tmp_path / "benchmarks" / "results"
    assert harness.git_commit(tmp_path).startswith("fastgpt ")  # not a checkout
    assert harness.git_commit() != harness.git_commit(tmp_path)  # this checkout: a commit


def test_bench_header_names_the_package_version_whole(tmp_path, monkeypatch):
    from fastgpt.benchmarks import run

    monkeypatch.setattr(harness, "git_commit", lambda *a: "fastgpt 0.1.0")
    monkeypatch.setattr(
        harness, "measure_hardware_limits", lambda *a, **k: {**HARDWARE, "matmul_dtype": "fp32"}
    )
    lines: list[str] = []
    run.run_benchmarks(only=[], device="cpu", out_dir=tmp_path, print_fn=lines.append)
    assert any("| commit fastgpt 0.1.0 |" in line for line in lines), lines


def test_bench_hf_suite_on_cpu(tmp_path, capsys):
    """`fastgpt bench --only hf --quick --device cpu`: HF's GPT-2 training step patched and
    eager (and with SDPA), on the kernels' references (said so), in hf.json and the summary."""
    pytest.importorskip("transformers")
    argv = ["bench", "--quick", "--device", "cpu", "--only", "hf", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf.json", "hf.png", "summary.md"]
    payload = json.loads((tmp_path / "hf.json").read_text())
    records = {r["provider"]: r for r in payload["records"]}
    assert set(records) == {"HF + fastgpt.patch_hf_gpt2", "HF eager", "HF SDPA"}
    patched = records["HF + fastgpt.patch_hf_gpt2"]
    assert patched["role"] == "ours" and records["HF eager"]["role"] == "baseline"
    for r in records.values():
        assert r["status"] == "ok", r
        assert r["case"] == {"model": "tiny", "batch": 4, "seq_len": 64, "precision": "fp32",
                             "dropout": 0.0}  # fmt: skip
        assert r["ms"] > 0 and r["tokens_per_s"] == pytest.approx(4 * 64 / (r["ms"] * 1e-3))
        assert r["vs_best_baseline"] > 0 and r["peak_mem_mb"] is None  # no counter on CPU
    fastest = min(records["HF eager"]["ms"], records["HF SDPA"]["ms"])
    assert patched["vs_best_baseline"] == pytest.approx(fastest / patched["ms"])
    assert "references" in patched["note"]
    assert any("plain-PyTorch references" in n for n in payload["notes"])
    assert "| hf | model=tiny" in (tmp_path / "summary.md").read_text()


def test_hf_bench_models_are_patched_and_share_weights():
    pytest.importorskip("transformers")
    from fastgpt.benchmarks import hf_train_bench as hb

    from fastgpt.model_config import GPTConfig

    config = GPTConfig.from_name("tiny")
    cpu = torch.device("cpu")
    models = {p.name: hb.build_hf_model(config, p, cpu) for p in hb.PROVIDERS}
    patched, eager, sdpa = models.values()
    assert patched.config._attn_implementation == "fastgpt"
    assert type(patched.transformer.ln_f).__name__ == "FastLayerNorm"
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == (
        "eager", "sdpa"
    )  # fmt: skip
    for name, p in eager.state_dict().items():
        assert torch.equal(p, patched.state_dict()[name]), name
    assert hb.hf_grid(torch.device("cuda"), quick=False)["models"] == [("gpt2-small", 8, 1024, {})]


def test_bench_hf_suite_skips_without_transformers(tmp_path, monkeypatch):
    """Without transformers the hf suite is skipped with a line; named by --only, the run
    fails (exit 1) once the other suites are written."""
    from fastgpt.benchmarks import run

    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails, find_spec is None
    monkeypatch.setattr(harness, "measure_hardware_limits", lambda *a, **k: HARDWARE)
    lines: list[str] = []
    with pytest.raises(harness.SuitesFailed, match=r"^suites that did not run: hf \(trans"):
        run.run_benchmarks(only=["hf"], device="cpu", out_dir=tmp_path, print_fn=lines.append)
    skips = [line for line in lines if line.startswith("hf: skipped")]
    assert skips == ["hf: skipped, transformers is not installed (pip install -e '.[hf]' in a "
                     "checkout)"]  # fmt: skip
    assert not (tmp_path / "hf.json").exists()


def test_a_suite_whose_every_row_failed_to_import_fails_bench(tmp_path, monkeypatch, capsys):
    """A skipped row is fine; a suite that ran nothing because an import failed is a failed
    run: `fastgpt bench` writes what it has, says so in one line and exits 1."""
    from fastgpt.benchmarks import hf_train_bench, run

    def broken(*args, **kwargs):
        raise ImportError("cannot import name 'CUDAProperties' from 'kernels'")

    monkeypatch.setattr(hf_train_bench, "build_hf_model", broken)
    monkeypatch.setattr(harness, "measure_hardware_limits", lambda *a, **k: HARDWARE)
    pytest.importorskip("transformers")
    argv = ["bench", "--quick", "--device", "cpu", "--only", "hf", "--out", str(tmp_path)]
    assert cli.main(argv) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert error == [
        "fastgpt bench: error: suites that did not run: hf (ImportError: cannot import name "
        "'CUDAProperties' from 'kernels')"
    ]
    assert (tmp_path / "hf.json").exists()  # the skipped rows are still written
    records = [{"status": "skipped", "note": "out of memory"}, {"status": "ok", "note": None}]
    assert run.import_failure(records) is None
    assert run.import_failure(records[:1]) is None  # skipped, but not by an import
