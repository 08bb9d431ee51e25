"""fastgpt: a fast, readable GPT-2 training codebase on hand-written Triton kernels.

    import fastgpt
    model = fastgpt.GPTModel.from_pretrained("gpt2")
    ids = fastgpt.generate(model, token_ids, max_new_tokens=50, top_k=50, temperature=0.8)

The names below are imported on first use, so that `import fastgpt` (and `fastgpt --help`)
does not pay for importing torch.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastgpt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

# public name -> module that defines it
_LAZY_NAMES = {
    "GPTConfig": "fastgpt.config",
    "GPTModel": "fastgpt.model",
    "generate": "fastgpt.generation",
    "patch_hf_gpt2": "fastgpt.hf_patch",
    "get_tokenizer": "fastgpt.tokenizer",
    "text_to_token_ids": "fastgpt.tokenizer",
    "token_ids_to_text": "fastgpt.tokenizer",
}
__all__ = ["__version__", *_LAZY_NAMES]


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        return getattr(import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'fastgpt' has no attribute {name!r}")
