"""Which of the sweep's cases (`sweep.OPS`) each arch compiles, and the notes saying what it
leaves out: the plan the compile check runs per `--arch`."""

from __future__ import annotations

from dataclasses import replace

from fastgpt.selftest.sweep import OPS, Case, SweepOptions

# The ops whose kernels loop over tl.dot: below sm_80 Triton lowers those dots to FFMA (no
# tensor cores), and the ops refuse such a GPU at call time (`kernels._dispatch.check_gpu`), as
# every op refuses bf16 there, so the sweep compiles neither for it. CI's subset compiles them
# in fp16 only on archs other than CI_ALL_DTYPES_ARCH (bf16 takes the same tiles; the full
# sweep compiles every dtype everywhere), keeping CI's time with four archs.
TENSOR_CORE_OPS = ("attention", "attention_varlen", "decode_attention")
CI_ALL_DTYPES_ARCH = 90
CI_OTHER_ARCH_DTYPES = ("fp16",)


def _below_tensor_cores(arch: int) -> bool:
    """Whether sm_`arch` is below the kernels' TENSOR_CORE_CAPABILITY (sm_80)."""
    from fastgpt.kernels._dispatch import TENSOR_CORE_CAPABILITY

    major, minor = TENSOR_CORE_CAPABILITY
    return arch < 10 * major + minor


def _picked_ops(options: SweepOptions) -> list[str]:
    unknown = [op for op in options.ops if op not in OPS]
    if unknown:
        raise ValueError(f"unknown op {unknown[0]!r}; ops: {', '.join(OPS)}")
    return [op for op in OPS if not options.ops or op in options.ops]


def _for_arch(options: SweepOptions, op: str, arch: int | None) -> SweepOptions | None:
    """`options` as sm_`arch` compiles `op` (see TENSOR_CORE_OPS); None: not at all. No arch:
    `options` unchanged."""
    if arch is None:
        return options
    dtypes = options.pick_dtypes()
    if _below_tensor_cores(arch):
        if op in TENSOR_CORE_OPS:
            return None
        dtypes = [d for d in dtypes if d != "bf16"]
    elif op in TENSOR_CORE_OPS and options.subset == "ci" and arch != CI_ALL_DTYPES_ARCH:
        dtypes = [d for d in dtypes if d in CI_OTHER_ARCH_DTYPES]
    return replace(options, dtypes=tuple(dtypes)) if dtypes else None


def arch_notes(options: SweepOptions, arch: int) -> list[str]:
    """What the sweep leaves out on sm_`arch` of what `options` pick, and why, one note each."""
    picked = _picked_ops(options)
    notes = []
    if _below_tensor_cores(arch):
        if skipped := [op for op in picked if op in TENSOR_CORE_OPS]:
            notes.append(
                f"not compiled: {', '.join(skipped)} (below sm_80 Triton lowers tl.dot to FFMA, "
                "not tensor cores, and these ops refuse such a GPU: PyTorch's attention runs)"
            )
        if "bf16" in options.pick_dtypes():
            notes.append("not compiled: bf16 (the GPU has none; every op refuses it)")
    elif options.subset == "ci" and arch != CI_ALL_DTYPES_ARCH:
        dropped = [d for d in options.pick_dtypes() if d not in CI_OTHER_ARCH_DTYPES]
        ops = [op for op in picked if op in TENSOR_CORE_OPS]
        if dropped and ops:
            notes.append(
                f"CI subset: {', '.join(ops)} in {', '.join(CI_OTHER_ARCH_DTYPES)} only (not "
                f"{', '.join(dropped)}: the full sweep compiles them)"
            )
    return notes


def plan(options: SweepOptions, arch: int | None = None) -> list[Case]:
    """Every case of the chosen ops, in a fixed order, as sm_`arch` compiles them (`_for_arch`,
    `arch_notes`). Raises ValueError for an unknown op."""
    cases = []
    for op in _picked_ops(options):
        narrowed = _for_arch(options, op, arch)
        if narrowed is not None:
            cases.extend(OPS[op](narrowed))
    return cases
