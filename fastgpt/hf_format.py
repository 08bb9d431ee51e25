"""Hugging Face's GPT-2 layout, the layout fastgpt's folders are written in (format_version 2).

A folder `GPTModel.save_pretrained` writes is one that transformers loads as GPT-2:

- config.json: the fields `transformers.GPT2Config` reads (`hf_config`: model_type "gpt2",
  n_embd, n_layer, n_head, n_positions, activation_function "gelu_new", tie_word_embeddings,
  ...) and beside them fastgpt's own (our GPTConfig fields, "format": "fastgpt",
  "format_version", "out_head"), which fastgpt reads back (see `fastgpt.weights.read_config`);
- model.safetensors: the tensor names `GPT2LMHeadModel.save_pretrained` writes
  (transformer.h.{i}.attn.c_attn.weight, ...), linear weights in `Conv1D`'s (in, out) layout
  (`fastgpt_to_hf`); a tied head is left out, an untied one is lm_head.weight. A model without
  q/k/v biases gets zero c_attn biases (transformers' GPT-2 always has them); config.json
  keeps "qkv_bias": false, so fastgpt loads it back without them.

Classifiers (out_head Linear(emb_dim, C)) store their head as score.weight (and score.bias):
the names of `GPT2ForSequenceClassification`. Its `score` has no bias, so only a head without
bias is declared as that architecture; a head with a bias (what `fastgpt finetune-classify`
trains, as the book does) would lose it there, and config.json says so in "fastgpt_note"
(architectures: GPT2Model, the body, which transformers does load exactly).

A model on GPT-2's vocabulary carries its tokenizer, GPT2Tokenizer's files: vocab.json and
merges.txt (`fastgpt.tokenizer.hf_vocab_and_merges`) and tokenizer_config.json
(`hf_tokenizer_config`: <|endoftext|> as bos, eos and unk, model_max_length the context
length). A language model has a generation_config.json (`hf_generation_config`).

LoRA adapters saved unmerged use PEFT's layout (`peft_adapter_config`, `peft_tensor_name`):
adapter_config.json and adapter_model.safetensors with names such as
base_model.model.transformer.h.0.attn.c_attn.lora_A.weight; base_model_name_or_path names the
model PEFT puts them on.

This module maps names, layouts and configs only; it reads and writes no files.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from fastgpt.model_config import GPTConfig

GPT2_EOT_ID = 50256  # <|endoftext|>: GPT-2's bos/eos, and the classifiers' padding
GPT2_EOT_TEXT = "<|endoftext|>"
# Tensors of transformer block i: Hugging Face "h.{i}.<key>" -> ours "trf_blocks.{i}.<value>".
HF_BLOCK_NAMES = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "attn.c_attn.weight": "att.qkv.weight",  # fused [q | k | v], kept fused
    "attn.c_attn.bias": "att.qkv.bias",
    "attn.c_proj.weight": "att.out_proj.weight",
    "attn.c_proj.bias": "att.out_proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "ff.fc1.weight",
    "mlp.c_fc.bias": "ff.fc1.bias",
    "mlp.c_proj.weight": "ff.fc2.weight",
    "mlp.c_proj.bias": "ff.fc2.bias",
}
_OUR_BLOCK_NAMES = {ours: hf for hf, ours in HF_BLOCK_NAMES.items()}
_TOP_NAMES = {
    "tok_emb.weight": "transformer.wte.weight",
    "pos_emb.weight": "transformer.wpe.weight",
    "final_norm.weight": "transformer.ln_f.weight",
    "final_norm.bias": "transformer.ln_f.bias",
}
# The Linear modules of a block LoRA adapts: ours -> Hugging Face's (Conv1D) module.
HF_MODULES = {"att.qkv": "attn.c_attn", "att.out_proj": "attn.c_proj", "ff.fc1": "mlp.c_fc",
              "ff.fc2": "mlp.c_proj"}  # fmt: skip
_BLOCK_NAME = re.compile(r"^trf_blocks\.(\d+)\.(.+)$")
_HF_BLOCK_MODULE = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
PEFT_PREFIX = "base_model.model."


def head_kind(config: GPTConfig, out_features: int, bias: bool) -> str:
    """ "lm" (one output per token, no bias: GPT2LMHeadModel), "classifier" (C outputs:
    GPT2ForSequenceClassification's score) or "lm_bias" (a vocabulary head with a bias, which
    no transformers GPT-2 class has)."""
    if out_features != config.vocab_size:
        return "classifier"
    return "lm_bias" if bias else "lm"


def head_tensor_prefix(kind: str) -> str:
    return "score" if kind == "classifier" else "lm_head"


# --- config ------------------------------------------------------------------------------


def uses_gpt2_vocab(config: GPTConfig) -> bool:
    """Whether the model's token ids are GPT-2's BPE (every fastgpt command tokenizes with
    it); a smaller vocabulary is some other tokenization, which fastgpt does not save."""
    return config.vocab_size > GPT2_EOT_ID


def hf_config(config: GPTConfig, out_features: int, bias: bool, tied: bool) -> dict[str, Any]:
    """The GPT2Config fields of a fastgpt model whose output head is Linear(emb_dim,
    out_features) (with `bias`; `tied` to the token embedding)."""
    kind = head_kind(config, out_features, bias)
    # No transformers GPT-2 head has a bias: then only the body (GPT2Model) loads exactly.
    architecture = "GPT2Model" if bias else {
        "lm": "GPT2LMHeadModel", "classifier": "GPT2ForSequenceClassification"}[kind]  # fmt: skip
    gpt2_vocab = uses_gpt2_vocab(config)
    p = config.drop_rate
    fields: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.emb_dim,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # GELU, tanh form
        "resid_pdrop": p,
        "embd_pdrop": p,
        "attn_pdrop": p,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        # A classifier's body keeps the (unused) tied LM head of GPT-2.
        "tie_word_embeddings": tied or kind != "lm",
        "use_cache": True,
        "bos_token_id": GPT2_EOT_ID if gpt2_vocab else None,
        "eos_token_id": GPT2_EOT_ID if gpt2_vocab else None,
    }
    if kind == "classifier":
        fields["id2label"] = {str(i): f"LABEL_{i}" for i in range(out_features)}
        fields["label2id"] = {f"LABEL_{i}": i for i in range(out_features)}
        fields["pad_token_id"] = GPT2_EOT_ID if gpt2_vocab else None  # what we pad with
    if bias:
        name = head_tensor_prefix(kind)
        fields["fastgpt_note"] = (
            f"the output head has a bias ({name}.bias), which transformers' GPT-2 heads lack "
            f"({'GPT2ForSequenceClassification.score' if kind == 'classifier' else 'lm_head'}"
            " would load without it and give shifted logits); transformers loads the body "
            f"exactly as GPT2Model: apply {name}.weight and {name}.bias from model.safetensors "
            "to its last_hidden_state, or load the folder with fastgpt"
        )
    return fields


def hf_tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json of GPT-2's BPE beside vocab.json and merges.txt: GPT2Tokenizer,
    <|endoftext|> as bos, eos and unk (no padding token, as GPT-2), no prefix space, and
    decoding that gives the text back exactly as tiktoken does (no clean-up of spaces)."""
    special = {"content": GPT2_EOT_TEXT, "lstrip": False, "normalized": False, "rstrip": False,
               "single_word": False, "special": True}  # fmt: skip
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "bos_token": GPT2_EOT_TEXT,
        "eos_token": GPT2_EOT_TEXT,
        "unk_token": GPT2_EOT_TEXT,
        "pad_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "added_tokens_decoder": {str(GPT2_EOT_ID): special},
    }


