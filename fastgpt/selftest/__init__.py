"""`fastgpt selftest`: prove the GPU path, with or without a GPU.

Two halves, each usable from Python and from `fastgpt selftest`:

- `compile_check`: compile every kernel specialization the launchers in `kernels/` can choose
  for an NVIDIA arch (sm_75 to sm_120; CI: sm_90, sm_80, sm_86, sm_75) on a CPU-only machine,
  through a stub Triton driver (`stub_driver`), judge registers, spills, shared memory,
  tensor-core use and SASS instructions per main-loop iteration (`analysis`) against the
  committed budget (benchmarks/results/compile/budget.json), and bound each main loop's cycles
  by a throughput model (`analysis.loop_bound`). The sweep itself, op by op, is `sweep`.
- `gpu_check`: run every op against its reference at GPU sizes, the model ("auto") against
  the torch backend, `torch.compile`, a short bf16 training run and cached generation, and
  tabulate pass/fail; a GPU below sm_80 runs what it can and is told what it cannot. On CPU
  the same checks run through Triton's interpreter at small sizes (the tests do that).

`tolerance` holds the numerical rule every kernel comparison uses (tests/tolerance.py imports
it). Nothing here is imported by `import fastgpt`.
"""
