"""Token-consistent stochastic linear layers.

A `StochasticLinear` is a linear map on the channel dimension whose parameters are *sampled*, not
learned: a fresh draw at every forward pass, in `train()` and `eval()` alike. With the default
`sharing="image"` one draw is made per image and applied identically to every token of that image,
so relations between tokens (their topology) survive while their values become random.

Written by hand: no library provides a parameter-free, per-sample random linear layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from .defaults import DEFAULT_LAYER, MODES, LayerConfig, check_choice
from .errors import UserError

Kind = Literal["diagonal", "full"]
Sharing = Literal["image", "batch", "token"]
Mode = Literal["on", "mean", "off"]


class RandomAtInference(nn.Module):
    """Base of modules that stay random in eval(); `mode` is "on", "mean" or "off" (see `sampling`)."""

    mode: Mode = "on"


class MCDropout(RandomAtInference):
    """Dropout that is also active in eval() (Monte Carlo dropout); its "mean" is the identity."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p={p} must be in [0, 1)")
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, self.p, training=self.mode == "on")


class StochasticLinear(RandomAtInference):
    """Random linear map on the last dimension of `x` (shape `(B, ..., C)`), resampled every call.

    kind="diagonal": per-channel scale `s` with mean m=(low+high)/2 and variance (high-low)^2/12,
        drawn as U(low, high), as a Gaussian with those moments, or as Bernoulli {0, m/p}
        (token-consistent dropout) with p chosen so that the variance also matches.
    kind="full": dense C x C matrix, zero-mean entries of variance 1/C (norms kept in expectation),
        uniform, Gaussian, or Haar-orthogonal (norms kept exactly). `low`/`high` do not apply.
    sharing: "image" = one draw per image (token-consistent), "batch" = one draw for the batch,
        "token" = an independent draw per token (ablation; diagonal only).
    """

    def __init__(
        self,
        features: int,
        kind: Kind = DEFAULT_LAYER.kind,
        distribution: str = DEFAULT_LAYER.distribution,
        low: float = DEFAULT_LAYER.low,
        high: float = DEFAULT_LAYER.high,
        sharing: Sharing = DEFAULT_LAYER.sharing,
    ) -> None:
        super().__init__()
        if not isinstance(features, int) or features <= 0:
            raise ValueError(f"features must be a positive int, got {features!r}")
        LayerConfig(kind=kind, distribution=distribution, low=low, high=high, sharing=sharing)  # the settings' checks
        self.features = features
        self.kind, self.distribution, self.sharing = kind, distribution, sharing
        self.low, self.high = float(low), float(high)
        self.mean = (self.low + self.high) / 2
        self.var = (self.high - self.low) ** 2 / 12
        if kind == "diagonal" and distribution == "bernoulli":
            # values {0, m/p}: mean m, variance m^2 (1/p - 1) = var  =>  p = m^2 / (m^2 + var)
            self.keep_prob = self.mean**2 / (self.mean**2 + self.var)

    def extra_repr(self) -> str:
        moments = f", low={self.low}, high={self.high}" if self.kind == "diagonal" else ""
        return f"{self.features}, kind={self.kind}, distribution={self.distribution}{moments}, sharing={self.sharing}"

    # -- sampling -------------------------------------------------------------------------------
    def draw_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """Leading shape of one draw: per image, per batch or per token, broadcast over the rest."""
        if self.sharing == "batch":
            return (1,) * (x.dim() - 1)
        if self.sharing == "image":
            return (x.shape[0],) + (1,) * (x.dim() - 2)
        return tuple(x.shape[:-1])

    def sample(self, lead: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Draw parameters: shape `lead + (C,)` for diagonal, `lead + (C, C)` for full."""
        c = self.features
        if self.kind == "diagonal":
            shape = lead + (c,)
            if self.distribution == "uniform":
                return torch.empty(shape, device=device, dtype=dtype).uniform_(self.low, self.high)
            if self.distribution == "gaussian":
                return torch.randn(shape, device=device, dtype=dtype).mul_(math.sqrt(self.var)).add_(self.mean)
            keep = torch.rand(shape, device=device) < self.keep_prob
            return keep.to(dtype) * (self.mean / self.keep_prob)
        shape = lead + (c, c)
        if self.distribution == "uniform":
            a = math.sqrt(3.0 / c)
            return torch.empty(shape, device=device, dtype=dtype).uniform_(-a, a)
        g = torch.randn(shape, device=device, dtype=torch.float32)
        if self.distribution == "gaussian":
            return g.div_(math.sqrt(c)).to(dtype)
        q, r = torch.linalg.qr(g)  # Haar measure needs the sign fix of Mezzadri (2007)
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        return q.to(dtype)

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """A fresh draw for input `x`, in its dtype: shaped to broadcast over `x` (diagonal) or to batch-multiply it."""
        if x.dim() < 2 and self.sharing != "batch":
            raise ValueError(f"sharing={self.sharing!r} needs a batch dimension, got shape {tuple(x.shape)}")
        return self.sample(self.draw_shape(x), x.device).to(x.dtype)

    def _haar_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ Q` for a fresh Haar Q per image (or batch) without forming Q: the Householder QR of a Gaussian
        (`geqrf`, the same draw as `sample`) applied to x by `ormqr`, and Mezzadri's sign fix Q diag(sign r_ii) as a
        sign per output column. Forming Q (`orgqr`) then multiplying took 1.4x as long (C=256, 64 images, 1 CPU thread)."""
        c = self.features
        b = 1 if self.sharing == "batch" else x.shape[0]
        a, tau = torch.geqrf(torch.randn((b, c, c), device=x.device, dtype=torch.float32))
        signs = torch.sign(torch.diagonal(a, dim1=-2, dim2=-1)).unsqueeze(-2)  # R's diagonal: geqrf keeps R above it
        y = torch.ormqr(a, tau, x.reshape(b, -1, c).float(), left=False) * signs
        return y.reshape(x.shape).to(x.dtype)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Apply a fresh draw. `inplace=True` lets the diagonal kind scale `x` in place (callers that own `x`, like
        `StochasticMlp` with fc1's output, skip one activation-sized allocation: ~5% of inference time on a CPU).

        Only where autograd does not record `x`: fc1's output is a view of its matmul's result, and an in-place op on a
        view makes the backward rebuild the base (CopySlices, AsStrided): four activation-sized copies per MLP, a step
        1.08x slower in bf16 training on a 2-core Xeon (benchmarks/inplace_backward.py, numbers in RESULTS.md)."""
        inplace = inplace and not (torch.is_grad_enabled() and x.requires_grad)
        if x.shape[-1] != self.features:
            raise ValueError(f"StochasticLinear expects {self.features} features in the last dim, got shape {tuple(x.shape)}")
        if self.mode == "off":
            return x
        if self.mode == "mean":
            if self.kind == "full":
                raise UserError("mode='mean' is undefined for kind='full': the expected random matrix is zero")
            return x.mul_(self.mean) if inplace else x * self.mean
        if self.kind == "full" and self.distribution == "orthogonal" and self.sharing != "token":
            return self._haar_matmul(x)
        w = self.draw(x)
        if self.kind == "diagonal":
            return x.mul_(w) if inplace else x * w
        if self.sharing == "batch":
            return x @ w.reshape(self.features, self.features)
        b = x.shape[0]
        return torch.bmm(x.reshape(b, -1, self.features), w.reshape(b, self.features, self.features)).reshape(x.shape)


def random_modules(model: nn.Module) -> list[RandomAtInference]:
    """Every module of `model` that is random at inference (stochastic layers, MC dropout)."""
    return [m for m in model.modules() if isinstance(m, RandomAtInference)]


def is_random(model: nn.Module) -> bool:
    """True when repeated forward passes in eval() can differ, i.e. Monte Carlo averaging helps."""
    return any(m.mode == "on" and not (isinstance(m, MCDropout) and m.p == 0) for m in random_modules(model))


@contextmanager
def sampling(model: nn.Module, mode: Mode = "on") -> Iterator[nn.Module]:
    """Temporarily set every random module of `model` to `mode`.

    "on": sample (the default); "mean": the deterministic expected transform; "off": identity.
    """
    check_choice("mode", mode, MODES)
    layers = random_modules(model)
    if mode == "mean":
        full = [m for m in layers if isinstance(m, StochasticLinear) and m.kind == "full"]
        if full:
            raise UserError("mode='mean' is undefined for kind='full' layers (their expected matrix is zero); "
                            "use mode 'on' or 'off'")
    previous = [m.mode for m in layers]
    for m in layers:
        m.mode = mode
    try:
        yield model
    finally:
        for m, p in zip(layers, previous):
            m.mode = p
