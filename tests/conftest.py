"""Test set-up shared by every test file.

Without CUDA, Triton kernels run through Triton's interpreter on CPU tensors. The interpreter
must be switched on before any `@triton.jit` function is defined, so it is set here, before the
tests import `fastgpt.kernels`.
"""

import os

# Under pytest-xdist each worker (and each process a test starts) would run one torch thread per
# core, so two workers on CI's two cores oversubscribe them: the CLI tests ran ~3x slower. One
# thread each; set before torch is imported so that OpenMP reads it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # in case a plugin imported torch before this file
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA not available)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path_factory, monkeypatch):
    """Every test gets an empty FASTGPT_CACHE_DIR of its own: nothing is written to the user's
    ~/.cache, and no test passes or fails on what another cached before it (the CLI's token
    cache, above all, which tokenizes, with a progress bar, only when cold)."""
    monkeypatch.setenv("FASTGPT_CACHE_DIR", str(tmp_path_factory.mktemp("fastgpt-cache")))


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every kernel output starts as nan: the launchers allocate through their module's `_empty`
    (kernels/_dispatch.py's empty_output), swapped here for a nan-filled allocator in every
    loaded fastgpt.kernels module, so an element a kernel forgets to write shows (a fresh
    torch.empty is often 0, the very value a row that sees no key must get)."""
    import sys

    import fastgpt.kernels  # noqa: F401  (every op module loaded)

    def nan_filled(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for name, module in list(sys.modules.items()):
        if name.startswith("fastgpt.kernels.") and hasattr(module, "_empty"):
            monkeypatch.setattr(module, "_empty", nan_filled)


@pytest.fixture
def device() -> str:
    """Where kernel tests run: the GPU when there is one, else CPU through the interpreter."""
    return DEVICE


@pytest.fixture
def data_dir():
    """The folder holding the-verdict.txt, SMSSpamCollection and instruction-data.json.

    Set FASTGPT_DATA_DIR (CI points it at ../shared/data); tests that need it skip otherwise.
    """
    path = os.environ.get("FASTGPT_DATA_DIR")
    if not path or not os.path.isdir(path):
        pytest.skip("FASTGPT_DATA_DIR is not set to a folder with the data files")
    from pathlib import Path

    return Path(path)


@pytest.fixture
def tiktoken_available():
    """Skip unless tiktoken can load the GPT-2 BPE (cached via TIKTOKEN_CACHE_DIR offline)."""
    try:
        import tiktoken

        tiktoken.get_encoding("gpt2")
    except Exception as exc:  # no network and no cache
        pytest.skip(f"GPT-2 BPE not available: {exc}")
