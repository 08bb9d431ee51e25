"""Triton kernels for GPT training, each with forward and backward passes.

    from fastgpt.kernels import layer_norm, gelu, bias_gelu, attention
    from fastgpt.kernels import LayerNorm, GELU

Depends on torch and triton only. Each op has a plain-PyTorch reference beside it
(`layer_norm_reference`, `add_layer_norm_reference`, `gelu_reference`, `attention_reference`),
used by the tests and by `fastgpt`'s `backend="torch"`. See `kernels/_dispatch.py` for when
the Triton kernel runs.
"""

if __name__ == "kernels":
    # This folder was found as the top-level package `kernels`: a fastgpt source checkout is on
    # sys.path (pytest, `python` run in the checkout, PYTHONPATH=<checkout>). That name belongs to
    # Hugging Face's kernel hub, which transformers imports whenever its distribution is
    # installed. Load that package in this one's place (`import` returns what sys.modules holds
    # once this file has run); without it, stay an empty package that has no submodules, so no
    # op is ever defined a second time beside fastgpt.kernels's. Standard library only.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    __all__: list[str] = []
    _checkout = _os.path.realpath(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.realpath(p or ".") != _checkout]
    )
    if _spec is not None and _spec.loader is not None:
        _sys.modules[__name__] = _util.module_from_spec(_spec)
        _spec.loader.exec_module(_sys.modules[__name__])  # if it raises, `import` drops the name
    else:
        __path__: list[str] = []  # kernels.flash_attention would define every op again

        def __getattr__(name: str):
            raise AttributeError(
                f"module 'kernels' has no attribute {name!r}: this is fastgpt's kernels/ folder, "
                "found as a top-level package because a fastgpt checkout is on sys.path; "
                "import fastgpt.kernels"
            )
else:
    from .activation import GELU, bias_gelu, bias_gelu_reference, gelu, gelu_reference
    from .cross_entropy import (
        fused_linear_cross_entropy,
        fused_linear_cross_entropy_reference,
    )
    from .flash_attention import attention, attention_reference
    from .flash_attention_varlen import (
        attention_varlen,
        attention_varlen_dropout_mask,
        attention_varlen_reference,
    )
    from .flash_core import DROPOUT_LEVELS, DROPOUT_RANGE, kernel_dropout_p
    from .flash_decoding import decode_attention, decode_attention_reference
    from .fused_add_layer_norm import add_layer_norm, add_layer_norm_reference
    from .normalization import LayerNorm, layer_norm, layer_norm_reference

    __all__ = [
        "DROPOUT_LEVELS",
        "DROPOUT_RANGE",
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
        "kernel_dropout_p",
        "layer_norm",
        "layer_norm_reference",
    ]
