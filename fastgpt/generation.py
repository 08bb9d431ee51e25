"""Autoregressive text generation: greedy, temperature, top-k and top-p (nucleus) sampling.

    out = generate(model, prompt_ids, max_new_tokens=50)                  # (B, T + new)
    generate(model, prompt_ids, 50, temperature=0.8, on_step=print)       # (B, 1) each step

With `use_cache=True` (default) the prompt is run through the model once (prefill) and then
one position per step, attending to the keys and values cached in a `KVCache` (attention with
one query against all cached keys). Without the cache every step reruns the whole sequence,
as in the book.

Prompts of different lengths (a list of 1-D id sequences) are generated in one batch: they are
prefilled right-padded (ordinary causal attention: a real token never sees the padding after
it), each row's cache length set to its prompt's length; each step then writes row i's new
keys at its own length and attends to its keys only (see `fastgpt/kv_cache.py`). Greedy output
is what each prompt gives alone.

The loop owns how many tokens each row has cached (a `CacheLengths`): it passes them to every
forward and advances them after it.

`compile=True` runs the one-token step under `torch.compile` (CUDA graphs, mode
"reduce-overhead", on CUDA; Inductor's default on CPU) on a static cache allocated once (a
`DecodeStep`, kept per model for later calls). No step syncs with the host: eos is checked on
the device and looked at every EOS_CHECK_EVERY steps (every step when `on_step` streams tokens).

Past the context window: both paths condition on the last `context_length` tokens. GPT-2's
position embeddings are absolute, so once the window slides every token's position changes and
the cached keys are stale; from then on the cached path re-prefills the last context_length
tokens of each row each step (it costs what the uncached path costs, and gives the same
tokens).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence

import torch

from fastgpt.errors import ConfigError
from fastgpt.kv_cache import CacheLengths, KVCache
from fastgpt.model import GPTModel

EOS_CHECK_EVERY = 16  # decoding steps between looks at "has every row finished?"


# Temperatures below this are greedy: logits / temperature would overflow fp32 to inf (and the
# softmax to nan), where the distribution it stands for is all on the argmax anyway.
GREEDY_BELOW = 1e-30


def check_generation_options(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    """ConfigError (a ValueError) unless max_new_tokens >= 0, temperature >= 0, top_k >= 1 (or
    None) and top_p in (0, 1] (or None)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError("max_new_tokens", f"must be an int >= 0, got {max_new_tokens!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError("temperature", f"must be a finite number >= 0, got {temperature}")
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

    temperature 0 (or below GREEDY_BELOW) is greedy (argmax; top_k/top_p are then irrelevant).
    Otherwise the logits are divided by the temperature, cut to the top_k most likely tokens and
    to the smallest set whose probability reaches top_p (the most likely token always stays),
    and sampled. `generator`
    must live on the logits' device."""
    if temperature < GREEDY_BELOW:
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


Prompts = torch.Tensor | Sequence[torch.Tensor | Sequence[int]]


@torch.no_grad()
def generate(
    model: GPTModel,
    token_ids: Prompts,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    on_step: Callable[[torch.Tensor], None] | None = None,
    compile: bool = False,
) -> torch.Tensor | list[torch.Tensor]:
    """The prompts followed by up to max_new_tokens generated tokens.

    token_ids: a (B, T) tensor of prompts of one length -> (B, T + new); or a list of B
    prompts of any lengths (1-D tensors or lists of ids) -> a list of B 1-D tensors, each its
    prompt and its generated tokens (up to and including its eos_id), on the prompt's device
    (CPU for lists). Every row is generated exactly as it would be alone. A prompt longer than
    the model's context_length is conditioned on its last context_length tokens only (the
    earlier ones are dropped, silently here; `fastgpt generate` says how many); it is still
    returned whole. Stops after max_new_tokens steps, or when every sequence has produced
    `eos_id` (a finished row of a tensor output then gets `eos_id` at each later step).
    `generator` (on the model's device) makes sampling reproducible. `on_step(new_ids)` is
    called with each step's tokens, (B, 1) long on the model's device, as they are produced
    (`fastgpt generate` streams text this way; without the cache a list of prompts runs one
    prompt at a time, so it gets (1, 1)). `compile`: the one-token step under torch.compile
    (with the cache only; see the module's docstring). The model runs in eval mode (its
    previous mode is restored at the end)."""
    check_generation_options(max_new_tokens, temperature, top_k, top_p)
    prompts = _prompt_list(model, token_ids)  # once: every id generated later is in range
    if compile and not use_cache:
        raise ConfigError("compile", "needs use_cache=True (it compiles the cached step)")
    was_training, was_checking = model.training, model.check_inputs
    model.eval()
    # Every id the head gives is in range (its logits stop at vocab_size, padded or not): the
    # per-call range check (a device-to-host sync on CUDA at every step) is off meanwhile.
    model.check_inputs = False
    device = next(model.parameters()).device

    def sample(logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B, 1)
        return sample_next_token(logits, temperature, top_k, top_p, generator)

    try:
        if not use_cache:
            rows = [p.to(device)[None] for p in prompts] if prompts else [token_ids.to(device)]
            outs = [
                _generate_uncached(model, r, max_new_tokens, sample, eos_id, on_step) for r in rows
            ]
            if prompts is None:
                return outs[0].to(token_ids.device)
            return [o[0].to(p.device) for o, p in zip(outs, prompts, strict=True)]
        rows = prompts if prompts is not None else list(token_ids)
        seq, new_counts = _generate_cached(
            model, [r.to(device) for r in rows], max_new_tokens, sample, eos_id, on_step, compile
        )
    finally:
        model.train(was_training)
        model.check_inputs = was_checking
    return _cached_output(token_ids, prompts, seq, new_counts)


def _cached_output(token_ids, prompts, seq, new_counts) -> torch.Tensor | list[torch.Tensor]:
    """For a tensor input the (B, T + new) tensor of as many steps as were run; for a list,
    each row's prompt and its new_counts[i] tokens, on the prompt's device."""
    if prompts is None:
        return seq[:, : token_ids.shape[1] + max(new_counts)].to(token_ids.device)
    return [
        seq[i, : len(p) + n].to(p.device)
        for i, (p, n) in enumerate(zip(prompts, new_counts, strict=True))
    ]


def _prompt_list(model: GPTModel, token_ids: Prompts) -> list[torch.Tensor] | None:
    """None for a (B, T) tensor (checked); else the prompts as 1-D long tensors (checked)."""
    if isinstance(token_ids, torch.Tensor):
        model.check_token_ids(token_ids)
        return None
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
        raise TypeError(
            "token_ids must be a (batch, seq_len) tensor or a list of 1-D prompts, got "
            f"{type(token_ids).__name__}"
        )
    if not token_ids:
        raise ValueError("token_ids is an empty list of prompts")
    prompts = []
    for i, p in enumerate(token_ids):
        t = p if isinstance(p, torch.Tensor) else torch.as_tensor(p, dtype=torch.long)
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(
                f"prompt {i} must be a non-empty 1-D id sequence, got {tuple(t.shape)}"
            )
        model.check_token_ids(t[None])
        prompts.append(t.long())
    return prompts


def _generate_uncached(model, seq, max_new_tokens, sample, eos_id, on_step) -> torch.Tensor:
    """The book's loop: rerun the last context_length tokens of seq (B, T) at every step (the
    head only at the last position: the same logits as the book's `model(window)[:, -1]`)."""
    context = model.config.context_length
    finished = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    rows = seq.shape[0]
    for _ in range(max_new_tokens):
        window = seq[:, -context:]  # (B, T_window)
        last = torch.full((rows,), window.shape[1] - 1, device=seq.device)
        next_ids = sample(model(window, logits_at=last))  # the last logits (B, V) -> (B, 1)
        if eos_id is not None:
            next_ids = next_ids.masked_fill(finished[:, None], eos_id)
            finished |= next_ids[:, 0] == eos_id
        seq = torch.cat([seq, next_ids], dim=1)  # (B, T + 1)
        if on_step is not None:
            on_step(next_ids)
        if eos_id is not None and bool(finished.all()):
            break
    return seq


def _generate_cached(model, prompts, max_new_tokens, sample, eos_id, on_step, compile):
    """Prompts (1-D, on the model's device, any lengths) through prefill + one-token steps ->
    (seq (B, max_len + steps) long: row i's prompt then its tokens, from column len_i on;
    new_counts: how many tokens of each row to keep). Host syncs only every EOS_CHECK_EVERY
    steps (every step with on_step) and at the end."""
    b, device = len(prompts), prompts[0].device
    lengths = [len(p) for p in prompts]  # host ints: nothing per step needs the device
    seq = torch.zeros(b, max(lengths) + max_new_tokens, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        seq[i, : len(p)] = p
    ends = torch.tensor(lengths, device=device)  # (B,) where row i's next token goes
    rows = torch.arange(b, device=device)
    step = _decode_step(model, b, compile)
    cached = CacheLengths()  # the tokens each row holds in step.cache, set by each prefill
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    finish_step = torch.full((b,), max_new_tokens, dtype=torch.long, device=device)
    check_every = 1 if on_step is not None else EOS_CHECK_EVERY
    context, steps, next_ids = model.config.context_length, 0, None
    for i in range(max_new_tokens):
        if next_ids is not None and max(lengths) + i <= context:
            logits = step(model, next_ids, cached)  # (B, V): one new position per row
            cached.advance(1)
        else:  # first step, or a row's window slid: re-prefill every row's last tokens
            logits, cached = _prefill(model, seq, [n + i for n in lengths], step)
        next_ids = sample(logits)  # (B, 1)
        if eos_id is not None:
            next_ids = next_ids.masked_fill(finished[:, None], eos_id)
            newly = (next_ids[:, 0] == eos_id) & ~finished
            finish_step = torch.where(newly, i, finish_step)
            finished |= newly
        seq[rows, ends] = next_ids[:, 0]
        ends += 1
        steps = i + 1
        if on_step is not None:
            on_step(next_ids)
        if eos_id is not None and steps % check_every == 0 and bool(finished.all()):
            break
    # Stop where the uncached loop stops: at the step that finished the last row.
    done = [min(s + 1, steps) for s in finish_step.tolist()] if eos_id is not None else [steps] * b
    if eos_id is not None and all(s < max_new_tokens for s in finish_step.tolist()):
        steps = max(done)
    return seq, [min(n, steps) for n in done]


def _prefill(
    model: GPTModel, seq: torch.Tensor, ends: list[int], step: DecodeStep
) -> tuple[torch.Tensor, CacheLengths]:
    """Run row i's last min(ends[i], context) tokens of seq (B, W) right-padded through the
    model into step.cache from position 0 -> (each row's last logits (B, V), the lengths the
    cache now holds). Rows of different lengths (or a compiled step's static cache, whose
    lengths always live in `step.rows`) get lengths of their own; rows of one length keep the
    cache's plain append path (no masks, no scattered writes: cheaper in eager)."""
    context = model.config.context_length
    starts = [max(0, e - context) for e in ends]
    widths = [e - s for s, e in zip(starts, ends, strict=True)]
    padded = seq.new_zeros(seq.shape[0], max(widths))  # (B, W) padding after short rows
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        padded[i, : e - s] = seq[i, s:e]
    last = torch.tensor([w - 1 for w in widths], device=seq.device)  # each row's last token
    # (B, V), causal: the padding is unseen
    logits = model(padded, kv_cache=step.cache, logits_at=last, cache_lengths=CacheLengths())
    if step.rows is None and len(set(widths)) == 1:
        return logits, CacheLengths(widths[0])
    rows = torch.tensor(widths, dtype=torch.int32)
    if step.rows is None:
        return logits, CacheLengths(max(widths), rows.to(seq.device, non_blocking=True))
    step.rows.copy_(rows, non_blocking=True)  # the static tensor a compiled step reads
    return logits, CacheLengths(max(widths), step.rows)


def _decode_logits(
    model: GPTModel, ids: torch.Tensor, cache: KVCache, cached: CacheLengths
) -> torch.Tensor:
    """One new position per row after `cached` tokens: ids (B, 1) -> last logits (B, V). What
    torch.compile captures."""
    return model(ids, kv_cache=cache, cache_lengths=cached)[:, -1]


class DecodeStep:
    """The one-token step on its own cache: `step(model, ids (B, 1), cached) -> logits (B, V)`.

    Eager: a cache allocated on first use; `rows` None (each prefill makes its lengths).
    Compiled: torch.compile of the step on a static cache of `batch` rows and a static (B,)
    int32 per-row lengths tensor `rows`, made once per `key` (batch, dtype, device, backend) of
    a model and kept for later calls, which reuse the compiled graphs and the buffers they were
    captured with (CUDA graphs replay on fixed addresses, so the buffers are written in place)."""

    def __init__(self, model: GPTModel, batch: int, compile: bool):
        param = next(model.parameters())
        self.key = step_key(model, batch)
        self.cuda = compile and param.device.type == "cuda"
        if not compile:
            self.cache, self.rows, self.run = model.new_kv_cache(), None, _decode_logits
            return
        self.cache = model.new_kv_cache(batch_size=batch)
        self.rows = torch.zeros(batch, dtype=torch.int32, device=param.device)
        if self.cuda:
            for t in [self.rows, *(x for layer in self.cache.layers for x in (layer.k, layer.v))]:
                torch._dynamo.mark_static_address(t)
        self.run = torch.compile(_decode_logits, mode="reduce-overhead" if self.cuda else None)

    def __call__(self, model: GPTModel, ids: torch.Tensor, cached: CacheLengths) -> torch.Tensor:
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        return self.run(model, ids, self.cache, cached)


def step_key(model: GPTModel, batch: int) -> tuple:
    """What a compiled step is made for: (batch, dtype, device, backend)."""
    param = next(model.parameters())
    return (batch, param.dtype, param.device, model.backend)


# Each model's last compiled DecodeStep: a later generate() with the same step_key reuses it;
# the entry goes when the model does.
_compiled_steps: weakref.WeakKeyDictionary[GPTModel, DecodeStep] = weakref.WeakKeyDictionary()


def _decode_step(model: GPTModel, batch: int, compile: bool) -> DecodeStep:
    """The eager step on a new cache, or the model's compiled one for `batch` rows (made anew
    when its step_key changed)."""
    if not compile:
        return DecodeStep(model, batch, compile=False)
    saved = _compiled_steps.get(model)
    if saved is None or saved.key != step_key(model, batch):
        saved = _compiled_steps[model] = DecodeStep(model, batch, compile=True)
    return saved
