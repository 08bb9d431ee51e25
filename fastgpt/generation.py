"""Autoregressive text generation: greedy, temperature, top-k and top-p (nucleus) sampling.

    out = generate(model, prompt_ids, max_new_tokens=50)                  # (B, T + new)
    generate(model, prompt_ids, 50, temperature=0.8, on_step=print)       # (B, 1) each step

With `use_cache=True` (default) the prompt is run through the model once (prefill) and then
one position per step, attending to the keys and values cached in a `KVCache` (attention with
one query against all cached keys). Without the cache every step reruns the whole sequence,
as in the book.

Past the context window: both paths condition on the last `context_length` tokens. GPT-2's
position embeddings are absolute, so once the window slides every token's position changes and
the cached keys are stale; from then on the cached path re-prefills the last context_length
tokens each step (it costs what the uncached path costs, and gives the same tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastgpt.errors import ConfigError
from fastgpt.model import GPTModel


def check_generation_options(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    """ConfigError (a ValueError) unless max_new_tokens >= 0, temperature >= 0, top_k >= 1 (or
    None) and top_p in (0, 1] (or None)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError("max_new_tokens", f"must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ConfigError("temperature", f"must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ConfigError("top_k", f"must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError("top_p", f"must be in (0, 1] or None, got {top_p!r}")


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from last-position logits (B, V) -> (B, 1) long.

    temperature 0 is greedy (argmax; top_k/top_p are then irrelevant). Otherwise the logits are
    divided by the temperature, cut to the top_k most likely tokens and to the smallest set whose
    probability reaches top_p (the most likely token always stays), and sampled. `generator`
    must live on the logits' device."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


@torch.no_grad()
def generate(
    model: GPTModel,
    token_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The prompts (B, T) followed by up to max_new_tokens generated tokens: (B, T + new).

    token_ids: (B, T) prompts of one length (a batch of prompts is generated together, each
    row exactly as it would be alone). A prompt longer than the model's context_length is
    conditioned on its last context_length tokens only (the earlier ones are dropped, silently
    here; `fastgpt generate` says how many); it is still returned whole. Stops after
    max_new_tokens steps, or when every sequence has produced `eos_id` (a finished sequence
    then gets `eos_id` at each later step).
    `generator` (on the model's device) makes sampling reproducible. `on_step(new_ids)` is
    called with each step's tokens, (B, 1) long on the model's device, as they are produced
    (`fastgpt generate` streams text this way). The model runs in eval mode (its previous mode
    is restored at the end)."""
    check_generation_options(max_new_tokens, temperature, top_k, top_p)
    model.check_token_ids(token_ids)  # once: every id generated later comes from the head
    context = model.config.context_length
    was_training, was_checking = model.training, model.check_inputs
    model.eval()
    # The head's ids are all in range, so the per-call range check (a device-to-host sync on
    # CUDA at every step) is off while generating.
    model.check_inputs = model.out_head.out_features > model.config.vocab_size
    try:
        device = next(model.parameters()).device
        seq = token_ids.to(device)  # (B, T) everything so far
        cache = model.new_kv_cache() if use_cache else None
        finished = torch.zeros(seq.shape[0], dtype=torch.bool, device=device)
        fed = 0  # with the cache: how many tokens of seq the cache holds
        for _ in range(max_new_tokens):
            if cache is not None and fed > 0 and seq.shape[1] <= context:
                logits = model(seq[:, fed:], kv_cache=cache)  # (B, 1, V): one new position
            else:
                window = seq[:, -context:]  # (B, <= context)
                if cache is not None:
                    cache.reset()  # prefill (first step, or the window slid)
                logits = model(window, kv_cache=cache)  # (B, T_window, V)
            fed = seq.shape[1]
            next_ids = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_ids = next_ids.masked_fill(finished[:, None], eos_id)
                finished |= next_ids[:, 0] == eos_id
            seq = torch.cat([seq, next_ids], dim=1)  # (B, T + 1)
            if on_step is not None:
                on_step(next_ids)
            if eos_id is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
        model.check_inputs = was_checking
    return seq.to(token_ids.device)
