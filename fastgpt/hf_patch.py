"""Our kernels inside Hugging Face's GPT-2 (the idea of Liger-Kernel's apply_liger_kernel_to_*).

    model = transformers.GPT2LMHeadModel.from_pretrained("gpt2")
    fastgpt.patch_hf_gpt2(model)   # in place; returns the model

switches an instance of transformers' `GPT2Model`, or of a model holding one as `.transformer`
(GPT2LMHeadModel, GPT2ForSequenceClassification, ... and subclasses), to

- LayerNorm: every nn.LayerNorm inside it runs `kernels.layer_norm` (class swapped to
  `FastLayerNorm`, parameters and state-dict names unchanged);
- MLP: c_fc's matmul without its bias, then `kernels.bias_gelu` adds the bias and applies GELU
  in one pass (HF's Conv1D computes x @ W + b; a c_fc that is no Conv1D, e.g. wrapped by PEFT,
  runs as it is, followed by `kernels.gelu`);
- attention: our flash-attention kernel, registered as the attention implementation "fastgpt"
  of transformers' AttentionInterface (and `model.set_attn_implementation("fastgpt")`).

How attention honours what HF passes it. transformers builds the mask with its SDPA mask
function, which gives None when nothing is masked but the causal triangle; we let it do so
only when the queries are the last positions of the keys (our kernel's bottom-right causal
alignment, right for a DynamicCache in generate()), and then the kernel runs, with the
module's dropout in training. When a mask is present (padding, left or right; a static cache;
a custom 4-D mask) attention runs as transformers' eager attention does (`masked_attention`),
so padded batches give eager's results and gradients, padding rows included. (Our kernel has
no mask input; a varlen kernel would let padded batches run on it too.)
"""

from __future__ import annotations

import torch
from torch import nn

from fastgpt.kernels import attention, bias_gelu, gelu, layer_norm
from fastgpt.kernels.attention import SUPPORTED_HEAD_DIMS

ATTENTION_NAME = "fastgpt"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # the tanh form of GELU


class FastLayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed by `kernels.layer_norm` (1-D normalized shape with affine
    parameters; anything else as nn.LayerNorm does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.bias is None or len(self.normalized_shape) != 1:
            return super().forward(x)
        return layer_norm(x, self.weight, self.bias, self.eps)


def _mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """GPT2MLP.forward with c_fc's bias and the GELU fused into `kernels.bias_gelu`."""
    c_fc = self.c_fc
    if type(c_fc) is self._fastgpt_conv1d:
        h = bias_gelu(torch.matmul(hidden_states, c_fc.weight), c_fc.bias)  # (..., 4d)
    else:  # e.g. a PEFT LoRA layer around it: its own output, then GELU
        h = gelu(c_fc(hidden_states))
    return self.dropout(self.c_proj(h))


_MLP_CLASSES: dict[type, type] = {}


def _fast_mlp_class(cls: type) -> type:
    """A subclass of the MLP class `cls` with the fused forward (one per class, cached)."""
    if getattr(cls, "_fastgpt_patched", False):
        return cls
    if cls not in _MLP_CLASSES:
        from transformers.pytorch_utils import Conv1D

        attrs = {"forward": _mlp_forward, "_fastgpt_patched": True, "_fastgpt_conv1d": Conv1D,
                 "__module__": __name__}  # fmt: skip
        _MLP_CLASSES[cls] = type(f"Fast{cls.__name__}", (cls,), attrs)
    return _MLP_CLASSES[cls]


# --- attention ---------------------------------------------------------------------------


def fastgpt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """transformers' attention-interface function: q (B, H, Tq, D), k/v (B, H, Tk, D) ->
    ((B, Tq, H, D), None). No mask: our flash kernel (causal bottom-right unless the module is
    cross-attention). A mask: `masked_attention`."""
    if attention_mask is not None:
        return masked_attention(module, query, key, value, attention_mask, scaling, dropout)
    causal = getattr(module, "is_causal", True)
    out = attention(query, key, value, causal=causal, sm_scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2), None


def masked_attention(module, query, key, value, mask, scaling, dropout):
    """Attention with a mask (padding, a static cache, a custom 4-D mask) as transformers'
    eager GPT-2 attention computes it, a boolean mask turned into eager's additive one (the
    dtype's minimum where masked), so that padded batches give eager's results (and
    gradients), padding rows included."""
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    if mask.dtype == torch.bool:
        minimum = torch.finfo(query.dtype).min
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~mask, minimum
        )
    out, _ = eager_attention_forward(module, query, key, value, mask, scaling, dropout)
    return out, None


def fastgpt_attention_mask(*, q_length, kv_length, q_offset=0, kv_offset=0, **kwargs):
    """transformers' mask-interface function: its SDPA mask, skipped (None) only where the
    kernel's bottom-right causal alignment is the right one."""
    from transformers.masking_utils import sdpa_mask

    aligned = (
        isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and q_offset + q_length == kv_offset + kv_length
    )
    skip = kwargs.pop("allow_is_causal_skip", True) and aligned
    return sdpa_mask(
        q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        allow_is_causal_skip=skip, **kwargs,
    )  # fmt: skip


def register_attention() -> str:
    """Register "fastgpt" with transformers' attention and mask interfaces; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, fastgpt_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, fastgpt_attention_mask)
    return ATTENTION_NAME


# --- the patch ---------------------------------------------------------------------------


def _gpt2_body(model: nn.Module) -> nn.Module:
    try:
        from transformers import GPT2Model
    except ImportError:
        raise RuntimeError("patch_hf_gpt2 needs transformers (pip install 'fastgpt[hf]')") from None
    body = model if isinstance(model, GPT2Model) else getattr(model, "transformer", None)
    if not isinstance(body, GPT2Model):
        raise TypeError(
            "patch_hf_gpt2 takes a transformers GPT2Model or a model holding one as "
            f".transformer (GPT2LMHeadModel, ...), got {type(model).__name__}"
        )
    return body


def patch_hf_gpt2(
    model: nn.Module, *, layer_norm: bool = True, mlp: bool = True, attention: bool = True
) -> nn.Module:
    """Switch a transformers GPT-2 model (GPT2Model, GPT2LMHeadModel, ... and subclasses) in
    place to our LayerNorm, bias+GELU and flash-attention kernels (each can be left out);
    returns the model. Parameters, state-dict names and outputs stay those of HF's model
    (within the kernels' rounding). TypeError for another model, ValueError for a GPT-2
    variant the kernels do not compute (head dim, activation)."""
    body = _gpt2_body(model)  # first: a clear error without transformers
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    config = body.config
    head_dim = config.n_embd // config.n_head
    if attention and head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head dim {head_dim} is not one our attention kernel supports "
            f"{SUPPORTED_HEAD_DIMS}; patch with attention=False"
        )
    if mlp and config.activation_function not in TANH_GELUS:
        raise ValueError(
            f"activation_function {config.activation_function!r} is not GELU's tanh form "
            f"{TANH_GELUS}; patch with mlp=False"
        )
    for module in body.modules():
        if layer_norm and type(module) is nn.LayerNorm:
            module.__class__ = FastLayerNorm
        elif mlp and isinstance(module, GPT2MLP):
            module.__class__ = _fast_mlp_class(type(module))
    if attention:
        model.set_attn_implementation(register_attention())
    return model
