"""fastgpt: a fast, readable GPT-2 training codebase on hand-written Triton kernels."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastgpt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
