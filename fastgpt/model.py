"""The GPT-2 model, readable top to bottom in the order data flows through it.

    token ids (B, T)
      -> tok_emb + pos_emb, dropout                          (B, T, d)
      -> n_layers × TransformerBlock:
             x = x + drop(att(norm1(x)))      causal multi-head self-attention
             x = x + drop(ff(norm2(x)))       d -> 4d -> GELU -> d
      -> final_norm -> out_head                              (B, T, vocab_size)
(each residual add runs fused with the LayerNorm after it: `Ops.add_layer_norm`)

`backend` picks how LayerNorm, GELU and attention run, in one place (`fastgpt/backends.py`):
"triton" (our kernels), "torch" (the plain-PyTorch references beside them), "sdpa" (PyTorch's
own fused ops, the benchmarks' baseline) or "auto" (triton on CUDA, else sdpa). Every backend
holds the same parameters under the same names; `model.set_backend(...)` switches in place.

Weights: `GPTModel.from_pretrained` loads OpenAI's GPT-2 (a Hugging Face folder or hub name)
or a folder written by `save_pretrained` (the tensor formats are in `fastgpt/weights.py`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgpt import hf_format, weights
from fastgpt.backends import Ops, resolve_backend
from fastgpt.kv_cache import CacheLengths, CacheStep, KVCache, LayerKVCache
from fastgpt.lora import load_lora_adapters
from fastgpt.model_config import GPTConfig
from fastgpt.model_inputs import check_targets, check_token_ids, rows_at
from fastgpt.segments import PackedRows, check_segment_ids, packed_rows

# --- Layers ------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with learned `weight` (ones) and `bias` (zeros)."""

    def __init__(self, dim: int, ops: Ops, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + delta), x + delta) for the residual stream x (B, T, d) and a branch's
        output delta (B, T, d), the add fused with this norm; delta None: (norm(x), x)."""
        if delta is None:
            return self(x), x
        return self.ops.add_layer_norm(delta, x, self.weight, self.bias, self.eps)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with one fused q/k/v projection and an optional KV
    cache.

    `qkv` maps d_in -> 3·d_out laid out as [q | k | v], each split into num_heads heads of
    d_out // num_heads columns (the layout of GPT-2's c_attn, so OpenAI weights load as is);
    `out_proj` maps d_out -> d_out. The q/k/v head views of the fused projection are strided
    (B, H, T, hd) views, passed to the attention op as they are, without copies.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_heads: int,
        ops: Ops,
        dropout: float = 0.0,
        qkv_bias: bool = False,
    ):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be a multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.d_out = d_out
        self.dropout = dropout
        self.ops = ops
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: LayerKVCache | None = None,
        packed: PackedRows | None = None,
        cache_step: CacheStep | None = None,
    ) -> torch.Tensor:
        """x (B, T, d_in) -> (B, T, d_out). With `packed`, each token attends only within
        its own run of the rows' segment_ids (`fastgpt.segments`); with `kv_cache`, over the
        cached keys too, the new ones written where `cache_step` says."""
        b, t, _ = x.shape  # (B, T, d_in)
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, hd)
        if packed is not None:
            return self.out_proj(self._attend_packed(qkv, packed))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd), strided views
        if kv_cache is not None:  # caches k, v; the queries see the cached past too
            ctx = kv_cache.attend(q, k, v, cache_step, self.ops)  # (B, H, T, hd)
        else:
            dropout_p = self.dropout if self.training else 0.0
            ctx = self.ops.attention(q, k, v, causal=True, dropout_p=dropout_p)  # (B, H, T, hd)
        ctx = ctx.transpose(1, 2).reshape(b, t, self.d_out)  # (B, T, d_out)
        return self.out_proj(ctx)

    def _attend_packed(self, qkv: torch.Tensor, packed: PackedRows) -> torch.Tensor:
        """qkv (B, T, 3, H, hd) -> the context (B, T, d_out), the B·T tokens flattened into
        one packed axis of runs for `Ops.attention_varlen`."""
        b, t = qkv.shape[:2]
        if self.ops.attention_varlen is None:
            raise ValueError(f"the {self.ops.name} backend has no attention_varlen: no segment_ids")
        q, k, v = qkv.flatten(0, 1).unbind(1)  # each (B·T, H, hd), strided views
        cu, longest = packed.cu_seqlens, packed.max_seqlen
        dropout_p = self.dropout if self.training else 0.0
        ctx = self.ops.attention_varlen(
            q, k, v, cu, cu, longest, longest, causal=True, dropout_p=dropout_p
        )  # (B·T, H, hd)
        return ctx.reshape(b, t, self.d_out)


class FeedForward(nn.Module):
    """d -> 4d -> GELU (tanh approximation) -> d."""

    def __init__(self, emb_dim: int, ops: Ops):
        super().__init__()
        self.ops = ops
        self.fc1 = nn.Linear(emb_dim, 4 * emb_dim)
        self.fc2 = nn.Linear(4 * emb_dim, emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ops.linear_gelu(self.fc1, x)  # (B, T, 4d)
        return self.fc2(h)  # (B, T, d)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: attention then feed-forward, each added to the residual stream.

    Every residual add is fused with the LayerNorm that reads its sum (`add_and_norm`), so a
    block leaves its last add to the next norm (the next block's norm1, or final_norm): it
    takes the previous block's feed-forward output `pending` and returns its own."""

    def __init__(self, config: GPTConfig, ops: Ops):
        super().__init__()
        d = config.emb_dim
        self.norm1 = LayerNorm(d, ops)
        self.att = MultiHeadAttention(d, d, config.n_heads, ops, config.drop_rate, config.qkv_bias)
        self.norm2 = LayerNorm(d, ops)
        self.ff = FeedForward(d, ops)
        self.drop_shortcut = nn.Dropout(config.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: LayerKVCache | None = None,
        pending: torch.Tensor | None = None,
        packed: PackedRows | None = None,
        cache_step: CacheStep | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d) the residual stream, pending (B, T, d) or None still to be added to it
        -> (x + pending + attention's output, the feed-forward's output still to be added)."""
        h, x = self.norm1.add_and_norm(x, pending)  # x = x + pending, h = norm1(x) (B, T, d)
        att = self.drop_shortcut(self.att(h, kv_cache, packed, cache_step))  # (B, T, d)
        h, x = self.norm2.add_and_norm(x, att)  # x = x + att, h = norm2(x)
        return x, self.drop_shortcut(self.ff(h))  # (B, T, d) each


_LAYERS_WITH_OPS = (LayerNorm, MultiHeadAttention, FeedForward)


# --- The model ---------------------------------------------------------------------------


def _zero_padded(module: nn.Embedding | nn.Linear, config: GPTConfig) -> nn.Module:
    """`module` (an embedding or bias-free linear layer of vocab_size rows) with its weight
    zero-padded to config.padded_vocab_size rows."""
    weight, rows = module.weight.data, config.padded_vocab_size
    if rows > weight.shape[0]:
        padding = weight.new_zeros(rows - weight.shape[0], weight.shape[1])
        module.weight = nn.Parameter(torch.cat([weight, padding]))
        if isinstance(module, nn.Embedding):
            module.num_embeddings = rows
        else:
            module.out_features = rows
    return module


class GPTModel(nn.Module):
    """GPT-2: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, config: GPTConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        ops = resolve_backend(backend)
        # Range-check token ids in forward. On CUDA that costs one device->host sync per call;
        # a training loop that trusts its data may set this to False.
        self.check_inputs = True

        # The vocabulary's modules are built at vocab_size rows and zero-padded to
        # padded_vocab_size (rows that never get probability), and _init_weights draws only the
        # real rows: padding consumes no random number, so a padded model's weights and the
        # generator state after it are the unpadded model's.
        self.tok_emb = _zero_padded(nn.Embedding(config.vocab_size, config.emb_dim), config)
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim)
        self.drop_emb = nn.Dropout(config.drop_rate)
        self.trf_blocks = nn.ModuleList(
            TransformerBlock(config, ops) for _ in range(config.n_layers)
        )
        self.final_norm = LayerNorm(config.emb_dim, ops)
        head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        self.out_head = _zero_padded(head, config)
        if config.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02) weights, zero biases, LayerNorm ones/zeros, and the two
        projections that write into the residual stream (out_proj, fc2) scaled by
        1/sqrt(2·n_layers) so the stream's variance does not grow with depth. Padded vocabulary
        rows (vocab_multiple, zero from `_zero_padded`) are drawn nothing: a padded model starts
        from the unpadded one's weights, from the same generator state."""
        vocab = self.config.vocab_size
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                vocabulary = module is self.tok_emb or module is self.out_head
                weight = module.weight[:vocab] if vocabulary else module.weight
                nn.init.normal_(weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for block in self.trf_blocks:
            nn.init.normal_(block.att.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.ff.fc2.weight, mean=0.0, std=residual_std)

    @property
    def backend(self) -> str:
        """The backend the layers run on: "triton", "torch" or "sdpa", or "triton+sdpa" (what
        "auto" picks on a GPU below sm_80, `backends.resolve_backend`)."""
        return self.final_norm.ops.name

    def set_backend(self, backend: str) -> GPTModel:
        """Switch every layer to `backend` in place (parameters are unchanged)."""
        ops = resolve_backend(backend)
        for module in self.modules():
            if isinstance(module, _LAYERS_WITH_OPS):
                module.ops = ops
        return self

    def new_kv_cache(
        self, batch_size: int | None = None, dtype: torch.dtype | None = None, device=None
    ) -> KVCache:
        """An empty KV cache for this model. Buffers of the full context are allocated on first
        use, or at once for `batch_size` rows (a static cache, in `dtype` and on `device`,
        default the parameters')."""
        cache = KVCache(self.config.n_layers, self.config.context_length)
        if batch_size is not None:
            param = next(self.parameters())
            heads = self.config.n_heads
            head_dim = self.config.emb_dim // heads
            cache.allocate(
                batch_size, heads, head_dim, dtype or param.dtype, device or param.device
            )
        return cache

    def check_token_ids(self, token_ids: torch.Tensor) -> None:
        """Raise TypeError / ValueError unless `token_ids` is a non-empty (batch, seq_len)
        integer tensor whose ids all lie in [0, vocab_size) (the range part is skipped when
        `check_inputs` is False or under torch.compile). The length is not checked here."""
        check_token_ids(token_ids, self.config.vocab_size, self._checks_ranges())

    def _checks_ranges(self) -> bool:
        """Whether the input checks read the tensors' values (`fastgpt.model_inputs`)."""
        return self.check_inputs and not torch.compiler.is_compiling()

    @staticmethod
    def _packed(token_ids, segment_ids, kv_cache: KVCache | None) -> PackedRows:
        """The runs of segment_ids (checked against token_ids (B, T)) for the layers; a
        PackedRows (runs a loss found on the host) is taken as it is."""
        if kv_cache is not None:
            raise ValueError(
                "segment_ids cannot be combined with kv_cache (a cache continues one sequence "
                "per row)"
            )
        if isinstance(segment_ids, PackedRows):
            check_segment_ids(segment_ids.positions, token_ids)
            return segment_ids
        check_segment_ids(segment_ids, token_ids)
        return packed_rows(segment_ids)

    def forward(
        self,
        token_ids: torch.Tensor,
        kv_cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        segment_ids: torch.Tensor | PackedRows | None = None,
        logits_at: torch.Tensor | None = None,
        cache_lengths: CacheLengths | None = None,
    ) -> torch.Tensor:
        """token_ids (B, T) integer -> logits (B, T, vocab_size); with `targets` (B, T) long,
        the mean next-token cross-entropy instead (fp32 scalar, targets equal to
        ignore_index left out), which the triton backend computes without ever forming the
        (B·T, vocab_size) logits (`kernels.fused_linear_cross_entropy`).

        With `kv_cache`, the tokens continue each row's `cache_lengths` cached tokens (None: the
        cache's own count, advanced here) and attend to the cached keys as well.

        With `segment_ids` (B, T) integer, each maximal run of equal consecutive values in a
        row is a sequence of its own (a document, a packed example): its positions restart at
        0 and its tokens attend (causally) only within it (`fastgpt.segments`,
        `Ops.attention_varlen`). Not with kv_cache. Finding the runs reads the ids (a device
        sync); a `fastgpt.segments.PackedRows` found on the host may be given instead.

        With `logits_at` (B,) integer, only the logits at position logits_at[b] of each row b,
        (B, vocab_size): the output head (a third of gpt2-small's FLOPs per token) then runs on
        B rows instead of B·T (generation needs one position per row)."""
        self.check_token_ids(token_ids)  # before the embedding: no device-side assert
        _, t = token_ids.shape
        step = None  # with kv_cache: positions (T,), or (B, T) for rows of their own lengths
        if kv_cache is not None:  # raises past the context
            step = kv_cache.step(token_ids, cache_lengths, self.final_norm.ops)
        elif t > self.config.context_length:
            raise ValueError(
                f"sequence too long: {t} tokens > context_length {self.config.context_length}"
            )
        positions = torch.arange(t, device=token_ids.device) if step is None else step.positions
        packed = None if segment_ids is None else self._packed(token_ids, segment_ids, kv_cache)
        if packed is not None:
            positions = packed.positions  # (B, T), restarting at each run
        x = self.tok_emb(token_ids) + self.pos_emb(positions)  # (B, T, d)
        x = self.drop_emb(x)
        pending = None  # each block's last residual add, done by the next norm
        layer_caches = kv_cache.layers if kv_cache is not None else [None] * len(self.trf_blocks)
        for block, layer_cache in zip(self.trf_blocks, layer_caches, strict=True):
            x, pending = block(x, layer_cache, pending, packed, cache_step=step)
        if kv_cache is not None and cache_lengths is None:
            kv_cache.filled.advance(t)  # a caller's own lengths are the caller's to advance
        x = self.final_norm.add_and_norm(x, pending)[0]  # final_norm(x + pending) (B, T, d)
        if logits_at is not None:  # (B, T, d) -> (B, d): one position per row
            x = rows_at(x, logits_at, targets, self._checks_ranges())
        vocab = self.config.vocab_size
        language_head = self.out_head.out_features == self.config.padded_vocab_size
        if targets is not None:
            if not language_head:
                raise ValueError("targets need a language-model head (this is a classifier)")
            check_targets(targets, vocab, ignore_index, self._checks_ranges())
            return self.final_norm.ops.head_loss(self.out_head, x, vocab, targets, ignore_index)
        logits = self.out_head(x)  # (B, T, padded vocab) or (B, T, classes) for a classifier
        return logits[..., :vocab] if language_head else logits  # (B, T, vocab_size)

    # --- sizes and cost --------------------------------------------------------------------

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters (a tied head counts once). non_embedding=True leaves out the
        position embedding (and the token embedding unless it doubles as the output head),
        the convention of scaling-law papers and of `flops_per_token`."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.pos_emb.weight.numel()
            if self.out_head.weight is not self.tok_emb.weight:
                n -= self.tok_emb.weight.numel()
        return n

    # --- weights ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        backend: str = "auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        merge_adapters: bool = True,
        **config_overrides: Any,
    ) -> GPTModel:
        """The one way to load a model: a folder in Hugging Face's GPT-2 layout (a
        GPT2LMHeadModel, or a GPT2ForSequenceClassification as a classifier), a folder written
        by `save_pretrained` or a training command (also those of earlier fastgpt versions), or
        a hub name ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"; downloaded once). LoRA
        adapters a fine-tuning saved beside the base weights (PEFT's adapter_config.json, or
        the older lora.json) are folded in (merge_adapters=False loads the base alone;
        `fastgpt.lora.load_lora_adapters` adds them). `config_overrides` replace config
        fields that do not change tensor shapes (e.g. drop_rate=0.0). The model is in eval
        mode, on `device`, in `dtype`."""
        directory = weights.resolve_checkpoint_dir(name_or_path)
        config, raw, is_hf = weights.read_config(directory, **config_overrides)
        tensors = weights.read_tensors(directory)
        if weights.uses_hf_names(raw, is_hf):
            tensors = weights.hf_to_fastgpt(tensors, config)
            config = hf_format.drop_zero_qkv_bias(tensors, config)
        model = cls(config, backend=backend)
        head = weights.replaced_head(tensors, config.vocab_size)
        if head:  # e.g. a classifier whose head was replaced by Linear(emb_dim, num_classes)
            model.out_head = nn.Linear(config.emb_dim, head[0], bias=head[1])
        tensors = weights.vocab_rows(tensors, config.vocab_size, config.padded_vocab_size)
        what = f"Hugging Face checkpoint {directory}" if is_hf else f"checkpoint {directory}"
        weights.load_state_strict(model, tensors, what)
        if merge_adapters and not is_hf:
            load_lora_adapters(model, directory, merge=True)
        if device is not None:
            model.to(device)
        if dtype is not None:
            model.to(dtype)
        return model.eval()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write model.safetensors and config.json into `directory` (created), in Hugging
        Face's GPT-2 layout (`fastgpt/hf_format.py`: transformers' GPT2LMHeadModel, or for a
        classifier GPT2ForSequenceClassification where its bias-free head fits, loads the
        folder) with our GPTConfig, the output head's shape and the parameters' dtype beside;
        a tied head is stored once. A language model gets generation_config.json, a model on
        GPT-2's vocabulary the tokenizer (vocab.json, merges.txt, tokenizer_config.json), so
        that transformers' AutoTokenizer and pipeline work on the folder."""
        tied = self.out_head.weight is self.tok_emb.weight
        state = {
            k: v for k, v in self.state_dict().items() if not (tied and k == "out_head.weight")
        }
        vocab, rows = self.config.vocab_size, self.config.padded_vocab_size
        state = weights.vocab_rows(state, rows, vocab)  # a padded vocabulary is saved unpadded
        config = {**self.config.to_dict(), "tie_embeddings": tied}
        out_features, bias = self.out_head.out_features, self.out_head.bias is not None
        out_features = vocab if out_features == rows else out_features
        head = {"out_features": out_features, "bias": bias, "tied": tied}
        kind = hf_format.head_kind(self.config, out_features, bias)
        tensors = hf_format.fastgpt_to_hf(state, self.config, kind)
        hf_fields = hf_format.hf_config(self.config, out_features, bias, tied)
        generation = hf_format.hf_generation_config(self.config) if kind == "lm" else None
        tokenizer = None
        if hf_format.uses_gpt2_vocab(self.config):
            tokenizer = hf_format.hf_tokenizer_config(self.config.context_length)
        return weights.save_checkpoint(
            directory, tensors, config, head, self.num_parameters(), hf_config=hf_fields,
            generation_config=generation, tokenizer_config=tokenizer,
        )  # fmt: skip


