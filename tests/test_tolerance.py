"""The tolerance rule itself must be able to fail."""

import pytest
import torch

from tests.tolerance import assert_close_to_reference


def test_rule_rejects_an_error_far_above_pytorchs():
    ref = torch.linspace(-1, 1, 101, dtype=torch.float64)
    same_dtype = ref.half()
    wrong = same_dtype.clone()
    wrong[50] += 0.05
    assert_close_to_reference(same_dtype, same_dtype, ref, dtype=torch.float16)
    with pytest.raises(AssertionError, match="kernel error"):
        assert_close_to_reference(wrong, same_dtype, ref, dtype=torch.float16)


def test_rule_requires_matching_nan_and_inf():
    ref = torch.tensor([0.0, float("inf"), float("nan")], dtype=torch.float64)
    good = ref.float()
    bad = torch.tensor([0.0, 1.0, float("nan")])
    assert_close_to_reference(good, good, ref, dtype=torch.float32)
    with pytest.raises(AssertionError):
        assert_close_to_reference(bad, good, ref, dtype=torch.float32)


@pytest.mark.usefixtures("nan_outputs")
def test_the_nan_outputs_fixture_reaches_every_kernel_allocator():
    """tests/conftest.py's `nan_outputs`: every op module's output allocator gives nan."""
    import sys

    modules = [m for n, m in sys.modules.items() if n.startswith("fastgpt.kernels.")]
    allocators = [m._empty for m in modules if hasattr(m, "_empty")]
    assert len(allocators) >= 6  # attention, varlen, decode, layer norm, gelu, cross-entropy
    for empty in allocators:
        assert torch.isnan(empty((3,), torch.float32, "cpu")).all()
