"""Devices and mixed precision, shared by training and translation."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from contextlib import nullcontext

import torch

from nmt_tie.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r}: give auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name}: CUDA is not available here; use the cpu (or auto)")
    return device


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")


def gpu_has_fast_bf16(device: torch.device) -> bool:
    """Ampere (compute capability 8.0) and later compute in bf16 natively; older GPUs emulate it."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX). Without either, an x86
    CPU's bf16 matrix products are emulated: on a Xeon with AVX-512 but neither, a 4096 x 4096
    bf16 product ran at 62 GFLOP/s against 256-318 in fp32, and bf16 training at 0.29x fp32's
    tokens/s. Other architectures (ARM's bf16 extension) are taken at their word."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if not all(hasattr(torch.cpu, probe) for probe in probes):
        return True  # an older PyTorch cannot tell: keep what was asked for
    return any(getattr(torch.cpu, probe)() for probe in probes)


def effective_dtype(device: torch.device, dtype: str) -> str:
    """The precision actually used: bf16 on a GPU without fast bf16 becomes fp16 (with loss
    scaling in training), which such GPUs (V100, T4) run on their tensor cores; bf16 on a CPU
    without native bf16 becomes fp32, which is several times faster there."""
    check_dtype(dtype)
    if dtype == "bf16" and device.type == "cuda" and not gpu_has_fast_bf16(device):
        return "fp16"
    if dtype == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        return "fp32"
    return dtype


def autocast_context(device: torch.device, dtype: str):
    """Autocast to bf16 or fp16 (on GPUs; on the CPU too, where fp16 is slow but works); nothing
    for fp32."""
    check_dtype(dtype)
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def autocast_active(device_type: str) -> bool:
    """Whether autocast is on for `device_type` here (False where it has no autocast)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def set_tf32(device: torch.device, enabled: bool) -> None:
    """fp32 matrix products on Ampere/Hopper tensor cores (TF32: 10-bit mantissa, fp32 range).
    PyTorch leaves it off for matmuls by default; it makes `dtype: fp32` several times faster."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        torch.backends.cudnn.allow_tf32 = enabled


def describe_precision(device: torch.device, requested: str, used: str, tf32: bool) -> str:
    """One line for the log: what the user asked for and what is in effect."""
    if used == "fp32":
        what = "fp32" + (" with TF32 matrix products" if device.type == "cuda" and tf32 else "")
    else:
        what = f"{used} autocast" + (" with loss scaling" if used == "fp16" else "")
    note = ""
    if used != requested:
        lacks = "this GPU has no fast bf16" if device.type == "cuda" else "this CPU has no AVX512-BF16 or AMX"
        note = f" (asked for {requested}: {lacks})"
    return f"precision: {what} on {device}{note}"


def compiled_graph_count() -> int:
    """Graphs torch.compile has built in this process so far (0 without compile). Compiled
    training builds one for the first batch shape and one with dynamic sizes at the second,
    compiled decoding (`translate --compile`) one for the first position and one or two with
    dynamic sizes; a count that keeps growing means recompilation (TORCH_LOGS=recompiles)."""
    from torch._dynamo.utils import counters  # no public counter in PyTorch yet

    return int(counters["stats"]["unique_graphs"])


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc
        return None


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_THRESHOLD = 1 << 30


def keep_large_tensors_in_heap(device: torch.device) -> None:
    """Let glibc serve large CPU tensors from its heap instead of fresh pages from mmap.

    glibc maps every allocation above its threshold (at most 32 MB) fresh from the kernel
    and unmaps it when freed, so a training update's logits and their gradient (65 MB each
    on Multi30k batches) were page-faulted in anew every update. From the heap their pages
    are reused (after a few updates: an aligned block needs a little more than the one just
    freed, so the first ones do not fit in each other's place). 200 updates and a validation
    ran 4.2% faster in fp32 and 2.7% in bf16 (target tokens/s), at the same peak memory, as
    the trainer gives free pages back when memory has grown (`HeapTrimmer`). Translation
    does not take it: its largest tensors are kept buffers already, and 20,000 piped lines
    peaked 20 MB higher with it.
    Nothing happens on a GPU or without glibc."""
    libc = _glibc() if device.type == "cpu" else None
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, HEAP_THRESHOLD)  # the heap's top: trimmed by our calls


def release_free_memory(device: torch.device) -> None:
    """Give the C heap's free pages back to the operating system (glibc's malloc_trim).

    Batches of many shapes in bf16 on a CPU leave glibc's heap full of free pages: oneDNN
    builds kernels for every new shape and tensors of ever new sizes come and go. glibc
    keeps those pages (it returns only the top of the heap), so the resident memory of a
    bf16 training run grew by about 700 MB every 50 updates and never shrank (measured on
    Multi30k: 1,842 MB before a trim, 1,109 MB after). A trim took 15-60 ms here (a busy
    2-core machine), and the pages it returns are faulted in again when reused: callers trim
    when memory has grown (`HeapTrimmer`), not every step.
    Nothing happens on a GPU or without glibc."""
    libc = _glibc() if device.type == "cpu" else None
    if libc is not None:
        libc.malloc_trim(0)


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_mb() -> float | None:
    """This process's resident memory in MB (Linux), else None."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES / 2**20
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """Trims the C heap (`release_free_memory`) when resident memory has grown by more than
    `margin_mb` since the level it settled at after the last trim.

    A trim every few updates cost training 1-2% in fp32 and ~5% in bf16 (the same batches
    with and without it, alternated in one process), as every update's tensors are paged in
    again after it; and fp32 training with bounded shapes does not grow at all (a run that
    never trimmed peaked no higher). Growth is what bf16 leaves behind (see
    `release_free_memory`): trimmed on growth, 250 bf16 updates trimmed 3-4 times instead
    of 25 and peaked within 5% of trimming every 10 updates. The level is measured at the
    first check after a trim, once the working set of a step is resident again.
    Nothing happens on a GPU or without glibc and /proc."""

    def __init__(self, device: torch.device, margin_mb: float = 64.0):
        self.active = device.type == "cpu" and _glibc() is not None and resident_mb() is not None
        self.device = device
        self.margin_mb = margin_mb
        self.level: float | None = None  # resident MB at the first check after a trim

    def check(self) -> bool:
        """Trim if memory grew by more than the margin; return whether it trimmed."""
        if not self.active:
            return False
        resident = resident_mb()
        if self.level is None or resident is None:
            self.level = resident
            return False
        if resident <= self.level + self.margin_mb:
            return False
        self.trim()
        return True

    def trim(self) -> None:
        """Trim now (after work that leaves much behind, such as a validation)."""
        release_free_memory(self.device)
        self.level = None
