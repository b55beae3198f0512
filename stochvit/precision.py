"""Device and numeric precision: bf16 autocast where the hardware runs it natively and it pays, fp32 weights always.

On a CPU, bf16 autocast adds a cast around every matmul, which only pays once the matmuls are large. Measured on a
2-core AMD EPYC with avx512_bf16 (benchmarks/results/throughput-*.json): vit_tiny_patch4_32 (width 192) trains 1.35x
faster in bf16 than fp32, but the digits model (width 64) trains 2x *slower*. So `auto` on a CPU keeps models narrower
than CPU_BF16_MIN_WIDTH in fp32.
"""

from __future__ import annotations

import contextlib
import warnings
from functools import lru_cache

import torch

PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_MIN_WIDTH = 128  # between the measured loss (width 64) and gain (width 192)


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


def model_width(model: torch.nn.Module) -> int | None:
    """The token width (timm's `embed_dim`) of the first module that has one."""
    return next((m.embed_dim for m in model.modules() if isinstance(getattr(m, "embed_dim", None), int)), None)


def resolve_precision(precision: str, device: torch.device, model: torch.nn.Module | None = None) -> str:
    """The precision `precision` means here: `auto` is bf16 on CUDA, and on CPUs with native bf16 for models at least
    CPU_BF16_MIN_WIDTH wide (narrower, or unknown width with no model given: see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("bf16 autocast on a CPU without AVX512-BF16 or AMX is emulated: measured here (AMD EPYC, AVX2 only) "
                      "a vit_tiny_patch4_32 training step took 30 s instead of 1.2 s in fp32; use --precision auto",
                      stacklevel=2)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    width = model_width(model) if model is not None else None
    return "bf16" if cpu_has_native_bf16() and (width is None or width >= CPU_BF16_MIN_WIDTH) else "fp32"


def autocast(precision: str, device: torch.device, model: torch.nn.Module | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast where `resolve_precision(precision, device, model)` says bf16, otherwise a no-op."""
    if resolve_precision(precision, device, model) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
