"""Results: the "vs best baseline" ratio, tables, JSON files, the markdown summary and plots.

A benchmark produces *records*, one per (case, provider), each a flat-ish dict:

    {"suite": "layernorm",                      # which benchmark
     "case": {"op": "layernorm", "mode": "fwd", "dtype": "bf16", "rows": 4096, "width": 768},
     "provider": "fastgpt", "role": "ours",      # or role "baseline"
     "status": "ok",                             # or "skipped" with the reason in "note"
     "note": None,
     "ms": 0.031, "gbps": 812.0, ...}            # the suite's metrics

Records with the same suite and case are compared: the fastest baseline that ran is the
reference, and every record gets

    vs_best_baseline = best baseline ms / this record's ms

so > 1 means faster than the fastest baseline (for throughputs it equals this tokens/s over
the best baseline's tokens/s). Each suite's records are written to `<out>/<suite>.json` with
the environment and the hardware limits measured in the same run; `summary.md` and one PNG per
suite are rebuilt from every `<suite>.json` found in the folder, so suites run separately
(`fastgpt bench --only ...`) end up in one summary.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from fastgpt.benchmarks.harness import short_commit

SUITE_ORDER = ("layernorm", "gelu", "attention", "loss", "train", "generate", "hf")

# Columns of each suite's table after the case columns: (header, record key, format).
_KERNEL_COLUMNS = [
    ("ms", "ms", "{:.4f}"),
    ("GB/s", "gbps", "{:.4g}"),
    ("% copy BW", "pct_copy_bw", "{:.1f}"),
    ("peak MiB", "peak_mem_mb", "{:.0f}"),
]
METRIC_COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "layernorm": _KERNEL_COLUMNS,
    "gelu": _KERNEL_COLUMNS,
    "attention": [
        ("ms", "ms", "{:.3f}"),
        ("TFLOP/s", "tflops", "{:.3g}"),  # significant figures: CPU rows are far below 1
        ("% matmul", "pct_matmul", "{:.1f}"),
        ("peak MiB", "peak_mem_mb", "{:.0f}"),
    ],
    "loss": [
        ("ms", "ms", "{:.1f}"),
        ("tokens/s", "tokens_per_s", "{:,.0f}"),
        ("peak MiB", "peak_mem_mb", "{:.0f}"),
        ("peak % of eager", "peak_pct_of_eager", "{:.1f}"),
    ],
    "train": [
        ("ms/step", "ms", "{:.1f}"),
        ("tokens/s", "tokens_per_s", "{:,.0f}"),
        ("MFU %", "mfu_pct", "{:.1f}"),
        ("peak MiB", "peak_mem_mb", "{:.0f}"),
    ],
    "generate": [
        ("ms", "ms", "{:.1f}"),
        ("tokens/s", "tokens_per_s", "{:,.1f}"),
        ("peak MiB", "peak_mem_mb", "{:.0f}"),
    ],
    "hf": [
        ("ms/step", "ms", "{:.1f}"),
        ("tokens/s", "tokens_per_s", "{:,.0f}"),
        ("MFU %", "mfu_pct", "{:.1f}"),
        ("peak MiB", "peak_mem_mb", "{:.0f}"),
    ],
}
RATIO_HEADER = "vs best baseline"


# --- ratios --------------------------------------------------------------------------------


def case_key(record: dict[str, Any]) -> tuple[str, str]:
    """Records with equal keys measure the same work and are compared with each other."""
    return record["suite"], json.dumps(record["case"], sort_keys=True)


def add_ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set `best_baseline` (provider name) and `vs_best_baseline` (best baseline ms / ms) on
    every record, in place; None where the case has no baseline that ran or the record itself
    did not run. Returns the records."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[case_key(r)].append(r)
    for group in groups.values():
        baselines = [
            r
            for r in group
            if r.get("role") == "baseline" and r.get("status") == "ok" and r.get("ms")
        ]
        best = min(baselines, key=lambda r: r["ms"]) if baselines else None
        for r in group:
            ok = best is not None and r.get("status") == "ok" and r.get("ms")
            r["best_baseline"] = best["provider"] if best is not None else None
            r["vs_best_baseline"] = best["ms"] / r["ms"] if ok else None
    return records


def geometric_mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def headline(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Geometric mean, min and max of `vs_best_baseline` over the cases where ours ran."""
    ratios = [
        r["vs_best_baseline"]
        for r in records
        if r.get("role") == "ours" and r.get("vs_best_baseline") is not None
    ]
    if not ratios:
        return None
    return {
        "cases": len(ratios),
        "geomean": geometric_mean(ratios),
        "min": min(ratios),
        "max": max(ratios),
    }


