"""fastgpt: a fast, readable GPT-2 training codebase on hand-written Triton kernels.

    import fastgpt
    model = fastgpt.GPTModel.from_pretrained("gpt2")
    ids = fastgpt.generate(model, token_ids, max_new_tokens=50, top_k=50, temperature=0.8)

The names below are imported on first use, so that `import fastgpt` (and `fastgpt --help`)
does not pay for importing torch.
"""

import importlib.abc
import importlib.util
import sys
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("fastgpt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

# The wheel installs the repository's kernels/ and benchmarks/ folders as fastgpt.kernels and
# fastgpt.benchmarks (pyproject.toml), so `fastgpt` is its only top-level name. A source checkout
# run with PYTHONPATH=. has them beside fastgpt/ instead: give them the same names there.
_CHECKOUT = Path(__file__).resolve().parent.parent
_MAPPED = {"fastgpt.kernels": "kernels", "fastgpt.benchmarks": "benchmarks"}


class _CheckoutFolders(importlib.abc.MetaPathFinder):
    """Finds fastgpt.kernels and fastgpt.benchmarks in a source checkout."""

    def find_spec(self, name, path=None, target=None):
        folder = _CHECKOUT / _MAPPED.get(name, "")
        if name not in _MAPPED or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


if not (Path(__file__).parent / "kernels").is_dir():  # not an installed wheel
    sys.meta_path.insert(0, _CheckoutFolders())

# public name -> module that defines it
_LAZY_NAMES = {
    "GPTConfig": "fastgpt.model_config",
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
