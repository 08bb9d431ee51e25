"""Triton kernels for GPT training, each with forward and backward passes.

    from fastgpt.kernels import layer_norm, gelu, bias_gelu, attention
    from fastgpt.kernels import LayerNorm, GELU

Depends on torch and triton only. Each op has a plain-PyTorch reference beside it
(`layer_norm_reference`, `gelu_reference`, `attention_reference`), used by the tests and by
`fastgpt`'s `backend="torch"`. See `kernels/_dispatch.py` for when the Triton kernel runs.
"""

from .attention import attention, attention_reference
from .cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from .gelu import GELU, bias_gelu, bias_gelu_reference, gelu, gelu_reference
from .layer_norm import LayerNorm, layer_norm, layer_norm_reference

__all__ = [
    "GELU",
    "LayerNorm",
    "attention",
    "attention_reference",
    "bias_gelu",
    "bias_gelu_reference",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "gelu",
    "gelu_reference",
    "layer_norm",
    "layer_norm_reference",
]