def hf_generation_config(config: GPTConfig) -> dict[str, Any]:
    """generation_config.json of a language model: greedy (fastgpt generate's default), and
    on GPT-2's vocabulary <|endoftext|> as bos and eos (generation stops there) and as the
    padding of batched prompts (GPT-2 has no padding token)."""
    eot = GPT2_EOT_ID if uses_gpt2_vocab(config) else None
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "do_sample": False}


# --- tensors: ours -> Hugging Face's -----------------------------------------------------


def _hf_name(name: str, head: str) -> str | None:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    if name in ("out_head.weight", "out_head.bias"):
        return f"{head}.{name.rsplit('.', 1)[1]}"
    match = _BLOCK_NAME.match(name)
    if match and match.group(2) in _OUR_BLOCK_NAMES:
        return f"transformer.h.{match.group(1)}.{_OUR_BLOCK_NAMES[match.group(2)]}"
    return None


def fastgpt_to_hf(
    state: dict[str, torch.Tensor], config: GPTConfig, head_kind_: str
) -> dict[str, torch.Tensor]:
    """Our state dict (a tied head already left out) in GPT2LMHeadModel's names and Conv1D
    layout (every 2-D block weight transposed to (in, out)). A model without q/k/v biases
    gets zero ones. ValueError naming the tensors that have no Hugging Face name (e.g. those
    of LoRA adapters: merge them or use `save_pretrained_with_lora`)."""
    head = head_tensor_prefix(head_kind_)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        hf = _hf_name(name, head)
        if hf is None:
            unknown.append(name)
        elif hf.startswith("transformer.h.") and tensor.dim() == 2:
            out[hf] = tensor.t().contiguous()  # nn.Linear (out, in) -> Conv1D (in, out)
        else:
            out[hf] = tensor
    if unknown:
        raise ValueError(
            f"cannot save tensors without a GPT-2 name: {', '.join(sorted(unknown))} (LoRA "
            "adapters? save with fastgpt.lora.save_pretrained_with_lora or merge_lora first)"
        )
    for i in range(config.n_layers):
        weight = out[f"transformer.h.{i}.attn.c_attn.weight"]  # (d, 3d)
        out.setdefault(f"transformer.h.{i}.attn.c_attn.bias", weight.new_zeros(weight.shape[1]))
    return out