def check_language_model(model: GPTModel, source: object) -> None:
    """ValueError when `model` (loaded from `source`) has a classifier's head: next-token
    training and generation need one output per token of the vocabulary."""
    outputs, vocab_size = model.out_head.out_features, model.config.vocab_size
    if outputs != model.config.padded_vocab_size:
        raise ValueError(
            f"{source} is a classifier ({outputs} outputs, not one per token of the "
            f"{vocab_size}-token vocabulary): run it with `fastgpt classify`, or start from a "
            "language model"
        )


def count_parameters(config: GPTConfig, non_embedding: bool = False) -> int:
    """Parameter count of GPTModel(config) computed from the config alone."""
    d, v, c = config.emb_dim, config.padded_vocab_size, config.context_length
    qkv = d * 3 * d + (3 * d if config.qkv_bias else 0)
    out_proj = d * d + d
    fc1 = d * 4 * d + 4 * d
    fc2 = 4 * d * d + d
    norms = 2 * 2 * d  # norm1, norm2: weight and bias each
    per_block = qkv + out_proj + fc1 + fc2 + norms
    n = config.n_layers * per_block + 2 * d  # + final_norm
    head_is_embedding = config.tie_embeddings
    n += v * d  # tok_emb (= out_head when tied)
    if not head_is_embedding:
        n += v * d  # out_head
    n += c * d  # pos_emb
    if non_embedding:
        n -= c * d
        if not head_is_embedding:
            n -= v * d
    return n


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> int:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`.

    6·N for the matmuls with the N non-embedding parameters (2 forward, 4 backward; the tied
    output head is included, the position-embedding lookup is not) plus 12·L·T·d for the
    attention scores and weighted sum (q·kᵀ and p·v, each 2·T·d per token and layer, ×3 for
    backward), with no discount for the causal mask — the convention of the PaLM paper and
    nanoGPT's MFU estimate. Forward-only (inference) cost is a third of this.
    """
    t = config.context_length if seq_len is None else seq_len
    n = count_parameters(config, non_embedding=True)
    return 6 * n + 12 * config.n_layers * t * config.emb_dim
