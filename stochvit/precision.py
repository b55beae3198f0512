"""Device, threads and numeric precision: bf16 autocast where the hardware runs it natively and it pays, fp32 weights
always.

`resolve_device` turns `--device cpu|cuda|cuda:N` (None: CUDA when available) into a torch.device, refusing in one
line a device this machine lacks. `set_threads` is `--threads N`: torch's intra-op (and, while still settable,
inter-op) threads of this process, exported as OMP_NUM_THREADS / MKL_NUM_THREADS to the processes it starts. Without
it torch keeps its own default (one thread per core; the CLI trains the digits models on one, `defaults.default_threads`).
On cores shared with other jobs, OpenMP workers spin at every barrier and lose whole time slices, so `--threads 1` is
the setting that degrades gracefully under load (measured idle and loaded by `benchmarks/throughput.py --sections
threads`; numbers in benchmarks/RESULTS.md).

On a CPU in bf16, timm's attention runs on its explicit path (q @ k^T, softmax, @ v) instead of PyTorch's fused
scaled_dot_product_attention, whose bf16 CPU kernel is slow, above all its backward. Measured side by side on a 2-core
AMD EPYC with avx512_bf16 (benchmarks/RESULTS.md, results/throughput-attention-*.json): a vit_tiny_patch4_32 training
step is 1.76x faster in bf16 than in fp32 with the explicit path, 1.17x with the fused kernel. In fp32 and on CUDA the
fused kernel stays.

`auto` still keeps models narrower than CPU_BF16_MIN_WIDTH in fp32 on a CPU: the width-64 digits model gains only 1.2x
per training step in bf16 even on the explicit path, and the digits demo, 101 s in bf16 vs 114 s in fp32, came out at
test accuracy 0.944 / 0.911 (deterministic / stochastic) instead of 0.961 / 0.956, below the 0.95 the README promises.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from functools import lru_cache

import torch

from .defaults import PRECISIONS
from .errors import UserError

CPU_BF16_MIN_WIDTH = 128  # between the digits model (width 64: little gain, see above) and vit_tiny (192)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:N"; None: `default_device()`) as a torch.device that exists on this machine."""
    if device is None:
        return default_device()
    text = str(device).strip()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise UserError(f"device={text}: expected cpu, cuda or cuda:N")
    d = torch.device(text)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"device={text}: CUDA is not available here ({why}); use device=cpu")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise UserError(f"device={text}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return d


def set_threads(threads: int | None) -> int:
    """Run torch on `threads` intra-op threads (None: leave torch's default); returns the count in use.

    Inter-op threads are set too while torch still allows it (before the process's first parallel work); the
    environment's OMP_NUM_THREADS / MKL_NUM_THREADS carry the count to the processes started afterwards
    (data-loading workers, Flower's SuperNodes).
    """
    if threads is None:
        return torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"threads={threads}: must be an integer >= 1")
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # parallel work already ran in this process (e.g. a second command in one interpreter)
            pass
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    return torch.get_num_threads()


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


@contextlib.contextmanager
def autocast(precision: str, device: torch.device, model: torch.nn.Module | None = None) -> Iterator[None]:
    """bf16 autocast where `resolve_precision(precision, device, model)` says bf16, otherwise a no-op.

    On a CPU in bf16 it also runs `model`'s timm attention on its explicit path (q @ k^T, softmax, @ v: timm's
    `fused_attn=False`) for its duration: see the module docstring. The modules are restored on exit, so fp32 and CUDA
    keep the fused kernel.
    """
    if resolve_precision(precision, device, model) != "bf16":
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
