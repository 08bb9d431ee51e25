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
module's dropout in training. A boolean mask that is exactly that causal triangle and one
contiguous run of real keys per row (padding on the left, the right or both; `padding_plan`
checks it element by element) runs on the varlen kernel: the real query rows and real keys of
each row are packed (cu_seqlens from the runs' lengths), attend causally within their run, and
are scattered back (`padded_attention`). The padding query rows keep eager's values: a row
after the run sees every real key and a row before it sees none (eager's additive mask then
gives a uniform softmax over all keys); both are computed as eager does on those rows alone.
Any other mask (holes in the padding, a static cache, a custom 4-D or float mask, under
torch.compile) runs as transformers' eager attention does (`masked_attention`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from fastgpt.kernels import attention, attention_varlen, bias_gelu, gelu, layer_norm
from fastgpt.kernels.flash_attention import SUPPORTED_HEAD_DIMS

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
    cross-attention). A padding mask (`padding_plan`): `padded_attention` (attention_varlen);
    any other mask: `masked_attention` (transformers' eager math)."""
    if attention_mask is not None:
        plan = padding_plan(module, query, key, attention_mask)
        if plan is None:
            return masked_attention(module, query, key, value, attention_mask, scaling, dropout)
        return padded_attention(module, query, key, value, attention_mask, plan, scaling, dropout)
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


@dataclass
class PaddingPlan:
    """Where the real rows of a padded batch are, for `padded_attention` (built on the host).

    real_q (Nq,) / real_k (Nk,): flat row indices into (B·Tq) queries / (B·Tk) keys of the
    real query rows and real keys, sequence by sequence; cu_q / cu_k (B + 1,) int32 their
    prefix sums; max_q / max_k the longest. pad_rows: [(b, query indices (n,))] of the rows
    outside the runs, computed as eager does."""

    real_q: torch.Tensor
    real_k: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    pad_rows: list[tuple[int, torch.Tensor]]


def padding_plan(module, query, key, mask) -> PaddingPlan | None:
    """A `PaddingPlan` when `mask` (B or 1, 1, Tq, Tk), boolean, True = attend, is exactly
    the causal triangle (queries the last Tq key positions) AND one contiguous run [s_b, e_b)
    of real keys in each row b, i.e. left, right or both-sided padding; None otherwise (also
    for cross-attention, a float mask and under torch.compile, whose shapes cannot depend on
    the mask). Its few host syncs are paid once per mask: transformers hands every layer of a
    forward the same mask tensor, so the last plan is kept for it (`_PlanMemo`)."""
    if (
        not getattr(module, "is_causal", True)
        or mask.dtype != torch.bool
        or mask.dim() != 4
        or mask.shape[1] != 1
        or torch.compiler.is_compiling()
    ):
        return None
    b, tq, tk = query.shape[0], query.shape[2], key.shape[2]
    if tq > tk or mask.shape[0] not in (1, b) or tuple(mask.shape[2:]) != (tq, tk):
        return None
    key_of_plan = (b, query.device)
    if _plan_memo.holds(mask, key_of_plan):
        return _plan_memo.plan
    plan = _build_padding_plan(mask, b, tq, tk, query.device)
    _plan_memo.keep(mask, key_of_plan, plan)
    return plan


class _PlanMemo:
    """The last mask `padding_plan` read (weakly: a freed mask is never matched), its
    in-place version counter, (batch, device), and the plan (or None) it gave."""

    def __init__(self):
        self.entry = None  # (weakref to the mask, its _version, key)
        self.plan: PaddingPlan | None = None

    def holds(self, mask: torch.Tensor, key) -> bool:
        if self.entry is None:
            return False
        mask_ref, version, saved_key = self.entry
        return mask_ref() is mask and version == mask._version and saved_key == key

    def keep(self, mask: torch.Tensor, key, plan: PaddingPlan | None) -> None:
        self.entry, self.plan = (weakref.ref(mask), mask._version, key), plan


_plan_memo = _PlanMemo()


def _build_padding_plan(mask, b, tq, tk, device) -> PaddingPlan | None:
    """`padding_plan`'s element-by-element check of mask (B or 1, 1, Tq, Tk) and the plan."""
    mask = mask[:, 0].expand(b, tq, tk)  # (B, Tq, Tk)
    valid = mask[:, -1, :]  # (B, Tk): the last query, at position Tk - 1, sees every real key
    j = torch.arange(tk, device=mask.device)
    causal = j[None, :] <= torch.arange(tq, device=mask.device)[:, None] + (tk - tq)  # (Tq, Tk)
    count = valid.sum(-1)  # (B,)
    start = torch.where(valid, j, tk).amin(-1).clamp(max=tk)  # first real key (Tk if none)
    end = torch.where(valid, j + 1, 0).amax(-1)  # one past the last real key (0 if none)
    runs = (count == 0) | (end - start == count)  # (B,) one contiguous run of real keys
    if not (bool(runs.all()) and torch.equal(mask, causal[None] & valid[:, None, :])):
        return None
    real_q, real_k, pad_rows, lengths_q, lengths_k = [], [], [], [0], [0]
    offset = tk - tq  # query i is key position i + offset
    for row, (s, e) in enumerate(zip(start.tolist(), end.tolist(), strict=True)):
        if e <= s:
            s = e = tk  # no real key: every query row is padding
        q0, q1 = max(s, offset) - offset, max(e, offset) - offset  # real query rows [q0, q1)
        real_q.append(torch.arange(q0, q1) + row * tq)
        real_k.append(torch.arange(s, e) + row * tk)
        lengths_q.append(q1 - q0)
        lengths_k.append(e - s)
        pads = torch.cat([torch.arange(0, q0), torch.arange(q1, tq)])
        if pads.numel():
            pad_rows.append((row, pads.to(device)))
    return PaddingPlan(
        real_q=torch.cat(real_q).to(device),
        real_k=torch.cat(real_k).to(device),
        cu_q=torch.tensor(lengths_q, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device),
        cu_k=torch.tensor(lengths_k, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device),
        max_q=max(lengths_q),
        max_k=max(lengths_k),
        pad_rows=pad_rows,
    )


def padded_attention(module, query, key, value, mask, plan: PaddingPlan, scaling, dropout):
    """Attention of a padded batch: q (B, H, Tq, D), k/v (B, H, Tk, D) -> ((B, Tq, H, D),
    None). The real rows of each sequence through `attention_varlen` (packed, causal within
    their run), the padding query rows through `masked_attention` on those rows alone (eager's
    values there, as the module docstring says)."""
    b, h, tq, d = query.shape
    tk = key.shape[2]
    q = query.transpose(1, 2).reshape(b * tq, h, d)  # (B·Tq, H, D)
    k = key.transpose(1, 2).reshape(b * tk, h, d)  # (B·Tk, H, D)
    v = value.transpose(1, 2).reshape(b * tk, h, d)
    real = attention_varlen(
        q[plan.real_q], k[plan.real_k], v[plan.real_k], plan.cu_q, plan.cu_k,
        plan.max_q, plan.max_k, causal=True, sm_scale=scaling, dropout_p=dropout,
    )  # (Nq, H, D)  # fmt: skip
    out = real.new_zeros(b * tq, h, d).index_copy(0, plan.real_q, real)
    if plan.pad_rows:
        mask = mask.expand(b, 1, tq, tk)
        pieces = [
            masked_attention(
                module, query[i : i + 1, :, rows], key[i : i + 1], value[i : i + 1],
                mask[i : i + 1, :, rows], scaling, dropout,
            )[0][0]  # (n, H, D)
            for i, rows in plan.pad_rows
        ]  # fmt: skip
        rows = torch.cat([i * tq + rows for i, rows in plan.pad_rows])
        out = out.index_copy(0, rows, torch.cat(pieces).to(out.dtype))
    return out.view(b, tq, h, d), None


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
    """Register "fastgpt" with transformers' attention and mask interfaces; returns the name.
    ImportError for a transformers older than 5.4, whose mask interface passes cache_position
    where `fastgpt_attention_mask` takes q_length/q_offset."""
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if tuple(int(n) for n in transformers.__version__.split(".")[:2]) < (5, 4):
        raise ImportError(
            f"patch_hf_gpt2 needs transformers >= 5.4 (found {transformers.__version__}): "
            "pip install -U transformers"
        )
    AttentionInterface.register(ATTENTION_NAME, fastgpt_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, fastgpt_attention_mask)
    return ATTENTION_NAME


# --- the patch ---------------------------------------------------------------------------


def _gpt2_body(model: nn.Module) -> nn.Module:
    try:
        from transformers import GPT2Model
    except ImportError:
        raise RuntimeError(
            "patch_hf_gpt2 needs transformers (pip install -e '.[hf]' in a checkout)"
        ) from None
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
