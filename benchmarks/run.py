"""Run benchmark suites, print their tables, write JSON, summary.md and plots.

    from fastgpt.benchmarks.run import run_benchmarks
    run_benchmarks(only=["layernorm"], quick=True, out_dir=None)   # `fastgpt bench` calls this

Suites: layernorm, gelu (GELU and bias+GELU), attention, loss (fused linear + cross-entropy),
train, generate, hf (a Hugging Face GPT-2 training step, eager vs `fastgpt.patch_hf_gpt2`;
skipped without transformers). The hardware limits (copy bandwidth, matmul TFLOP/s) are
measured once at the start of every run and stored with each suite's results, so every
percentage is relative to the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fastgpt.benchmarks import harness, report

SUITES = report.SUITE_ORDER

CPU_NOTICE = (
    "Triton kernels are NOT timed on CPU (they would run through Triton's interpreter, which "
    "measures Python, not the kernels); only the torch backend (fastgpt's plain-PyTorch path) "
    "is measured against PyTorch's own CPU ops."
)


def cpu_notice() -> str:
    """What a CPU run tells the user first."""
    if torch.cuda.is_available():
        return f"Benchmarking on CPU as requested (a CUDA GPU is present). {CPU_NOTICE}"
    return f"No CUDA GPU found: benchmarking on CPU. {CPU_NOTICE}"


SuiteFunction = Callable[[torch.device, dict[str, Any], harness.RunOptions], list[dict]]


def suite_functions() -> dict[str, SuiteFunction]:
    from fastgpt.benchmarks import hf_train_bench, kernels_bench, loss_bench, train_bench

    return {
        "layernorm": kernels_bench.bench_layernorm,
        "gelu": kernels_bench.bench_gelu,
        "attention": kernels_bench.bench_attention,
        "loss": loss_bench.bench_loss,
        "train": train_bench.bench_train,
        "generate": train_bench.bench_generate,
        "hf": hf_train_bench.bench_hf,
    }


def parse_only(value: str | None) -> list[str]:
    """Parse --only: "attention,train" -> ["attention", "train"] (in SUITES order);
    None or "" -> every suite. Raises ValueError naming the unknown suite."""
    if not value:
        return list(SUITES)
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        bad = ", ".join(repr(n) for n in unknown) or repr(value)
        raise ValueError(f"unknown suite {bad}; choose from {', '.join(SUITES)}")
    return [s for s in SUITES if s in names]


def default_out_dir(device: torch.device) -> Path:
    """./benchmarks/results/<gpu-name-slug>/ or ./benchmarks/results/cpu-<cpu-name-slug>/
    under the current folder."""
    return harness.results_root() / harness.results_slug(device)


def suite_notes(suite: str, device: torch.device, quick: bool) -> list[str]:
    notes = []
    if device.type != "cuda":
        notes.append(cpu_notice())
    if quick:
        notes.append("--quick: a few shapes only.")
    if device.type != "cuda" and suite in ("layernorm", "gelu"):
        notes.append(
            "On CPU small tensors stay in cache, so GB/s can exceed the measured (DRAM) copy "
            "bandwidth."
        )
    if suite in ("layernorm", "gelu") and device.type == "cuda":
        notes.append(
            "torch.compile is compiled afresh for every shape and dtype (dynamic=False), with "
            "AOTAutograd's donated buffers off so that backward can be timed alone "
            "(retain_graph=True); that can cost it a little peak memory, not time."
        )
    if suite in ("layernorm", "gelu"):
        notes.append(
            "GB/s counts the bytes the op must move: forward reads x and writes y (2 tensors), "
            "backward reads x and dy and writes dx (3), forward+backward 5; % is of the "
            "measured copy bandwidth."
        )
    if suite == "layernorm":
        notes.append(
            "add_layernorm (the residual add fused with the LayerNorm after it) moves 4 "
            "tensors forward (x, residual in; normed, new residual out), 4 backward (dnormed, "
            "dnew_residual, new residual in; one gradient out), 8 forward+backward."
        )
    if suite == "attention":
        notes.append(
            "FLOPs: 4·B·H·T²·D forward, halved for causal, ×2.5 for backward, ×3.5 for "
            "forward+backward; % is of the measured dense matmul TFLOP/s."
        )
    if suite == "loss":
        notes.append(
            "Forward+backward of gpt2-small's head loss (d = 768, V = 50,257) into hidden and "
            "weight. fastgpt: kernels.fused_linear_cross_entropy (chunks of rows, the N × V "
            "logits never exist); baselines: F.cross_entropy((hidden @ weight.T).float(), "
            "targets) eager and compiled. Peak memory includes inputs and gradients; "
            "`peak % of eager` is the row's peak over torch eager's."
        )
        if device.type != "cuda":
            notes.append(
                "On CPU the fastgpt row is the same chunked algorithm with PyTorch math per "
                "chunk (chunked_linear_cross_entropy_torch, no Triton): its peak memory is the "
                "algorithm's, its time not the kernel's. CPU peak memory = the profiler's "
                "allocation records over one call (harness.cpu_peak_bytes) + the inputs' "
                "bytes; full shapes are timed with one repetition."
            )
    if suite == "train":
        notes.append(
            "MFU = tokens/s × (6·N + 12·L·T·d) / measured dense matmul FLOP/s "
            "(N non-embedding parameters, L layers, T sequence length, d width)."
        )
    if suite == "generate":
        notes.append(
            "tokens/s = batch × new tokens / wall time of the whole generate() call, prefill "
            "included; greedy decoding."
        )
    if suite == "hf":
        notes.append(
            "A training step of transformers' GPT2LMHeadModel (forward, cross-entropy, "
            "backward, AdamW) on the same preset and initial weights: fastgpt.patch_hf_gpt2 "
            "(our LayerNorm, bias+GELU and attention inside HF's modules) against HF's eager "
            "and SDPA attention. MFU as in the train suite."
        )
        if device.type != "cuda":
            notes.append(
                "On CPU the patched model runs our kernels' plain-PyTorch references (no "
                "Triton; the interpreter would time Python): its row measures the patch's "
                "plumbing, not the kernels."
            )
    return notes


def parse_dtypes(value: str | None) -> tuple[str, ...] | None:
    """Parse --dtypes: "bf16,fp16" -> ("bf16", "fp16"); None or "" -> None (the grids' own).
    Raises ValueError naming the unknown dtype."""
    if not value:
        return None
    names = tuple(v.strip().lower() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in harness.DTYPES]
    if unknown or not names:
        bad = ", ".join(repr(n) for n in unknown) or repr(value)
        raise ValueError(f"unknown dtype {bad}; choose from {', '.join(harness.DTYPES)}")
    return names


def run_benchmarks(
    only: list[str] | None = None,
    quick: bool = False,
    out_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    dtypes: tuple[str, ...] | None = None,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Run the chosen suites on `device` (default: CUDA if available, else CPU); return the
    written files by name ("<suite>.json", "<suite>.png", "summary.md").

    `dtypes` narrows the kernel suites' dtypes (e.g. ("bf16",)). Each suite's JSON is rewritten
    after every case (marked "partial": true until the suite ends), so a run stopped by a time
    limit keeps what it measured."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    suites = list(SUITES) if only is None else [s for s in SUITES if s in only]
    out = Path(out_dir) if out_dir is not None else default_out_dir(device)
    if device.type != "cuda":
        print_fn(cpu_notice())
    env = harness.environment(device)
    print_fn(
        f"device: {env['device_name']} | torch {env['torch_version']} | "
        f"triton {env['triton_version']} | "
        f"commit {harness.short_commit(env['git_commit'])} | {env['date_utc']}"
    )
    print_fn("measuring hardware limits (copy bandwidth, dense matmul) ...")
    hardware = harness.measure_hardware_limits(device, quick=quick)
    print_fn(
        f"copy bandwidth {hardware['copy_bandwidth_gbps']:.1f} GB/s (read + write), "
        f"{hardware['matmul_dtype']} matmul {hardware['matmul_tflops']:.3f} TFLOP/s "
        f"({'x'.join(map(str, hardware['matmul_shape']))})"
    )
    functions = suite_functions()
    written: dict[str, Path] = {}
    failed: list[str] = []  # "suite (reason)" of each suite that did not run
    for suite in suites:
        print_fn(f"\n== {suite} ==")
        notes = suite_notes(suite, device, quick)

        def checkpoint(records, suite=suite, notes=notes):
            records = report.add_ratios([dict(r) for r in records])
            report.write_suite_json(out, suite, records, env, hardware, notes, partial=True)

        options = harness.RunOptions(quick=quick, dtypes=dtypes, checkpoint=checkpoint)
        try:
            records = report.add_ratios(functions[suite](device, hardware, options))
        except harness.SuiteSkipped as exc:  # e.g. hf without transformers: nothing written
            print_fn(f"{suite}: skipped, {exc}")
            if only is not None:  # asked for by name
                failed.append(f"{suite} ({exc})")
            continue
        except harness.SuitesFailed as exc:
            print_fn(f"{suite}: failed, {exc}")
            failed.append(f"{suite} ({exc})")
            continue
        reason = import_failure(records)
        if reason is not None:
            failed.append(f"{suite} ({reason})")
        written[f"{suite}.json"] = report.write_suite_json(
            out, suite, records, env, hardware, notes
        )
        written.update(report.write_all(out, [suite]))  # its plot and summary.md, current now
        print_fn(report.markdown_table(suite, records))
        head = report.headline(records)
        if head:
            print_fn(
                f"ours vs best baseline: geomean {head['geomean']:.2f}× "
                f"(min {head['min']:.2f}×, max {head['max']:.2f}×, {head['cases']} cases)"
            )
    written.update(report.write_all(out, []))  # summary.md even when no suite ran
    print_fn(f"\nresults: {out}/ ({', '.join(sorted(p.name for p in written.values()))})")
    if failed:
        raise harness.SuitesFailed(f"suites that did not run: {'; '.join(failed)}")
    return written


def import_failure(records: list[dict]) -> str | None:
    """The import error that skipped every row of a suite (a suite that ran nothing because a
    module would not import is a failed run, not a result), or None when a row ran."""
    if any(r["status"] == "ok" for r in records):
        return None
    notes = (r.get("note") or "" for r in records)
    return next((n for n in notes if n.startswith(("ImportError", "ModuleNotFoundError"))), None)
