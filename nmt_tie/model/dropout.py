"""Dropout with a mask drawn from random integer bits on the CPU.

On the CPU, `F.dropout` (Bernoulli sampling in floating point) costs about five times
drawing 64-bit random integers and comparing their bytes with a threshold (measured here:
2.1 ms against 0.4 ms for a 1280x256 tensor). The drop probability is rounded to a
multiple of 1/256 (0.1 becomes 26/256 = 0.1016) and the scale uses the rounded value, so
the expectation is preserved exactly. On other devices, and in code torch.compile traces
(where inductor generates the random mask inside the fused kernel), `F.dropout` is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LOW, _HIGH = -(2**63), 2**63 - 1


def _random_bytes(x: torch.Tensor) -> torch.Tensor:
    """One uniformly random byte per element of x, shaped like x."""
    count = x.numel()
    bits = torch.empty((count + 7) // 8, dtype=torch.int64).random_(_LOW, _HIGH)
    return bits.view(torch.uint8)[:count].view(x.shape)


def _keep_mask(x: torch.Tensor, dropped: int) -> torch.Tensor:
    """1 where a random byte is at least `dropped`, else 0, in x's dtype."""
    return torch.ge(_random_bytes(x), dropped, out=torch.empty_like(x))


def _dropped_of_256(p: float) -> int:
    return max(1, round(p * 256))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    dropped = _dropped_of_256(p)
    if dropped >= 256:
        return torch.zeros_like(x)
    # a 0/1 mask of x's own dtype: multiplying by a bool mask takes a mixed-type path, forward
    # and backward (1.2x slower); and the comparison writes it at once (a bool mask converted
    # after took 5-9x as long on a CPU)
    keep = _keep_mask(x, dropped)
    return (x * keep).mul_(256 / (256 - dropped))


class _ReluDropout(torch.autograd.Function):
    """relu then dropout in one function: the output alone decides the gradient (it is zero
    where the output is), so no mask is kept (the next linear layer keeps the output anyway),
    and two passes over the tensor fewer than relu and `dropout` apart (6 against 8, forward
    and backward): fp32 training 1.6-2.1% faster, bf16 within noise, bit for bit the same."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dropped: int) -> torch.Tensor:
        scale = 256 / (256 - dropped)
        out = _keep_mask(x, dropped).mul_(x).relu_().mul_(scale)
        ctx.save_for_backward(out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out, 0).mul_(ctx.scale), None


def relu_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """dropout(relu(x)), the same masks from the same random numbers."""
    if not training or p <= 0.0 or x.device.type != "cpu" or torch.compiler.is_compiling():
        return dropout(F.relu(x), p, training)
    dropped = _dropped_of_256(p)
    if dropped >= 256:
        return torch.zeros_like(x)
    return _ReluDropout.apply(x, dropped)


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