# --- tables --------------------------------------------------------------------------------


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return fmt.format(value)
    return str(value)


def case_columns(records: list[dict[str, Any]]) -> list[str]:
    """The case keys in first-seen order."""
    keys: list[str] = []
    for r in records:
        for k in r["case"]:
            if k not in keys:
                keys.append(k)
    return keys


def markdown_table(suite: str, records: list[dict[str, Any]]) -> str:
    """One markdown table: case columns, provider, the suite's metrics, the ratio column."""
    if not records:
        return "_no records_\n"
    # Rows of one case together (providers in their order), cases in first-seen order.
    first_seen: dict[tuple[str, str], int] = {}
    for r in records:
        first_seen.setdefault(case_key(r), len(first_seen))
    records = sorted(records, key=lambda r: first_seen[case_key(r)])
    cases = case_columns(records)
    metrics = METRIC_COLUMNS.get(suite, [("ms", "ms", "{:.4f}")])
    header = [*cases, "provider", *(h for h, _, _ in metrics), RATIO_HEADER]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        cells = [str(r["case"].get(k, "")) for k in cases]
        provider = r["provider"] + (" **(ours)**" if r.get("role") == "ours" else "")
        cells.append(provider)
        if r.get("status") != "ok":
            cells += ["–"] * len(metrics)
            cells.append(f"skipped: {r.get('note') or 'did not run'}")
        else:
            cells += [_fmt(r.get(key), fmt) for _, key, fmt in metrics]
            ratio = r.get("vs_best_baseline")
            cells.append("–" if ratio is None else f"{ratio:.2f}×")
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# --- files ---------------------------------------------------------------------------------


def write_suite_json(
    out_dir: Path,
    suite: str,
    records: list[dict[str, Any]],
    env: dict[str, Any],
    hardware: dict[str, Any],
    notes: list[str] | None = None,
    partial: bool = False,
) -> Path:
    """Write `<out_dir>/<suite>.json` (environment, hardware limits, records) and return it.
    `partial` marks a suite still running (or cut short)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{suite}.json"
    payload = {
        "suite": suite,
        "partial": partial,
        "env": env,
        "hardware": hardware,
        "notes": notes or [],
        "headline": headline(records),
        "records": records,
    }
    tmp = path.with_suffix(".json.tmp")  # never leave a half-written file behind
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def load_results(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Every `<suite>.json` in out_dir, keyed by suite, in SUITE_ORDER."""
    found = {}
    for suite in SUITE_ORDER:
        path = Path(out_dir) / f"{suite}.json"
        if path.is_file():
            found[suite] = json.loads(path.read_text())
    return found


def _hardware_line(hw: dict[str, Any]) -> str:
    return (
        f"copy {hw.get('copy_bandwidth_gbps', float('nan')):.0f} GB/s, "
        f"{hw.get('matmul_dtype', '?')} matmul {hw.get('matmul_tflops', float('nan')):.2f} TFLOP/s"
    )


# The unit shown for each suite in the headline table: (header, record key, format).
_HEADLINE_UNIT = {
    "layernorm": ("GB/s", "gbps", "{:.4g}"),
    "gelu": ("GB/s", "gbps", "{:.4g}"),
    "attention": ("TFLOP/s", "tflops", "{:.3g}"),  # the detail table's: CPU rows are << 1
    "loss": ("MiB peak", "peak_mem_mb", "{:.0f}"),
    "train": ("tokens/s", "tokens_per_s", "{:,.0f}"),
    "generate": ("tokens/s", "tokens_per_s", "{:,.1f}"),
    "hf": ("tokens/s", "tokens_per_s", "{:,.0f}"),
}


