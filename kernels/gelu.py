"""GELU, tanh approximation. (STUB: the Triton kernel is being written.)"""

from __future__ import annotations

import math

import torch
from torch import nn


def gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """The book's GELU: 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³))), computed in fp32."""
    xf = x.float()
    y = 0.5 * xf * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (xf + 0.044715 * xf.pow(3))))
    return y.to(x.dtype)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return gelu_reference(x + bias)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return gelu_reference(x)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return bias_gelu_reference(x, bias)


class GELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x)
