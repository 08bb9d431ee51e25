"""The compile sweep's plan: every specialization each op's launchers can choose, as cases.

A `Case` is one call of an op's launcher (forward or backward) with CPU tensors of a realistic
shape and layout; under `stub_driver.compiling_for` the call compiles the kernels it would
launch. Each op contributes a function `cases(options) -> iterator of Case`, listed in `OPS`:
adding an op to the sweep (say kernels/cross_entropy.py) is one entry there and its function.

Widths of LayerNorm and bias-GELU are covered by class: each kernel config its launcher's own
config function (`_tile`, `_bias_gelu_tile`) can return, with and without a width divisible by
16 (which changes how Triton vectorizes the row), taking the GPT-2 widths first.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}
# Model widths (GPT-2 small..xl: emb_dim and 4·emb_dim, the vocabulary), then one width per
# power-of-two class, then odd ones (not divisible by 16).
WIDTHS = (768, 1024, 1280, 1600, 3072, 4096, 5120, 6400, 50257)
WIDTHS += (*(2**k for k in range(4, 15)), 97, 1023, 16385)
ROWS = 4096  # M of the training shapes (batch 4 × context 1024); M = 1 is decoding
ATTENTION_SHAPE = (2, 4, 1024)  # B, H, T: the tiles and specializations do not depend on them
DECODE_KEYS = 1001  # Tk of one cached decoding step (Tq = 1), of a 1024-token cache

# CI's representative subset (`--subset ci`): every kernel at head dims 64 and 128 (BLOCK_D 64
# and 128, the two tile families) and at widths 768 and 50257 (one tile, and the looping path),
# each in its heaviest variant only: attention causal with dropout (the most registers), the
# training rows (M = ROWS, not decoding's M = 1), the gradient of the cross-entropy.
CI_HEAD_DIMS = (64, 128)
CI_WIDTHS = (768, 50257)


@dataclass(frozen=True)
class SweepOptions:
    """Which cases to plan. Empty tuples mean "all"; `subset="ci"` narrows to CI's subset."""

    ops: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()
    head_dims: tuple[int, ...] = ()
    widths: tuple[int, ...] = ()
    passes: tuple[str, ...] = ()  # "forward", "backward", "decode", "mask"
    subset: str = "full"  # "full" or "ci"

    def pick_dtypes(self) -> list[str]:
        return [d for d in DTYPES if not self.dtypes or d in self.dtypes]

    def pick_head_dims(self, supported: tuple[int, ...]) -> list[int]:
        dims = CI_HEAD_DIMS if self.subset == "ci" else supported
        return [d for d in dims if not self.head_dims or d in self.head_dims]

    def pick_widths(self) -> list[int]:
        widths = CI_WIDTHS if self.subset == "ci" else WIDTHS
        return [w for w in widths if not self.widths or w in self.widths]

    def wants(self, pass_name: str) -> bool:
        if self.subset == "ci" and pass_name in ("decode", "mask"):
            return False
        return not self.passes or pass_name in self.passes

    def variants(self, full: list, ci: list) -> list:
        """The variants (causal/dropout, rows, ...) to compile: all, or CI's heaviest."""
        return ci if self.subset == "ci" else full

    def attention_grid(self, supported: tuple[int, ...]) -> Iterator[tuple[str, int, list]]:
        """(dtype name, head dim, [(causal, dropout, params), ...]) for every dtype × head dim
        picked, the variants being all four causal × dropout, or CI's (causal, dropout)."""
        variants = [(c, p) for c in (True, False) for p in (False, True)]
        for dname in self.pick_dtypes():
            for d in self.pick_head_dims(supported):
                yield (
                    dname,
                    d,
                    [
                        (c, p, {"dtype": dname, "D": d, "causal": c, "dropout": p})
                        for c, p in self.variants(variants, [(True, True)])
                    ],
                )


