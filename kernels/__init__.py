"""Triton kernels for GPT training, each with forward and backward passes.

    from fastgpt.kernels import layer_norm, gelu, bias_gelu, attention
    from fastgpt.kernels import LayerNorm, GELU

Depends on torch and triton only. Each op has a plain-PyTorch reference beside it
(`layer_norm_reference`, `add_layer_norm_reference`, `gelu_reference`, `attention_reference`),
used by the tests and by `fastgpt`'s `backend="torch"`. See `kernels/_dispatch.py` for when
the Triton kernel runs.
"""

if __name__ == "kernels":
    # This folder found as a top-level package: a fastgpt source checkout on sys.path (pytest,
    # `python` run in the checkout). The name is Hugging Face's kernel hub's, and transformers
    # probes it by importing it: stay an empty package (no version, so transformers takes the
    # hub as absent), lest every op be defined a second time beside fastgpt.kernels's.
    __all__: list[str] = []
else:
    from .attention import attention, attention_reference
    from .attention_varlen import (
        attention_varlen,
        attention_varlen_dropout_mask,
        attention_varlen_reference,
    )
    from .cross_entropy import (
        fused_linear_cross_entropy,
        fused_linear_cross_entropy_reference,
    )
    from .decode_attention import decode_attention, decode_attention_reference
    from .fused_add_layer_norm import add_layer_norm, add_layer_norm_reference
    from .gelu import GELU, bias_gelu, bias_gelu_reference, gelu, gelu_reference
    from .layer_norm import LayerNorm, layer_norm, layer_norm_reference

    __all__ = [
        "GELU",
        "LayerNorm",
        "add_layer_norm",
        "add_layer_norm_reference",
        "attention",
        "attention_reference",
        "attention_varlen",
        "attention_varlen_dropout_mask",
        "attention_varlen_reference",
        "bias_gelu",
        "bias_gelu_reference",
        "decode_attention",
        "decode_attention_reference",
        "fused_linear_cross_entropy",
        "fused_linear_cross_entropy_reference",
        "gelu",
        "gelu_reference",
        "layer_norm",
        "layer_norm_reference",
    ]
