"""Device and numeric precision: bf16 autocast where the hardware runs it natively, fp32 weights always.

On a CPU in bf16, timm's attention is run on its explicit path (q @ k^T, softmax, @ v) instead of PyTorch's fused
scaled_dot_product_attention: the fused CPU kernel is slow in bf16, above all its backward. Measured side by side on a
2-core AMD EPYC with avx512_bf16 (benchmarks/RESULTS.md, throughput-attention*.json): with the fused kernel, bf16 made
vit_tiny_patch4_32 train only ~1.3x faster than fp32 and the width-64 digits model 2-4x *slower*; with the explicit path
both train faster in bf16 than in fp32. In fp32 (and on CUDA) the fused kernel stays.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from functools import lru_cache

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX (Linux /proc/cpuinfo flags)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision `precision` means here: `auto` is bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("bf16 autocast on a CPU without AVX512-BF16 or AMX is emulated: measured here (AMD EPYC, AVX2 only) "
                      "a vit_tiny_patch4_32 training step took 30 s instead of 1.2 s in fp32; use --precision auto",
                      stacklevel=2)
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"


@contextlib.contextmanager
def autocast(precision: str, device: torch.device, model: torch.nn.Module | None = None) -> Iterator[None]:
    """bf16 autocast where `resolve_precision(precision, device)` says bf16, otherwise a no-op.

    On a CPU in bf16 it also runs `model`'s timm attention on its explicit path (q @ k^T, softmax, @ v: timm's
    `fused_attn=False`) for its duration: see the module docstring. The modules are restored on exit, so fp32 and CUDA
    keep the fused kernel.
    """
    if resolve_precision(precision, device) != "bf16":
        yield
        return
    explicit = [m for m in model.modules() if getattr(m, "fused_attn", None) is True] \
        if model is not None and device.type == "cpu" else []
    for m in explicit:
        m.fused_attn = False
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    finally:
        for m in explicit:
            m.fused_attn = True