@dataclass
class Case:
    """One launcher call to compile: `launch()` with `params` describing it in the report."""

    op: str
    pass_name: str
    params: dict[str, Any]
    launch: Callable[[], object] = field(repr=False)

    @property
    def label(self) -> str:
        """ "dtype=fp16 D=64 causal": flags by name when true, left out when false."""
        shown = [(k, v) for k, v in self.params.items() if v is not False]
        return " ".join(k if v is True else f"{k}={v}" for k, v in shown)


def _gpu_path(module) -> None:
    """Make the launchers of `module` take their GPU path for CPU tensors (they would fall back
    to PyTorch on CPU), for the rest of the process: the sweep only compiles, so nothing
    touches the tensors' data, and it runs in a process of its own (the CLI, a worker)."""
    module.use_triton = lambda device: True


# --- attention ---------------------------------------------------------------------------


def _decode_case(A, dname: str, d: int) -> Case:
    """The model's decoding step: q a view of a (B, 1, 3, H, D) projection, k/v the filled
    part of the KV cache's (B, H, capacity, D) buffers."""
    batch, heads, t = ATTENTION_SHAPE
    dt = DTYPES[dname]

    def decode():
        q = torch.empty(batch, 1, 3, heads, d, dtype=dt).permute(2, 0, 3, 1, 4)[0]
        cache = torch.empty(2, batch, heads, t, d, dtype=dt)[:, :, :, :DECODE_KEYS]
        A._flash_attention_forward(q, cache[0], cache[1], True, d**-0.5, 0.0, None)

    return Case("attention", "decode", {"dtype": dname, "D": d, "Tq": 1, "causal": True}, decode)


def attention_cases(options: SweepOptions) -> Iterator[Case]:
    """Forward and backward for every dtype × head dim × causal × dropout, the model's layout
    (q/k/v strided views of one (B, T, 3, H, D) projection, dout a transposed (B, T, H, D)); a
    decoding step (Tq = 1 against a contiguous cache); the dropout-mask kernel."""
    A = importlib.import_module("fastgpt.kernels.flash_attention")
    _gpu_path(A)
    batch, heads, t = ATTENTION_SHAPE
    for dname, d, variants in options.attention_grid(A.SUPPORTED_HEAD_DIMS):
        dtype = DTYPES[dname]
        for causal, dropout, params in variants:

            def tensors(d=d, dtype=dtype):
                qkv = torch.empty(batch, t, 3, heads, d, dtype=dtype)
                q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) views
                return q, k, v

            def seed(dropout=dropout):
                return A.seed_tensor(1234, "cpu") if dropout else None

            p = 0.1 if dropout else 0.0
            if options.wants("forward"):
                yield Case(
                    "attention",
                    "forward",
                    params,
                    lambda c=causal, d=d, p=p, tensors=tensors, seed=seed: (
                        A._flash_attention_forward(*tensors(), c, d**-0.5, p, seed())
                    ),
                )
            if options.wants("backward"):

                def backward(c=causal, d=d, p=p, tensors=tensors, seed=seed, dt=dtype):
                    q, k, v = tensors()
                    out = torch.empty(batch, heads, t, d, dtype=dt)
                    lse = torch.empty(batch, heads, t, dtype=torch.float32)
                    dout = torch.empty(batch, t, heads, d, dtype=dt).transpose(1, 2)
                    A._flash_attention_backward(dout, q, k, v, out, lse, c, d**-0.5, p, seed())

                yield Case("attention", "backward", params, backward)
        if options.wants("decode"):
            yield _decode_case(A, dname, d)
    if any(d in ("fp16", "bf16") for d in options.pick_dtypes()):
        yield from tutorial_cases(options, options.variants([True, False], [True]))
    if options.wants("mask"):
        yield Case(
            "attention",
            "mask",
            {"what": "dropout mask"},
            lambda: A.attention_dropout_mask(1234, batch, heads, t, t, 0.1, "cpu"),
        )


