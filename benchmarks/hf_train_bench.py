"""The "hf" suite: a Hugging Face GPT2LMHeadModel training step, eager vs our kernels inside it.

Training step = forward, cross-entropy, backward, AdamW step, zero_grad on random token ids of
shape (B, T), as in the train suite (`train_bench.make_train_step`): B = 8, T = 1024 for
gpt2-small on GPU in bf16 autocast (fp32 master weights); a tiny config on CPU in fp32 (and,
outside --quick, gpt2-small at 2 × 128). The models are transformers' `GPT2LMHeadModel` built
from the same fastgpt preset (`fastgpt.hf_format.hf_config`, its dropout included) with the
same initial weights (seed 0). Providers:

- "HF + fastgpt.patch_hf_gpt2" (ours): the model after `fastgpt.hf_patch.patch_hf_gpt2`, our
  LayerNorm, bias+GELU and flash attention inside HF's modules;
- "HF eager": transformers' eager attention (the implementation the patch replaces);
- "HF SDPA": transformers' default attention, `torch.nn.functional.scaled_dot_product_attention`.

Every provider uses the same optimizer (AdamW, fused on CUDA). Reported: ms per step,
tokens/s = B·T / step time, MFU (as the train suite: 6·N + 12·L·T·d FLOPs per token over the
dense matmul FLOP/s measured in the same run) and the peak allocated memory (CUDA only).

On CPU our kernels' plain-PyTorch references run (TRITON_INTERPRET is switched off for the
suite: the interpreter times Python, not kernels, and is far too slow for a training step), so
the patched row measures the patch's plumbing around the references, not the kernels. Without
transformers installed the suite is skipped (`harness.SuiteSkipped`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from fastgpt.benchmarks import harness
from fastgpt.benchmarks.kernels_bench import short_error, skipped
from fastgpt.benchmarks.train_bench import (
    make_train_step,
    measure_train_step,
    random_batch,
    train_case,
    train_grid,
)
from tqdm import tqdm

from fastgpt.model_config import GPTConfig

MISSING_TRANSFORMERS = "transformers is not installed (pip install -e '.[hf]' in a checkout)"
CPU_PATCHED_NOTE = "on CPU: the kernels' plain-PyTorch references (no Triton)"


@dataclass(frozen=True)
class HFProvider:
    """One contender: transformers' attention implementation, and whether our patch is on."""

    name: str
    role: str  # "ours" or "baseline"
    attn_implementation: str  # "eager" or "sdpa" (before the patch, which sets "fastgpt")
    patch: bool = False


PROVIDERS = (
    HFProvider("HF + fastgpt.patch_hf_gpt2", "ours", "eager", patch=True),
    HFProvider("HF eager", "baseline", "eager"),
    HFProvider("HF SDPA", "baseline", "sdpa"),
)


def hf_grid(device: torch.device, quick: bool) -> dict[str, Any]:
    """Models as (fastgpt preset, batch, seq_len, config overrides) and the step counts; the
    train suite's shapes (`train_bench.train_grid`) without gpt2-medium."""
    grid = train_grid(device, quick)
    return {**grid, "models": [m for m in grid["models"] if m[0] != "gpt2-medium"]}


def build_hf_model(config: GPTConfig, provider: HFProvider, device: torch.device):
    """transformers' GPT2LMHeadModel of our `config` on `device` in train mode, seed 0 (the
    same initial weights for every provider), patched when the provider says so."""
    import transformers

    from fastgpt.hf_format import hf_config
    from fastgpt.hf_patch import patch_hf_gpt2

    hf = transformers.GPT2Config(**hf_config(config, config.vocab_size, bias=False, tied=True))
    hf._attn_implementation = provider.attn_implementation
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place, as train_bench.build_model does
        model = transformers.GPT2LMHeadModel(hf)
    if provider.patch:
        patch_hf_gpt2(model)
    return model.train()


class _Logits(torch.nn.Module):
    """model(ids).logits: the (B, T, V) tensor `make_train_step` takes from a model."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


@contextlib.contextmanager
def kernel_references_on_cpu(device: torch.device) -> Iterator[None]:
    """On CPU, make our kernels run their PyTorch references (kernels/_dispatch.py reads
    TRITON_INTERPRET at every call); restores the variable afterwards. No-op on CUDA."""
    if device.type == "cuda":
        yield
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def bench_hf(
    device: torch.device, hardware: dict[str, Any], options: harness.RunOptions
) -> list[dict]:
    if importlib.util.find_spec("transformers") is None:
        raise harness.SuiteSkipped(MISSING_TRANSFORMERS)
    try:
        import transformers  # noqa: F401  (a broken install says so here, once)
    except ImportError as exc:
        raise harness.SuitesFailed(f"transformers does not import: {exc}") from None
    grid = hf_grid(device, options.quick)
    peak_flops = hardware["matmul_tflops"] * 1e12
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    runs = [(m, p) for m in grid["models"] for p in PROVIDERS]
    records: list[dict[str, Any]] = []
    with kernel_references_on_cpu(device):
        for (preset, batch, seq_len, overrides), provider in tqdm(runs, desc="hf", leave=False):
            config = GPTConfig.from_name(preset, **overrides)
            case = train_case(preset, config, batch, seq_len, precision)
            who = ("hf", case, provider.name, provider.role)
            model = optimizer = step = None
            try:
                model = build_hf_model(config, provider, device)
                fused = {"fused": True} if device.type == "cuda" else {}
                optimizer = torch.optim.AdamW(
                    model.parameters(), lr=1e-4, weight_decay=0.1, **fused
                )
                ids = random_batch(config, batch, seq_len, device)
                step = make_train_step(_Logits(model), optimizer, ids[:, :-1], ids[:, 1:], device)
                record = measure_train_step(
                    who, step, config, batch, seq_len, grid, device, peak_flops
                )
                if provider.patch and device.type != "cuda":
                    record["note"] = CPU_PATCHED_NOTE
                records.append(record)
            except Exception as exc:  # out of memory, a kernel that refuses the shape: go on
                records.append(skipped(*who, short_error(exc)))
            finally:
                model = optimizer = step = None
                harness.free_memory(device)
                options.save(records)
    return records
