"""pytest-benchmark cases for a training step and generation.

    pytest benchmarks/test_end_to_end.py --benchmark-only -n 0

GPU: gpt2-small, batch 8 × 1024 tokens, bf16 autocast, the providers of
`benchmarks/train_bench.py` (ours, ours compiled, the book's model, SDPA + compile + fused
AdamW). CPU: the tiny model in fp32 with the torch backend only.
"""

from __future__ import annotations

import pytest
import torch
from fastgpt.benchmarks.train_bench import (
    build_model,
    generate_providers,
    make_train_step,
    train_providers,
)

from fastgpt.model import flops_per_token
from fastgpt.model_config import GPTConfig

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
PRESET, BATCH, SEQ_LEN = ("gpt2-small", 8, 1024) if HAS_CUDA else ("tiny", 4, 64)
TRAIN = {p.name: p for p in train_providers(DEVICE, quick=True)}
GENERATE = {p.name: p for p in generate_providers(DEVICE)}


@pytest.mark.parametrize("provider", list(TRAIN))
def test_train_step(timed, provider):
    spec = TRAIN[provider]
    config = GPTConfig.from_name(PRESET)
    model = build_model(config, spec, DEVICE).train()
    fused = {"fused": True} if spec.fused_adamw else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    runner = torch.compile(model) if spec.compile else model
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN + 1)).to(DEVICE)
    step = make_train_step(runner, optimizer, ids[:, :-1], ids[:, 1:], DEVICE)
    step()  # compile / allocate optimizer state before timing
    fpt = flops_per_token(config, SEQ_LEN)
    timed(
        step,
        tokens_per_step=BATCH * SEQ_LEN,
        tokens_per_s=lambda s: BATCH * SEQ_LEN / s,
        flops_per_token=fpt,
    )
    if spec.compile:
        torch._dynamo.reset()


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("provider", list(GENERATE))
def test_generate(timed, provider, batch, use_cache):
    from fastgpt.generation import generate

    config = GPTConfig.from_name(PRESET)
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    model = build_model(config, GENERATE[provider], DEVICE).to(dtype).eval()
    prompt_len, new = (128, 32) if HAS_CUDA else (16, 8)
    prompt = torch.randint(0, config.vocab_size, (batch, prompt_len)).to(DEVICE)
    timed(
        lambda: generate(model, prompt, new, use_cache=use_cache),
        new_tokens=batch * new,
        tokens_per_s=lambda s: batch * new / s,
    )
