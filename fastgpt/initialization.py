"""The book's initialization: PyTorch's layer defaults, drawn in the book's construction order.

`GPTModel` starts from GPT-2's initialization (N(0, 0.02) weights, zero biases, scaled residual
projections). The book's chapter-4 `GPTModel` never re-initializes: each layer keeps what
PyTorch's constructor drew, one layer after another, from the global RNG seeded just before
(`torch.manual_seed(123); model = GPTModel(GPT_CONFIG_124M)`):

    nn.Embedding(n, d)        weight ~ N(0, 1)
    nn.Linear(fan_in, out)    weight ~ kaiming_uniform(a=√5) = U(±1/√fan_in), then
                              bias   ~ U(±1/√fan_in)
    LayerNorm (scale, shift)  ones, zeros (no random draws)

and the layers are built in this order (the book's module order, which is not ours):

    tok_emb, pos_emb, then per block: att.W_query, att.W_key, att.W_value, att.out_proj,
    ff Linear(d, 4d), ff Linear(4d, d), norm1, norm2; then final_norm, out_head (no bias)

`init_book_weights_(model, seed)` redraws every parameter of a fastgpt `GPTModel` that way, so
it holds exactly (bit for bit) the tensors of the book's model built from the same seed. The
names map as: our fused `att.qkv` holds [W_query; W_key; W_value] stacked by rows (each
(d, d) as nn.Linear stores it, (out, in)), `ff.fc1`/`ff.fc2` are `ff.layers[0]`/`[2]`, and our
LayerNorm's `weight`/`bias` are the book's `scale`/`shift`.

On chapter 5's short-story run this is what makes the losses follow the book's table: with
GPT-2's small init the first evaluation reads 11.0 instead of 9.78 and training stalls.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["init_book_weights_"]


def _embedding(shape: tuple[int, int], gen: torch.Generator | None) -> torch.Tensor:
    """What nn.Embedding's reset_parameters draws: N(0, 1), float32 on CPU."""
    w = torch.empty(shape)
    nn.init.normal_(w, generator=gen)
    return w


def _linear(
    out_features: int, in_features: int, bias: bool, gen: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What nn.Linear's reset_parameters draws, in its order: the (out, in) weight by
    kaiming_uniform(a=√5), i.e. U(±1/√in), then the (out,) bias from U(±1/√in)."""
    w = torch.empty(out_features, in_features)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)
    b = None
    if bias:
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        b = torch.empty(out_features)
        nn.init.uniform_(b, -bound, bound, generator=gen)
    return w, b


def _set(param: torch.Tensor, value: torch.Tensor, padded_rows: int = 0) -> None:
    """Copy a CPU float32 draw into a parameter of any device/dtype, shape checked; a parameter
    with `padded_rows` more rows (a padded vocabulary, vocab_multiple) gets zeros there."""
    rows = param.shape[0] - padded_rows
    if param[:rows].shape != value.shape:
        raise ValueError(
            f"shape mismatch: parameter {tuple(param.shape)}, draw {tuple(value.shape)}"
        )
    with torch.no_grad():
        param[:rows].copy_(value)
        param[rows:].zero_()


def _linear_module(module: nn.Module, name: str) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"{name} is a {type(module).__name__}, not nn.Linear: apply the book's "
            "initialization before LoRA adapters or other wrappers are added"
        )
    return module


def _init_block_(block: nn.Module, i: int, d: int, gen: torch.Generator | None) -> None:
    """Transformer block i in the book's order: W_query, W_key, W_value (stacked into our
    fused qkv as [q | k | v]), out_proj, the feed-forward's two Linears, then the norms."""
    att = block.att
    qkv = _linear_module(att.qkv, f"trf_blocks[{i}].att.qkv")
    weights, biases = [], []
    for _ in ("W_query", "W_key", "W_value"):
        w, b = _linear(d, d, qkv.bias is not None, gen)
        weights.append(w)
        biases.append(b)
    _set(qkv.weight, torch.cat(weights, dim=0))  # (3d, d): rows [q | k | v]
    if qkv.bias is not None:
        _set(qkv.bias, torch.cat(biases))  # (3d,)
    for name, layer, (n_out, n_in) in (
        ("att.out_proj", att.out_proj, (d, d)),
        ("ff.fc1", block.ff.fc1, (4 * d, d)),
        ("ff.fc2", block.ff.fc2, (d, 4 * d)),
    ):
        layer = _linear_module(layer, f"trf_blocks[{i}].{name}")
        w, b = _linear(n_out, n_in, layer.bias is not None, gen)
        _set(layer.weight, w)
        if b is not None:
            _set(layer.bias, b)
    for norm in (block.norm1, block.norm2):
        with torch.no_grad():
            norm.weight.fill_(1.0)
            norm.bias.zero_()


def init_book_weights_(
    model: nn.Module, seed: int | None = None, generator: torch.Generator | None = None
) -> nn.Module:
    """Re-initialize a fastgpt `GPTModel` in place as the book's `GPTModel` is initialized.

    seed: draw from a fresh CPU generator seeded with it (the same stream as the book's
    `torch.manual_seed(seed)` before `GPTModel(cfg)`; the global RNG is left alone).
    generator: draw from this CPU generator instead. Neither: draw from the global torch RNG,
    exactly as the book's constructor does (after `torch.manual_seed(s)` the global RNG is then
    left in the state the book's would be in, for the data order and dropout that follow).

    Draws happen on CPU in float32 and are copied into the model's device and dtype (a model
    built under `torch.device("meta")` and moved with `to_empty(device=...)` skips GPT-2's
    init, which this overwrites anyway). Raises
    ValueError for a model with a tied output head (the book's is untied: its head gets its own
    U(±1/√d) draw) or whose linear layers are wrapped (e.g. by LoRA). Returns `model`.
    """
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    config = model.config
    if model.out_head.weight is model.tok_emb.weight:
        raise ValueError(
            "the book's initialization is for an untied output head (the book's GPTModel "
            "has one): build the model with tie_embeddings=False (on the command line: "
            '--model gpt2-small-book, or a config.json with "tie_embeddings": false)'
        )
    gen = torch.Generator().manual_seed(seed) if seed is not None else generator
    d = config.emb_dim

    padded_rows = config.padded_vocab_size - config.vocab_size
    _set(model.tok_emb.weight, _embedding((config.vocab_size, d), gen), padded_rows)
    _set(model.pos_emb.weight, _embedding((config.context_length, d), gen))
    for i, block in enumerate(model.trf_blocks):
        _init_block_(block, i, d, gen)
    with torch.no_grad():
        model.final_norm.weight.fill_(1.0)
        model.final_norm.bias.zero_()
    head = _linear_module(model.out_head, "out_head")
    w, b = _linear(config.vocab_size, d, head.bias is not None, gen)
    _set(head.weight, w, padded_rows)
    if b is not None:
        _set(head.bias, b, padded_rows)
    return model
