"""Running an op forward and backward in the tests: one helper for every kernel test."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def outputs_and_grads(
    fn: Callable,
    inputs: Sequence[torch.Tensor | None],
    grads: torch.Tensor | Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """fn(*leaves), backpropagated from `grads` (one upstream gradient per output, cast to the
    output's dtype and device): [*outputs, *the gradient of each input that is not None].

    The leaves are detached views of `inputs`, not clones (a clone of a sliced tensor is
    contiguous), so a strided input reaches the op strided; a None input is passed as None."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    grads = [grads] if isinstance(grads, torch.Tensor) else list(grads)
    upstream = [g.to(o.device, o.dtype) for g, o in zip(grads, outputs, strict=True)]
    torch.autograd.backward(outputs, upstream)
    return [o.detach() for o in outputs] + [t.grad for t in leaves if t is not None]
