"""Peak CPU memory of the fused linear + cross-entropy, forward + backward, at gpt2-small's head.

    python benchmarks/fused_loss_memory.py                 # N = 8192 and 16384 tokens, fp32
    python benchmarks/fused_loss_memory.py --tokens 16384 --unfused

The fused loss on CPU is `chunked_linear_cross_entropy_torch` (the kernel's chunks with the
PyTorch step per chunk): its memory is the algorithm's. Counted as `loss_bench` counts it:
`harness.cpu_peak_bytes` (the profiler's allocation records) plus the inputs' bytes. Printed per
N: the chunks (`kernels/cross_entropy.py`'s LOGITS_BUDGET_BYTES), the peak, the loss, and with
--unfused the unfused loss's peak and the ratio (the unfused loss at 16k tokens needs ~10 GB of
RAM and minutes on two cores).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from fastgpt.benchmarks import harness
from fastgpt.kernels.cross_entropy import _chunk_rows, chunked_linear_cross_entropy_torch

D_MODEL, VOCAB = 768, 50257  # gpt2-small's head


def peak_mib(loss_fn, n: int) -> tuple[float, float]:
    """(peak MiB of one forward + backward with the inputs, loss) of loss_fn(hidden, weight,
    targets) on fp32 inputs of N tokens, made as `loss_bench` makes them."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, D_MODEL, generator=gen).requires_grad_(True)
    weight = (0.02 * torch.randn(VOCAB, D_MODEL, generator=gen)).requires_grad_(True)
    targets = torch.randint(0, VOCAB, (n,), generator=gen)
    result = {}

    def run() -> None:
        loss = loss_fn(hidden, weight, targets)
        loss.backward()
        result["loss"] = loss.item()

    inputs = sum(t.numel() * t.element_size() for t in (hidden, weight, targets))
    return (inputs + harness.cpu_peak_bytes(run)) / 2**20, result["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--unfused", action="store_true", help="also the unfused loss's peak")
    args = parser.parse_args()
    for n in args.tokens:
        started = time.perf_counter()
        rows = _chunk_rows(n, VOCAB, 4)
        fused, loss = peak_mib(chunked_linear_cross_entropy_torch, n)
        line = f"N={n}: {-(-n // rows)} chunks of {rows} rows, fused peak {fused:,.0f} MiB"
        if args.unfused:
            unfused, _ = peak_mib(
                lambda h, w, t: F.cross_entropy((h @ w.T).float(), t), n
            )  # the engine's unfused loss, as loss_bench's "torch eager"
            line += f", unfused {unfused:,.0f} MiB ({100 * fused / unfused:.1f}%)"
        seconds = time.perf_counter() - started
        print(f"{line}, loss {loss:.8f} ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
