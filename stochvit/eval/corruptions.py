"""CIFAR-10-C style corruptions at 5 severities (Hendrycks & Dietterich 2019), on [0, 1] image batches.

Severity parameters are CIFAR-10-C's, in pixels, so on 8x8 digits the spatial ones (blur, pixelate) are
relatively harsher than on 32x32 images. Library operations are used where they exist: Gaussian blur from
kornia, HSV conversion from kornia, contrast and the JPEG codec from torchvision. The noises are one line
each and written here so that they draw from a seeded generator: a corrupted test set is the same every time.
Pixelate resizes down and back up with torchvision's antialiased bilinear filter rather than CIFAR-10-C's
box filter: box/nearest resampling by a non-integer factor shifts pixels, and the distance to the clean image
then stops growing with severity (checked on CIFAR-10 images). On 8x8 images the downscaled sizes are
7, 7, 6, 6, 5, so severities 1-2 and 3-4 coincide.
Every corrupted image is rounded to 8 bits, as CIFAR-10-C stores them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torchvision.transforms.v2.functional as TF
from kornia.color import hsv_to_rgb, rgb_to_hsv
from kornia.filters import gaussian_blur2d

from ..data import ImageSet
from ..defaults import CORRUPTIONS, SEVERITIES
from ..errors import UserError

# CIFAR-10-C's parameters (make_cifar_c.py), severity 1..5
PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity (Poisson rate)
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # salt-and-pepper fraction
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # blur sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # downscale factor
}
assert tuple(PARAMS) == CORRUPTIONS  # the names the command line offers (stochvit.defaults)


def _gaussian_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    return x + c * torch.randn(x.shape, generator=g)


def _shot_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    return torch.poisson(x * c, generator=g) / c


def _impulse_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape, generator=g)
    salt = torch.rand(x.shape, generator=g) < 0.5
    return torch.where(u < c, salt.to(x.dtype), x)


def _gaussian_blur(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    k = 2 * math.ceil(3 * c) + 1
    return gaussian_blur2d(x, (k, k), (c, c), border_type="reflect")


def _contrast(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    return TF.adjust_contrast(x, c)  # blend with the image's mean grey level


def _brightness(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    if x.shape[1] != 3:
        return x + c  # grey images: the HSV value is the intensity itself
    hsv = rgb_to_hsv(x)
    return hsv_to_rgb(torch.cat([hsv[:, :2], (hsv[:, 2:] + c).clamp(0, 1)], 1))


def _jpeg(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    return TF.jpeg(to_uint8(x), int(c)).float() / 255


def _pixelate(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = TF.resize(x, [max(1, int(h * c)), max(1, int(w * c))], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.resize(small, [h, w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


_FUNCTIONS: dict[str, Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur, "contrast": _contrast, "brightness": _brightness, "jpeg": _jpeg, "pixelate": _pixelate,
}


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def check(name: str, severity: int) -> None:
    if name not in PARAMS:
        raise UserError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise UserError(f"severity {severity} is not one of {SEVERITIES}")


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Corrupted copy of float images (B, C, H, W) in [0, 1]; same shape, values in [0, 1] on the 8-bit grid."""
    check(name, severity)
    if images.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    g = torch.Generator().manual_seed(seed * 1000 + CORRUPTIONS.index(name) * 10 + severity)
    out = _FUNCTIONS[name](images.float().cpu(), PARAMS[name][severity - 1], g)
    return to_uint8(out).float() / 255


def corrupt_set(dataset: ImageSet, name: str, severity: int, seed: int = 0) -> ImageSet:
    """Corrupted copy of a whole image set (without its augmentation)."""
    x, y = dataset.tensors()
    return ImageSet(to_uint8(corrupt(x, name, severity, seed)), y.clone())
