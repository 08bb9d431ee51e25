"""End-to-end benchmarks: one training step and text generation.

Training step = forward, cross-entropy, backward, AdamW step, zero_grad on random token ids of
shape (B, T), T = 1024 on GPU, in bf16 autocast (fp32 master weights). Providers on CUDA:

- "fastgpt": `GPTModel(backend="triton")` (our LayerNorm, bias+GELU and attention kernels),
  fused AdamW;  "fastgpt + compile": the same under `torch.compile`;
- "torch (book model)": `GPTModel(backend="torch")`, the book's plain-PyTorch layers, AdamW;
- "torch SDPA + compile + fused AdamW": `GPTModel(backend="sdpa")` (F.layer_norm, SDPA,
  F.gelu) under `torch.compile` with `AdamW(fused=True)`, the book's fastest recipe (and,
  outside --quick, the same without compile).

Reported: ms per step, tokens/s = B·T / step time, MFU = tokens/s × flops_per_token / measured
peak, where flops_per_token = 6·N + 12·L·T·d (`fastgpt.model.flops_per_token`: N non-embedding
parameters, L layers, d width) and the peak is the dense matmul TFLOP/s measured in the same
run (bf16 on GPU, fp32 on CPU); and the peak allocated memory.

Generation = `fastgpt.generation.generate` greedy from a random prompt, with and without the KV
cache, at batch 1 and 16: tokens/s = B·new tokens / wall time (prefill included).

On CPU the models run in fp32 with the torch backend only (our kernels would run through the
Triton interpreter, which times Python, not kernels), without torch.compile, on small shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from fastgpt.benchmarks import harness
from fastgpt.benchmarks.kernels_bench import measured, short_error, skipped
from tqdm import tqdm

from fastgpt.model import GPTModel, flops_per_token
from fastgpt.model_config import GPTConfig


@dataclass(frozen=True)
class Provider:
    """How to build the model and optimizer of one end-to-end contender."""

    name: str
    role: str  # "ours" or "baseline"
    backend: str  # GPTModel backend: "triton", "torch" or "sdpa" (fastgpt/backends.py)
    compile: bool = False  # torch.compile the model
    fused_adamw: bool = False  # AdamW(fused=True) instead of the default (foreach)


def train_providers(device: torch.device, quick: bool) -> list[Provider]:
    if device.type == "cuda":
        providers = [
            Provider("fastgpt", "ours", "triton", fused_adamw=True),
            Provider("fastgpt + compile", "ours", "triton", compile=True, fused_adamw=True),
            Provider("torch (book model)", "baseline", "torch"),
            Provider(
                "torch SDPA + compile + fused AdamW",
                "baseline",
                "sdpa",
                compile=True,
                fused_adamw=True,
            ),
        ]
        if not quick:
            providers.append(
                Provider("torch SDPA + fused AdamW", "baseline", "sdpa", fused_adamw=True)
            )
        return providers
    providers = [
        Provider("fastgpt torch backend", "ours", "torch"),
        Provider("torch SDPA + fused AdamW", "baseline", "sdpa", fused_adamw=True),
    ]
    if not quick:  # `--compile` on CPU: Inductor compiles the torch backend (minutes to build)
        providers.insert(1, Provider("fastgpt torch backend + compile", "ours", "torch", True))
    return providers


# Hugging Face's GPT2LMHeadModel.generate (greedy, its own KV cache) on the same weights: a
# baseline of the generate suite outside --quick (`bench_generate`).
HF_GENERATE = Provider("Hugging Face GPT2LMHeadModel.generate", "baseline", "hf")


def generate_providers(device: torch.device) -> list[Provider]:
    if device.type == "cuda":
        return [
            Provider("fastgpt", "ours", "triton"),
            Provider("torch (book model)", "baseline", "torch"),
            Provider("torch SDPA", "baseline", "sdpa"),
        ]
    return [
        Provider("fastgpt torch backend", "ours", "torch"),
        Provider("torch SDPA", "baseline", "sdpa"),
    ]


def train_grid(device: torch.device, quick: bool) -> dict[str, Any]:
    """Models as (preset, batch, seq_len, config overrides) and the step counts."""
    if device.type == "cuda":
        models = [("gpt2-small", 8, 1024, {})]
        if not quick:
            models.append(("gpt2-medium", 8, 1024, {}))
        return {"models": models, "warmup": 2 if quick else 3, "reps": 5 if quick else 10}
    if quick:
        return {"models": [("tiny", 4, 64, {})], "warmup": 1, "reps": 3}
    return {
        "models": [("tiny", 8, 64, {}), ("gpt2-small", 2, 128, {"context_length": 128})],
        "warmup": 1,
        "reps": 3,
    }


def generate_grid(device: torch.device, quick: bool) -> dict[str, Any]:
    """Models, batch sizes, prompt length, new tokens and repetitions of the generation runs."""
    if device.type == "cuda":
        return {
            "models": ["gpt2-small"] if quick else ["gpt2-small", "gpt2-medium"],
            "batches": [1, 16],
            "prompt_len": 128,
            "new_tokens": 32 if quick else 128,
            "reps": 2 if quick else 3,
        }
    if quick:
        return {
            "models": ["tiny"],
            "batches": [1, 16],
            "prompt_len": 16,
            "new_tokens": 8,
            "reps": 1,
        }
    return {
        "models": ["tiny", "gpt2-small"],
        "batches": [1, 16],
        "prompt_len": 32,
        "new_tokens": 16,
        "reps": 2,
    }


def build_model(config: GPTConfig, provider: Provider, device: torch.device) -> GPTModel:
    """The provider's model on `device`, same initial weights for every provider (seed 0)."""
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: fast for gpt2-medium on a GPU
        model = GPTModel(config, backend=provider.backend)
    model.check_inputs = False  # random ids are in range; skip the per-call host sync
    return model


