"""Devices and mixed precision, shared by training and translation."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from nmt_tie.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name}: CUDA is not available here; use --device cpu")
    return device


def autocast_context(device: torch.device, dtype: str):
    """Autocast to bf16 (CPU or GPU) or fp16 (GPU only); nothing for fp32."""
    if dtype not in DTYPES:
        raise UserError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == "fp32":
        return nullcontext()
    if dtype == "fp16" and device.type != "cuda":
        raise UserError("dtype fp16 needs a CUDA device; use bf16 on the CPU")
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])
