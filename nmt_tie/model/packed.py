"""Linear layers packed for translation on a CPU.

An nn.Linear multiplies through MKL (fp32) or oneDNN (bf16) with its weight in the plain
layout: the library packs blocks of it anew for every product, and the bias is a pass of
its own (addmm first copies it into every output row). A `PackedLinear` holds the weight
reordered once into oneDNN's blocked layout and has the product add the bias, and apply a
following relu, as it writes its output: `torch.ops.mkldnn._linear_pointwise`, the kernel
torch.compile's CPU inference path (freezing) calls.

`translate` packs in bf16 on a CPU. On the 2-core AMD machine, Multi30k test2016, beam 5, the
converged decoder-tied Transformer, old and new code in turn, twice: bf16 2,145 / 2,200 ->
2,345 / 2,487 pieces/s (+9% / +13%), peak memory 952 / 993 -> 1,032 / 978 MB, the same
translations. Not in fp32: +4% (1,759 / 1,657 -> 1,837 / 1,719) for 90-175 MB more peak
memory (oneDNN keeps fp32 kernels per shape, where MKL, fp32's default, keeps none; a packed
output product also makes a fresh scores tensor every step instead of writing into search's
kept buffer: another 130 MB). Measured again later: warm (the same 1,000 lines translated
again in one process, alternated) packing all fp32 layers gave 1.085x, the linear layers
alone 1.06x; but one `nmt-tie translate` of those lines gained nothing (10.3 / 10.3 s
packed, 10.2 / 10.9 s not), as oneDNN first builds an fp32 kernel per new shape (~2 ms
each: a 1,000 x 256 by 256 x 1,024 product took 4.7 ms the first time, 2.7 ms after; MKL
3.4-3.7 ms every time), and peaked 150-190 MB higher. Products alone (fp32): 1,440 x 256 by
256 x 1,024 (the feed-forward layer) 3.97 -> 3.58 ms, 560 x 256 by 256 x 8,000 (an output
layer) 13.9 -> 11.3 ms; results equal to 3e-6.

The packed weights are copies for inference: a packed model is not for training (its
linear layers have no parameters left).
"""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.cache
def packing_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear kernels (CPU builds with mkldnn)."""
    kernels = ("_linear_pointwise", "_reorder_linear_weight")
    return torch.backends.mkldnn.is_available() and all(hasattr(torch.ops.mkldnn, k) for k in kernels)


# The row count oneDNN chooses the weight's layout for; any count works with it.
TYPICAL_ROWS = 1024


class PackedLinear(nn.Module):
    """y = x W^T + b (then relu with `activation="relu"`), W packed once for the CPU."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        with torch.no_grad():
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), TYPICAL_ROWS)
            self.bias = None if bias is None else bias.detach().to(dtype)

    @classmethod
    def of(cls, linear: nn.Linear, dtype: torch.dtype) -> PackedLinear:
        return cls(linear.weight.detach(), linear.bias, dtype)

    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        # explicit casts: autocast does not know this kernel (it casts as autocast would)
        return torch.ops.mkldnn._linear_pointwise(
            x.to(self.dtype), self.packed_weight, self.bias, activation, [], ""
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"


def pack_linear_layers(module: nn.Module, dtype: torch.dtype) -> None:
    """Replace every nn.Linear inside `module` by its PackedLinear."""
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, PackedLinear.of(child, dtype))
        else:
            pack_linear_layers(child, dtype)