def _headline_records(suite: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cases a reader looks at first: for kernels forward+backward in bf16 (else the first
    dtype), at the largest row count for LayerNorm/GELU; every case for train, generate, hf."""
    ours = [r for r in records if r.get("role") == "ours" and r.get("status") == "ok"]
    if suite not in ("layernorm", "gelu", "attention") or not ours:
        return ours
    ours = [r for r in ours if r["case"].get("mode") == "fwd+bwd"]
    dtypes = [r["case"]["dtype"] for r in ours]
    if not dtypes:
        return []
    shown = "bf16" if "bf16" in dtypes else dtypes[0]
    ours = [r for r in ours if r["case"]["dtype"] == shown]
    if suite != "attention":
        biggest = max(r["case"]["rows"] for r in ours)
        ours = [r for r in ours if r["case"]["rows"] == biggest]
    return ours


def headline_table(results: dict[str, dict[str, Any]]) -> str:
    """One markdown table of our key cases against the best baseline of each, for the README:
    suite | case | ours | best baseline | its number | vs best baseline."""
    lines = [
        "| suite | case | ours | best baseline | baseline | vs best baseline |",
        "|---|---|---|---|---|---|",
    ]
    for suite, payload in results.items():
        records = payload["records"]
        by_case = defaultdict(list)
        for r in records:
            by_case[case_key(r)].append(r)
        header, key, fmt = _HEADLINE_UNIT.get(suite, ("ms", "ms", "{:.3f}"))
        for r in _headline_records(suite, records):
            best = next(
                (b for b in by_case[case_key(r)] if b["provider"] == r.get("best_baseline")), None
            )
            case = ", ".join(f"{k}={v}" for k, v in r["case"].items())
            ours = f"{r['provider']}: {_fmt(r.get(key), fmt)} {header}"
            theirs = "–" if best is None else f"{_fmt(best.get(key), fmt)} {header}"
            ratio = r.get("vs_best_baseline")
            lines.append(
                f"| {suite} | {case} | {ours} | {r.get('best_baseline') or '–'} | {theirs} | "
                f"{'–' if ratio is None else f'{ratio:.2f}×'} |"
            )
    return "\n".join(lines) + "\n"


def markdown_summary(results: dict[str, dict[str, Any]]) -> str:
    """The whole summary: environment, measured limits, headline ratios, every table."""
    if not results:
        return "# fastgpt bench\n\nNo results.\n"
    latest = max(results.values(), key=lambda p: p["env"].get("date_utc", ""))
    env = latest["env"]
    out = [f"# fastgpt bench: {env.get('device_name')}", ""]
    out.append(
        f"torch {env.get('torch_version')}, triton {env.get('triton_version')}, "
        f"CUDA {env.get('cuda_version')}, Python {env.get('python_version')}"
    )
    if env.get("spec_sheet_reference"):
        spec = env["spec_sheet_reference"]
        bandwidth = f", {spec['hbm_gbps']} GB/s" if spec.get("hbm_gbps") else ""
        out.append(
            f"Spec-sheet reference ({spec['board']}, not used in any ratio): "
            f"{spec['bf16_tflops']} bf16 TFLOP/s dense{bandwidth}."
        )
    out += [
        "",
        f"`{RATIO_HEADER}` = the fastest baseline's time / this row's time, measured in the "
        "same run (> 1: faster than every baseline). Percentages are of limits measured in "
        "the same run: device-to-device copy bandwidth (bytes read + written) and dense matmul "
        "throughput.",
        "",
        "| suite | date (UTC) | git commit | measured limits | ours vs best baseline "
        "(geomean, min–max) |",
        "|---|---|---|---|---|",
    ]
    for suite, payload in results.items():
        head = payload.get("headline")
        ratio = (
            f"{head['geomean']:.2f}× ({head['min']:.2f}–{head['max']:.2f}, {head['cases']} cases)"
            if head
            else "–"
        )
        e = payload["env"]
        out.append(
            f"| {suite} | {e.get('date_utc')} | {short_commit(str(e.get('git_commit')))} | "
            f"{_hardware_line(payload['hardware'])} | {ratio} |"
        )
    out += ["", "## Headline", "", headline_table(results)]
    for suite, payload in results.items():
        out += ["", f"## {suite}", ""]
        if payload.get("partial"):
            out += ["**Partial results: this suite did not finish.**", ""]
        for note in payload.get("notes", []):
            out.append(f"- {note}")
        if payload.get("notes"):
            out.append("")
        if (Path(payload.get("_dir", ".")) / f"{suite}.png").is_file():
            out += [f"![{suite}]({suite}.png)", ""]
        out.append(markdown_table(suite, payload["records"]))
    return "\n".join(out) + "\n"


def write_summary(out_dir: Path) -> Path:
    """Rebuild `<out_dir>/summary.md` from every suite JSON in the folder."""
    results = load_results(out_dir)
    for payload in results.values():
        payload["_dir"] = str(out_dir)
    path = Path(out_dir) / "summary.md"
    path.write_text(markdown_summary(results))
    return path


# --- plots ---------------------------------------------------------------------------------


def _ok(records):
    return [r for r in records if r.get("status") == "ok"]


def _line_panels(ax_grid, panels, x_key, y_key, x_label, y_label, limit, limit_label):
    for ax, (title, rows) in zip(ax_grid, panels, strict=False):
        by_provider: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            by_provider[r["provider"]].append((r["case"][x_key], r[y_key]))
        for provider, points in by_provider.items():
            points.sort()
            ours = any(r["role"] == "ours" for r in rows if r["provider"] == provider)
            style = "-o" if ours else "--."
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=provider)
        if limit:
            ax.axhline(limit, color="gray", linestyle=":", label=limit_label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)


def plot_suite(suite: str, payload: dict[str, Any], out_dir: Path) -> Path | None:
    """Draw `<out_dir>/<suite>.png` from a suite's results; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _ok(payload["records"])
    if not records:
        return None
    hw = payload["hardware"]
    device = payload["env"].get("device_name", "")
    if suite in ("layernorm", "gelu", "attention"):
        if suite == "attention":
            # One dtype (bf16 when present): rows of panels are head shapes, columns modes; the
            # packed documents (case "layout": varlen) are panels of their own, not one more
            # point on the sequence-length lines of the dense batches.
            dtypes = sorted({r["case"]["dtype"] for r in records})
            shown = "bf16" if "bf16" in dtypes else dtypes[0]
            records = [r for r in records if r["case"]["dtype"] == shown]
            x_key, y_key, x_label, y_label = "seq_len", "tflops", "sequence length", "TFLOP/s"
            limit, limit_label = hw.get("matmul_tflops"), "measured matmul"
            panel_keys = ("layout", "dtype", "heads", "head_dim", "mode")
        else:
            x_key, y_key, x_label, y_label = "width", "gbps", "width", "GB/s"
            limit, limit_label = hw.get("copy_bandwidth_gbps"), "measured copy"
            # At the largest row count of each panel only, so lines do not overlap.
            biggest = max(r["case"]["rows"] for r in records)
            records = [r for r in records if r["case"]["rows"] == biggest]
            panel_keys = ("op", "dtype", "mode")
        panels: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            title = ", ".join(f"{k}={r['case'][k]}" for k in panel_keys if k in r["case"])
            panels[title].append(r)
        n = len(panels)
        cols = 3 if n >= 3 else n
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
        _line_panels(
            axes.flat, list(panels.items()), x_key, y_key, x_label, y_label, limit, limit_label
        )
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
    else:  # train, generate, hf: grouped bars of tokens/s
        groups: dict[str, dict[str, float]] = defaultdict(dict)
        providers: list[str] = []
        for r in records:
            label = "\n".join(f"{k}={v}" for k, v in r["case"].items())
            groups[label][r["provider"]] = r["tokens_per_s"]
            if r["provider"] not in providers:
                providers.append(r["provider"])
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(providers)) / 2), 4))
        width = 0.8 / max(1, len(providers))
        for i, provider in enumerate(providers):
            xs = [g + i * width for g in range(len(groups))]
            ys = [groups[label].get(provider, 0.0) for label in groups]
            ax.bar(xs, ys, width, label=provider)
        ax.set_xticks([g + width * (len(providers) - 1) / 2 for g in range(len(groups))])
        ax.set_xticklabels(list(groups), fontsize=7)
        ax.set_ylabel("tokens/s (log scale)")
        ax.set_yscale("log")  # gpt2-small's bars next to tiny's stay visible
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"fastgpt bench: {suite} on {device}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # leave the top strip to the title
    path = Path(out_dir) / f"{suite}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(out_dir: Path, suites: Collection[str] | None = None) -> dict[str, Path]:
    """Plot the suites found in out_dir (only those in `suites` when given: a run replots the
    suite it just finished, not every earlier one again) and rebuild summary.md, which covers
    them all. Returns the written paths."""
    written: dict[str, Path] = {}
    for suite, payload in load_results(out_dir).items():
        if suites is not None and suite not in suites:
            continue
        png = plot_suite(suite, payload, out_dir)
        if png is not None:
            written[f"{suite}.png"] = png
    written["summary.md"] = write_summary(out_dir)
    return written
