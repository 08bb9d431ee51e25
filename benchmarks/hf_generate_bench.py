"""Decode speed of `fastgpt.generate` against Hugging Face's `GPT2LMHeadModel.generate`.

    python -m fastgpt.benchmarks.hf_generate_bench --new-tokens 256 --reps 3 [--compile]

Both models hold the same random gpt2-small weights (transformers' default GPT2Config, loaded
into ours with `fastgpt.weights.hf_to_fastgpt`), run greedy from one random 8-token prompt at
batch 1, in fp32 on the CPU (or the GPU with --device cuda), each with its own KV cache; HF is
held to exactly --new-tokens tokens (min_new_tokens). Reported: new tokens / wall time of the
whole call (prefill included), the best of --reps runs after --warmup untimed ones, and
whether each output is the same tokens as HF's.
"""

from __future__ import annotations

import argparse
import time

import torch


def best_seconds(runs: dict, reps: int, warmup: int) -> tuple[dict[str, float], dict]:
    """Best wall time of each run and its last output, after `warmup` untimed calls each
    (with --compile, the first compiles), the runs interleaved so that a change in the
    machine's load hits them alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    best, outputs = dict.fromkeys(runs, float("inf")), {}
    for _ in range(reps):
        for name, fn in runs.items():
            start = time.perf_counter()
            outputs[name] = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, outputs


def main(argv: list[str] | None = None) -> None:
    import transformers

    from fastgpt.generation import generate
    from fastgpt.model import GPTModel
    from fastgpt.weights import config_from_hf, hf_to_fastgpt

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (each run)")
    parser.add_argument("--backend", default="torch", help="comma-separated: torch,sdpa")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time generate(compile=True)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = transformers.GPT2Config()  # gpt2-small
    hf = transformers.GPT2LMHeadModel(config).eval().to(args.device)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    ours = GPTModel(config_from_hf(config.to_dict()), backend="torch")
    ours.load_state_dict(hf_to_fastgpt(state, ours.config), strict=False)
    ours.eval().to(args.device)
    prompt = torch.randint(0, config.vocab_size, (1, 8), device=args.device)
    new = args.new_tokens

    def run_hf():
        return hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )

    runs = {"hf": run_hf}
    for backend in args.backend.split(","):
        model = ours.set_backend(backend)
        runs[f"fastgpt {backend}"] = lambda m=model, b=backend: generate(
            m.set_backend(b), prompt, new
        )
        if args.compile:
            runs[f"fastgpt {backend} compile"] = lambda m=model, b=backend: generate(
                m.set_backend(b), prompt, new, compile=True
            )
    with torch.no_grad():
        best, outputs = best_seconds(runs, args.reps, args.warmup)
        for name, seconds in best.items():
            same = torch.equal(outputs[name], outputs["hf"])
            print(f"{name:24s} {new / seconds:8.2f} tokens/s  same tokens as HF: {same}")


if __name__ == "__main__":
    main()