def build_generate_model(config: GPTConfig, provider: Provider, device: torch.device):
    """`build_model`, or for HF_GENERATE transformers' GPT2LMHeadModel holding the same weights
    (our model saved in Hugging Face's layout and loaded back)."""
    if provider != HF_GENERATE:
        return build_model(config, provider, device)
    model = build_model(config, Provider("same weights", "baseline", "torch"), device)
    import tempfile

    import transformers

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return transformers.GPT2LMHeadModel.from_pretrained(folder).to(device)


# --- training step ---------------------------------------------------------------------------


def make_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    device: torch.device,
) -> Callable[[], float]:
    """One optimizer step on (inputs, targets) (B, T) each; bf16 autocast on CUDA."""
    autocast = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(inputs)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def train_case(preset: str, config: GPTConfig, batch: int, seq_len: int, precision: str) -> dict:
    """What a training-step record was measured on."""
    return {
        "model": preset,
        "batch": batch,
        "seq_len": seq_len,
        "precision": precision,
        "dropout": config.drop_rate,
    }


def random_batch(config: GPTConfig, batch: int, seq_len: int, device) -> torch.Tensor:
    """(batch, seq_len + 1) random token ids, the same for every provider (seeded)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=gen)
    return ids.to(device)


def measure_train_step(who, step, config, batch, seq_len, grid, device, peak_flops) -> dict:
    """The measured record of one training-step case: `step` warmed up (compilation and the
    optimizer state happen there), its peak memory, its time, tokens/s and MFU."""
    for _ in range(grid["warmup"]):
        step()
    peak = harness.peak_memory_mb(step, device)
    ms = harness.time_steps_ms(step, device, warmup=0, reps=grid["reps"])
    tokens_per_s = batch * seq_len / (ms * 1e-3)
    fpt = flops_per_token(config, seq_len)
    return measured(
        *who,
        ms=ms,
        tokens_per_s=tokens_per_s,
        flops_per_token=fpt,
        mfu_pct=100.0 * harness.mfu(tokens_per_s, fpt, peak_flops),
        peak_mem_mb=peak,
    )


def bench_train(
    device: torch.device, hardware: dict[str, Any], options: harness.RunOptions
) -> list[dict]:
    quick = options.quick
    grid = train_grid(device, quick)
    peak_flops = hardware["matmul_tflops"] * 1e12
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    runs = [(m, p) for m in grid["models"] for p in train_providers(device, quick)]
    records: list[dict[str, Any]] = []
    for (preset, batch, seq_len, overrides), provider in tqdm(runs, desc="train", leave=False):
        config = GPTConfig.from_name(preset, **overrides)
        case = train_case(preset, config, batch, seq_len, precision)
        who = ("train", case, provider.name, provider.role)
        try:
            model = build_model(config, provider, device)
            model.train()
            fused = {"fused": True} if provider.fused_adamw else {}
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **fused)
            runner = torch.compile(model) if provider.compile else model
            ids = random_batch(config, batch, seq_len, device)
            step = make_train_step(runner, optimizer, ids[:, :-1], ids[:, 1:], device)
            records.append(measure_train_step(who, step, config, batch, seq_len, grid, device,
                                              peak_flops))  # fmt: skip
        except Exception as exc:  # out of memory, or a compile failure: report, go on
            records.append(skipped(*who, short_error(exc)))
        finally:
            model = optimizer = runner = step = None
            if provider.compile:
                torch._dynamo.reset()  # compiled code holds the model's parameters alive
            harness.free_memory(device)
            options.save(records)
    return records


# --- generation ------------------------------------------------------------------------------


def bench_generate(
    device: torch.device, hardware: dict[str, Any], options: harness.RunOptions
) -> list[dict]:
    from fastgpt.generation import generate

    quick = options.quick
    grid = generate_grid(device, quick)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype_name = "bf16" if device.type == "cuda" else "fp32"
    new = grid["new_tokens"]
    records: list[dict[str, Any]] = []
    providers = generate_providers(device) + ([] if quick else [HF_GENERATE])
    runs = [(m, p) for m in grid["models"] for p in providers]
    for preset, provider in tqdm(runs, desc="generate", leave=False):
        config = GPTConfig.from_name(preset)
        try:
            model = build_generate_model(config, provider, device).to(dtype).eval()
        except Exception as exc:
            model = None
            build_error = exc
        for batch in grid["batches"]:
            for use_cache in (True, False):
                case = {
                    "model": preset,
                    "dtype": dtype_name,
                    "batch": batch,
                    "prompt": grid["prompt_len"],
                    "new_tokens": new,
                    "kv_cache": use_cache,
                }
                who = ("generate", case, provider.name, provider.role)
                if model is None:
                    records.append(skipped(*who, short_error(build_error)))
                    continue
                gen = torch.Generator(device="cpu").manual_seed(0)
                prompt = torch.randint(
                    0, config.vocab_size, (batch, grid["prompt_len"]), generator=gen
                ).to(device)

                def run(
                    model=model, prompt=prompt, use_cache=use_cache, hf=provider == HF_GENERATE
                ):
                    if hf:  # exactly `new` tokens: no early stop at its eos
                        return model.generate(
                            prompt,
                            attention_mask=torch.ones_like(prompt),
                            max_new_tokens=new,
                            min_new_tokens=new,
                            do_sample=False,
                            use_cache=use_cache,
                            pad_token_id=0,
                        )
                    return generate(model, prompt, new, use_cache=use_cache)

                try:
                    peak = harness.peak_memory_mb(run, device)  # runs once on CUDA: warm-up
                    warmup = 0 if device.type == "cuda" else 1
                    ms = harness.time_steps_ms(run, device, warmup=warmup, reps=grid["reps"])
                    records.append(
                        measured(
                            *who,
                            ms=ms,
                            ms_per_token=ms / new,
                            tokens_per_s=batch * new / (ms * 1e-3),
                            peak_mem_mb=peak,
                        )
                    )
                except Exception as exc:
                    records.append(skipped(*who, short_error(exc)))
        model = None
        harness.free_memory(device)
        options.save(records)
    return records
