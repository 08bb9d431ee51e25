"""Triton helpers shared by the row-wise kernels (kernels/normalization.py, cross_entropy.py)."""

import triton
import triton.language as tl


@triton.jit
def program_rows(M, BLOCK_M: tl.constexpr):
    """The BLOCK_M rows of this program (program_id(0)), int64 (offsets of far rows pass
    2³¹), and the mask of those below M: both (BLOCK_M,)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, rows < M