def drop_zero_qkv_bias(tensors: dict[str, torch.Tensor], config: GPTConfig) -> GPTConfig:
    """For a config without q/k/v biases (our "qkv_bias": false): drop the zero biases the
    Hugging Face layout carries, in place. Nonzero ones (trained in transformers) are kept and
    the returned config has qkv_bias=True, so that the model loads as it computes."""
    if config.qkv_bias:
        return config
    names = [f"trf_blocks.{i}.att.qkv.bias" for i in range(config.n_layers)]
    present = [n for n in names if n in tensors]
    if any(torch.count_nonzero(tensors[n]) for n in present):
        return GPTConfig.from_dict({**config.to_dict(), "qkv_bias": True})
    for name in present:
        del tensors[name]
    return config


# --- LoRA adapters in PEFT's layout -------------------------------------------------------


def hf_module_name(ours: str, classifier: bool) -> str:
    """Our module name (trf_blocks.0.att.qkv, out_head) -> transformers' (transformer.h.0.attn.
    c_attn, lm_head or score); ValueError for a module GPT-2 does not have."""
    if ours == "out_head":
        return "score" if classifier else "lm_head"
    match = _BLOCK_NAME.match(ours)
    if not match or match.group(2) not in HF_MODULES:
        raise ValueError(f"no GPT-2 module corresponds to {ours!r}")
    return f"transformer.h.{match.group(1)}.{HF_MODULES[match.group(2)]}"


def our_module_name(hf: str) -> str:
    """The inverse of `hf_module_name`; ValueError for a module fastgpt has no adapter for."""
    if hf in ("lm_head", "score"):
        return "out_head"
    match = _HF_BLOCK_MODULE.match(hf)
    inverse = {v: k for k, v in HF_MODULES.items()}
    if not match or match.group(2) not in inverse:
        raise ValueError(f"fastgpt has no LoRA target for the module {hf!r}")
    return f"trf_blocks.{match.group(1)}.{inverse[match.group(2)]}"


def peft_tensor_name(hf_module: str, part: str) -> str:
    """PEFT's saved name of an adapter matrix: part "lora_A" or "lora_B"."""
    return f"{PEFT_PREFIX}{hf_module}.{part}.weight"


def peft_target_modules(wrapped: list[str], candidates: list[str]) -> list[str]:
    """PEFT's target_modules for the adapted HF module names `wrapped` out of all adaptable
    `candidates`: the short names ("c_attn", "c_proj", "c_fc", ...) when they select exactly
    `wrapped`, else the full names (PEFT matches a name or a dotted suffix of it)."""
    short = sorted({name.rsplit(".", 1)[-1] for name in wrapped})
    selected = {c for c in candidates if c.rsplit(".", 1)[-1] in short}
    return short if selected == set(wrapped) else sorted(wrapped)


def peft_adapter_config(
    rank: int, alpha: float, targets: list[str], causal_lm: bool, base_model: str
) -> dict:
    """adapter_config.json of LoRA adapters in PEFT's format (scaling alpha / rank as ours,
    no dropout, Conv1D weights stored (in, out): fan_in_fan_out) for the model `base_model`
    (a folder or a hub name: what `peft.AutoPeftModelForCausalLM` loads them onto)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if causal_lm else None,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "fan_in_fan_out": True,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def read_peft_adapter_config(info: dict[str, Any]) -> tuple[int, float]:
    """(rank, alpha) of a PEFT adapter_config.json; ValueError for a variant fastgpt's
    LoRALinear does not compute (rsLoRA, DoRA, per-module ranks, trained biases, ...)."""
    if info.get("peft_type") != "LORA":
        raise ValueError(f"not a LoRA adapter (peft_type {info.get('peft_type')!r})")
    unsupported = [
        key
        for key, ok in (
            ("use_rslora", not info.get("use_rslora")),
            ("use_dora", not info.get("use_dora")),
            ("rank_pattern", not info.get("rank_pattern")),
            ("alpha_pattern", not info.get("alpha_pattern")),
            ("bias", info.get("bias", "none") == "none"),
            ("modules_to_save", not info.get("modules_to_save")),
        )
        if not ok
    ]
    if unsupported:
        raise ValueError(f"unsupported LoRA options for fastgpt: {', '.join(unsupported)}")
    return int(info["r"]), float(info["lora_alpha"])