# --- Triton's tutorial attention, the reference of the cycle model --------------------------

TUTORIAL_PASS = "tutorial"  # the pass name of the tutorial's records: a reference, never judged
TUTORIAL_FILE = "06-fused-attention.py"
TUTORIAL_URL = (
    "https://raw.githubusercontent.com/triton-lang/triton/dc6ee3ed2cf9b2b436544d6153351f9bc679cc61"
    "/python/tutorials/06-fused-attention.py"
)
# Its forward at its largest tile for 4 warps (its own candidates: BLOCK_N <= 64 without TMA,
# and 8 warps only from 128 x 128 up), 3 stages, one (B, H, T, D) contiguous fp16 tensor each.
TUTORIAL_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def tutorial_path() -> Path:
    """Where the compile check looks for Triton's tutorial 06-fused-attention.py (the revision of
    TUTORIAL_URL; MIT-licensed, not part of this repository): FASTGPT_TRITON_TUTORIAL, else
    <FASTGPT_CACHE_DIR>/triton/06-fused-attention.py."""
    import os

    from fastgpt.download import cache_dir

    given = os.environ.get("FASTGPT_TRITON_TUTORIAL")
    return Path(given) if given else cache_dir() / "triton" / TUTORIAL_FILE


def _tutorial_forward(path: Path):
    """The tutorial's forward kernel (`_attn_fwd` and the `_attn_fwd_inner` it calls), taken out
    of its file (whose module code needs a GPU) into a module of their own beside it, under
    @triton.jit only (its autotuner would time candidates on a GPU)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    keep = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in ("_attn_fwd_inner", "_attn_fwd"):
            node.decorator_list = [ast.parse("triton.jit", mode="eval").body]
            keep.append(ast.unparse(node))
    if len(keep) != 2:
        raise ValueError(
            f"{path}: no _attn_fwd_inner/_attn_fwd (not the revision of {TUTORIAL_URL})"
        )
    module_file = path.with_name("tutorial_attention_forward.py")
    text = "import triton\nimport triton.language as tl\n\n\n" + "\n\n\n".join(keep) + "\n"
    if not module_file.exists() or module_file.read_text(encoding="utf-8") != text:
        module_file.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("fastgpt_tutorial_attention", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._attn_fwd


def _tutorial_launch(kernel, d: int, causal: bool) -> None:
    """Launch the tutorial's forward on ATTENTION_SHAPE fp16 tensors, each argument by its name
    in the tutorial (Q, K, V, Out, stride_q*, ..., STAGE)."""
    batch, heads, t = ATTENTION_SHAPE
    q, k, v, out = torch.empty(4, batch, heads, t, d, dtype=torch.float16).unbind(0)
    lse = torch.empty(batch, heads, t, dtype=torch.float32)
    given = {"Q": q, "K": k, "V": v, "Out": out, "M": lse, "sm_scale": d**-0.5}
    given |= {"Z": batch, "H": heads, "N_CTX": t, "HEAD_DIM": d, "STAGE": 3 if causal else 1}
    config = dict(TUTORIAL_CONFIG)
    given |= {"BLOCK_M": config.pop("BLOCK_M"), "BLOCK_N": config.pop("BLOCK_N")}
    strides = {name: iter(x.stride()) for name, x in (("q", q), ("k", k), ("v", v), ("o", out))}
    names = list(inspect.signature(kernel.fn).parameters)
    # By keyword, so that the record's config shows BLOCK_M and BLOCK_N (the ratio's tile).
    args = {
        name: next(strides[name[len("stride_")]]) if name.startswith("stride_") else given[name]
        for name in names
    }
    grid = (-(-t // given["BLOCK_M"]), batch * heads)  # (query tiles, B * H)
    kernel[grid](**args, **config)


def tutorial_cases(options: SweepOptions, causals: list[bool]) -> Iterator[Case]:
    """Triton's tutorial forward, fp16, at each head dim picked and each causal variant, when
    its file is at `tutorial_path()` (else none: the reports then show no ratio to it)."""
    path = tutorial_path()
    if not path.exists() or not options.wants("forward"):
        return
    kernel = _tutorial_forward(path)
    for d in options.pick_head_dims((64, 128)):
        for causal in causals:
            params = {"dtype": "fp16", "D": d, "causal": causal}
            launch = lambda d=d, c=causal: _tutorial_launch(kernel, d, c)
            yield Case("attention", TUTORIAL_PASS, params, launch)


# --- attention_varlen --------------------------------------------------------------------


def attention_varlen_cases(options: SweepOptions) -> Iterator[Case]:
    """attention_varlen's forward and backward for every dtype × head dim × causal × dropout:
    ATTENTION_SHAPE's B·T tokens packed as B sequences, q/k/v strided views of one
    (total, 3, H, D) projection, dout contiguous; its dropout-mask kernel."""
    V = importlib.import_module("fastgpt.kernels.flash_attention_varlen")
    _gpu_path(V)
    batch, heads, t = ATTENTION_SHAPE
    total = batch * t
    cu = torch.arange(0, total + 1, t, dtype=torch.int32)  # (B + 1,) prefix sums
    for dname, d, variants in options.attention_grid(V.SUPPORTED_HEAD_DIMS):
        dtype = DTYPES[dname]
        for causal, dropout, params in variants:
            seed = V.seed_tensor(1234, "cpu") if dropout else None
            rest = (cu, cu, t, t, causal, d**-0.5, 0.1 if dropout else 0.0, seed)

            def qkv(d=d, dtype=dtype):
                return torch.empty(total, 3, heads, d, dtype=dtype).unbind(1)  # (total, H, D)

            def forward(qkv=qkv, rest=rest):
                V._flash_attention_varlen_forward(*qkv(), *rest)

            def backward(qkv=qkv, rest=rest, d=d, dt=dtype):
                out, dout = torch.empty(2, total, heads, d, dtype=dt).unbind(0)
                lse = torch.empty(heads, total, dtype=torch.float32)
                V._flash_attention_varlen_backward(dout, *qkv(), out, lse, *rest)

            for pass_name, launch in (("forward", forward), ("backward", backward)):
                if options.wants(pass_name):
                    yield Case("attention_varlen", pass_name, params, launch)
    if options.wants("mask"):
        mask = lambda: V.attention_varlen_dropout_mask(1234, cu, cu, heads, 0.1)
        yield Case("attention_varlen", "mask", {"what": "dropout mask"}, mask)


# --- LayerNorm ---------------------------------------------------------------------------


def _width_classes(widths: list[int], config: Callable[[int, int], object], rows: int):
    """The widths of `widths` that reach a new (config, divisible by 16) class at `rows` rows."""
    seen = set()
    for n in widths:
        key = (config(rows, n), n % 16 == 0)
        if key not in seen:
            seen.add(key)
            yield n


def layer_norm_cases(options: SweepOptions) -> Iterator[Case]:
    """Forward and backward at every width class, for training rows (M = ROWS) and decoding
    (M = 1), rows contiguous."""
    L = importlib.import_module("fastgpt.kernels.normalization")
    _gpu_path(L)
    for dt, m, n, params in _row_shapes(options, L._tile):

        def forward(m=m, n=n, dt=dt):
            x, w, b = (
                torch.empty(m, n, dtype=dt),
                torch.empty(n, dtype=dt),
                torch.empty(n, dtype=dt),
            )
            L.layer_norm_forward(x, w, b, 1e-5)

        def backward(m=m, n=n, dt=dt):
            x, w = torch.empty(m, n, dtype=dt), torch.empty(n, dtype=dt)
            mean = torch.empty(m, dtype=torch.float32)
            L.layer_norm_backward(torch.empty_like(x), x, w, mean, torch.empty_like(mean))

        if options.wants("forward"):
            yield Case("layer_norm", "forward", params, forward)
        if options.wants("backward"):
            yield Case("layer_norm", "backward", params, backward)


def add_layer_norm_cases(options: SweepOptions) -> Iterator[Case]:
    """The fused residual add + LayerNorm: LayerNorm's kernels with their residual flags on
    (HAS_RESIDUAL, HAS_DRESIDUAL), at every width class of LayerNorm's `_tile` (each of its
    tuning candidates, as `layer_norm_cases`), training rows and decoding, rows contiguous; x
    and the residual in one dtype (the heaviest mix: 16-bit loads of both), and (the full
    sweep's forward) a 16-bit x into an fp32 residual stream, the model's add under autocast
    (its backward is all fp32: the fp32 case's)."""
    L = importlib.import_module("fastgpt.kernels.normalization")
    _gpu_path(L)
    for dt, m, n, params in _row_shapes(options, L._tile):
        rows = lambda m=m, n=n, dt=dt: torch.empty(m, n, dtype=dt)  # (M, N)
        vector = lambda n=n, dt=dt: torch.empty(n, dtype=dt)  # (N,)

        def forward(rows=rows, vector=vector):
            L.layer_norm_forward(rows(), vector(), vector(), 1e-5, residual=rows())

        def backward(rows=rows, vector=vector, m=m):
            stats = torch.empty(m, dtype=torch.float32)
            L.layer_norm_backward(rows(), rows(), vector(), stats, stats.clone(), dresidual=rows())

        for pass_name, launch in (("forward", forward), ("backward", backward)):
            if options.wants(pass_name):
                yield Case("add_layer_norm", pass_name, params, launch)
        if dt != torch.float32 and options.subset != "ci" and options.wants("forward"):

            def mixed(m=m, n=n, dt=dt):
                stream = torch.empty(m, n, dtype=torch.float32)
                w = torch.empty(n, dtype=torch.float32)
                L.layer_norm_forward(torch.empty(m, n, dtype=dt), w, w, 1e-5, residual=stream)

            yield Case("add_layer_norm", "forward", {**params, "residual": "fp32"}, mixed)


def _row_shapes(options: SweepOptions, tile) -> Iterator[tuple[torch.dtype, int, int, dict]]:
    """(dtype, M, N, params) of a row-wise kernel: each dtype, training rows (M = ROWS) and
    decoding (M = 1), one width per class of its `tile`."""
    for dname in options.pick_dtypes():
        for m in options.variants([ROWS, 1], [ROWS]):
            for n in _width_classes(options.pick_widths(), tile, m):
                yield DTYPES[dname], m, n, {"dtype": dname, "N": n, "M": m}


# --- GELU and bias-GELU ------------------------------------------------------------------


def gelu_cases(options: SweepOptions) -> Iterator[Case]:
    """The flat elementwise kernels: one config, numel divisible by 16 or not."""
    G = importlib.import_module("fastgpt.kernels.activation")
    _gpu_path(G)
    for dname in options.pick_dtypes():
        dtype = DTYPES[dname]
        for numel in options.variants([ROWS * 3072, ROWS * 3072 + 1], [ROWS * 3072]):
            params = {"dtype": dname, "numel": numel}
            x = lambda numel=numel, dt=dtype: torch.empty(numel, dtype=dt)
            if options.wants("forward"):
                yield Case("gelu", "forward", params, lambda x=x: G._gelu_forward(x()))
            if options.wants("backward"):
                yield Case("gelu", "backward", params, lambda x=x: G._gelu_backward(x(), x()))


def bias_gelu_cases(options: SweepOptions) -> Iterator[Case]:
    """bias_gelu forward and backward at every width class of `_bias_gelu_tile`."""
    G = importlib.import_module("fastgpt.kernels.activation")
    _gpu_path(G)
    for dt, m, n, params in _row_shapes(options, G._bias_gelu_tile):
        x = lambda m=m, n=n, dt=dt: torch.empty(m, n, dtype=dt)
        bias = lambda n=n, dt=dt: torch.empty(n, dtype=dt)
        if options.wants("forward"):
            yield Case(
                "bias_gelu", "forward", params, lambda x=x, b=bias: G._bias_gelu_forward(x(), b())
            )
        if options.wants("backward"):
            yield Case(
                "bias_gelu",
                "backward",
                params,
                lambda x=x, b=bias: G._bias_gelu_backward(x(), x(), b()),
            )


# --- fused linear cross-entropy ----------------------------------------------------------


def cross_entropy_cases(options: SweepOptions) -> Iterator[Case]:
    """The per-chunk loss/gradient kernel at every vocabulary-width class of its `_tile`, with
    and without the gradient, one scale for all rows ("mean"/"sum") or one per row ("none").
    The matmuls around it are cuBLAS's, not ours."""
    C = importlib.import_module("fastgpt.kernels.cross_entropy")
    _gpu_path(C)
    rows = 1024  # a chunk of GPT-2's (N = B·T) rows
    for dname in options.pick_dtypes():
        dtype = DTYPES[dname]
        for v in _width_classes(options.pick_widths(), C._tile, rows):
            variants = [(True, False), (False, False), (True, True)]
            for grad, per_row in options.variants(variants, [(True, False)]):
                params = {"dtype": dname, "V": v, "grad": grad, "per_row_scale": per_row}

                def launch(v=v, dt=dtype, grad=grad, per_row=per_row):
                    z = torch.empty(rows, v, dtype=dt)
                    targets = torch.empty(rows, dtype=torch.int64)
                    scale = torch.empty(rows if per_row else 1, dtype=torch.float32)
                    loss = torch.empty(rows, dtype=torch.float32)
                    C._cross_entropy_chunk(z, targets, scale, loss, -100, grad, True)

                if options.wants("forward"):
                    yield Case("cross_entropy", "forward", params, launch)


# --- split-KV decode attention ------------------------------------------------------------


def decode_attention_cases(options: SweepOptions) -> Iterator[Case]:
    """The split and reduce kernels of one decoding step for every dtype × head dim: q a view
    of a (B, 1, 3, H, D) projection, k/v the static cache's (B, H, 1024, D) buffers (4 splits
    of 256 keys), per-row int32 lengths. Its only pass is the forward ("forward", so CI runs
    it too)."""
    DA = importlib.import_module("fastgpt.kernels.flash_decoding")
    A = importlib.import_module("fastgpt.kernels.flash_attention")
    _gpu_path(DA)
    batch, heads, capacity = ATTENTION_SHAPE
    for dname in options.pick_dtypes():
        for d in options.pick_head_dims(A.SUPPORTED_HEAD_DIMS):

            def launch(dt=DTYPES[dname], d=d):
                q = torch.empty(batch, 3, heads, d, dtype=dt).permute(1, 0, 2, 3)[0]
                cache = torch.empty(2, batch, heads, capacity, d, dtype=dt)
                lengths = torch.empty(batch, dtype=torch.int32)
                DA._decode_attention_op(q, cache[0], cache[1], lengths, d**-0.5, 0)

            if options.wants("forward"):
                params = {"dtype": dname, "D": d, "capacity": capacity}
                yield Case("decode_attention", "forward", params, launch)


# op name -> its cases. One entry per op in kernels/.
OPS: dict[str, Callable[[SweepOptions], Iterator[Case]]] = {
    "attention": attention_cases,
    "attention_varlen": attention_varlen_cases,
    "layer_norm": layer_norm_cases,
    "add_layer_norm": add_layer_norm_cases,
    "gelu": gelu_cases,
    "bias_gelu": bias_gelu_cases,
    "cross_entropy": cross_entropy_cases,
    "decode_attention": decode_attention_cases,
}
