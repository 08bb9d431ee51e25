"""The one tolerance rule every numerical comparison uses (after flash-attention's tests).

A kernel in a low-precision dtype cannot beat the rounding of that dtype, so its error is judged
against what PyTorch itself achieves in the same dtype:

    err(kernel)  = max |kernel(x) - ref64(x)|
    err(pytorch) = max |torch_same_dtype(x) - ref64(x)|
    pass  iff  err(kernel) <= k * err(pytorch) + floor

where ref64 is the reference computed in float64 (so even fp32 has a nonzero PyTorch error),
k = 2 for forward outputs and 3 for gradients (backward passes chain more roundings), and
floor = FLOOR_ULPS * eps(dtype) * max(1, max |ref64|): a few units in the last place of the
largest value, so that an exact PyTorch result (error 0) does not demand an exact kernel.

The test suite uses `assert_close_to_reference` (through tests/tolerance.py); `fastgpt selftest`
uses `compare`, which returns the numbers instead of raising.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

K_FORWARD = 2.0
K_BACKWARD = 3.0
FLOOR_ULPS = 4.0


def max_abs_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |actual - reference|, with nan/inf positions required to match exactly."""
    a = actual.detach().double().cpu()
    r = reference.detach().double().cpu()
    assert a.shape == r.shape, f"shape {tuple(a.shape)} != reference {tuple(r.shape)}"
    special = ~torch.isfinite(r)
    if special.any():
        torch.testing.assert_close(a[special], r[special], equal_nan=True, rtol=0, atol=0)
    finite = ~special
    if not finite.any():
        return 0.0
    assert torch.isfinite(a[finite]).all(), "non-finite values where the reference is finite"
    return (a[finite] - r[finite]).abs().max().item()


@dataclass(frozen=True)
class Comparison:
    """One application of the rule: the kernel's and PyTorch's errors, k, floor and bound."""

    name: str
    err_kernel: float
    err_torch: float
    k: float
    floor: float

    @property
    def bound(self) -> float:
        return self.k * self.err_torch + self.floor

    @property
    def passed(self) -> bool:
        return self.err_kernel <= self.bound

    def message(self, dtype: torch.dtype) -> str:
        relation = "<=" if self.passed else ">"
        return (
            f"{self.name} ({dtype}): kernel error {self.err_kernel:.3e} {relation} bound "
            f"{self.bound:.3e} = {self.k} x PyTorch's error {self.err_torch:.3e} "
            f"+ floor {self.floor:.3e}"
        )


def compare(
    actual: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    reference64: torch.Tensor,
    *,
    dtype: torch.dtype,
    backward: bool = False,
    name: str = "output",
) -> Comparison:
    """Apply the module rule; raises AssertionError only for mismatched nan/inf or shapes."""
    k = K_BACKWARD if backward else K_FORWARD
    finite_ref = reference64[torch.isfinite(reference64)]
    scale = max(1.0, finite_ref.abs().max().item()) if finite_ref.numel() else 1.0
    floor = FLOOR_ULPS * torch.finfo(dtype).eps * scale
    err_kernel = max_abs_error(actual, reference64)
    err_torch = max_abs_error(torch_same_dtype, reference64)
    return Comparison(name, err_kernel, err_torch, k, floor)


def assert_close_to_reference(
    actual: torch.Tensor, torch_same_dtype: torch.Tensor, reference64: torch.Tensor, **options
) -> None:
    """Assert the module rule above (options as `compare`'s: dtype, backward, name); the
    message shows both errors and the bound."""
    result = compare(actual, torch_same_dtype, reference64, **options)
    assert result.passed, result.message(options["dtype"])
