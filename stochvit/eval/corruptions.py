"""CIFAR-10-C style corruptions at 5 severities (Hendrycks & Dietterich 2019), on [0, 1] image batches.

These re-create the benchmark's kinds; they are not the benchmark itself (its released files are read by
`stochvit.eval.cifar_c`). 16 kinds: 14 of CIFAR-10-C's 15 standard ones (all but frost, which overlays photographs
shipped with the benchmark) and its extra gaussian_blur and speckle_noise. `ORIGINAL_CORRUPTIONS`, the first 8,
is the default set of the calibration suite and the frozen set of the study's shift set.

Severity parameters are CIFAR-10-C's, in pixels, so on 8x8 digits the spatial ones (blur, pixelate) are
relatively harsher than on 32x32 images. Library operations are used where they exist: Gaussian, motion and
disk blur, HSV conversion, elastic warps and plasma fractals (fog) from kornia, contrast, zoom, and the JPEG codec
from torchvision. The noises are one line each and written here so that they draw from a seeded generator: a
corrupted test set is the same every time. Where CIFAR-10-C calls ImageMagick's motion blur (a one-sided Gaussian
streak), kornia's uniform line kernel of about the same length stands in; glass blur's local pixel moves are
CIFAR-10-C's loop, run for a whole batch at once; elastic_transform is the displacement field alone (CIFAR-10-C
adds a small random affine), at displacements growing with severity.
Pixelate resizes down and back up with torchvision's antialiased bilinear filter rather than CIFAR-10-C's
box filter: box/nearest resampling by a non-integer factor shifts pixels, and the distance to the clean image
then stops growing with severity (checked on CIFAR-10 images). On 8x8 images the downscaled sizes are
7, 7, 6, 6, 5, so severities 1-2 and 3-4 coincide.
Every corrupted image is rounded to 8 bits, as CIFAR-10-C stores them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from kornia.color import hsv_to_rgb, rgb_to_grayscale, rgb_to_hsv
from kornia.contrib import diamond_square
from kornia.filters import filter2d, gaussian_blur2d, motion_blur
from kornia.geometry.transform import elastic_transform2d

from ..data import ImageSet
from ..defaults import CORRUPTIONS, SEVERITIES
from ..defaults import ORIGINAL_CORRUPTIONS as ORIGINAL_CORRUPTIONS  # re-exported
from ..errors import UserError

# CIFAR-10-C's parameters (make_cifar_c.py), severity 1..5. New kinds go at the end: a kind's place seeds its noise.
PARAMS: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity (Poisson rate)
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # salt-and-pepper fraction
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # blur sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # downscale factor
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),  # multiplicative noise std
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, alias-blur sigma
    "motion_blur": (3, 5, 7, 9, 11),  # streak length in pixels, random angle (CIFAR-10-C: sigma 1-3, radius 10-12)
    "zoom_blur": ((1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.03)),  # zooms 1..max by step
    # glass blur: blur sigma, max shift, passes. CIFAR-10-C's (0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2),
    # (0.4, 1, 2) are not ordered in the distance to the clean image (more blur smooths the moved pixels back); here
    # the passes grow with severity instead
    "glass_blur": ((0.05, 1, 1), (0.05, 1, 2), (0.1, 1, 3), (0.1, 1, 4), (0.15, 1, 5)),
    "elastic_transform": (0.25, 0.5, 0.75, 1.0, 1.5),  # mean displacement in pixels (field smoothed at 10% of the side)
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # fog amount, plasma wibble decay
    # snow: flake noise (loc, scale), layer zoom, threshold, streak length (CIFAR-10-C: 2 x its blur sigma + 1), blend
    "snow": ((0.1, 0.2, 1, 0.6, 7, 0.95), (0.1, 0.2, 1, 0.5, 9, 0.9), (0.15, 0.3, 1.75, 0.55, 9, 0.9),
             (0.25, 0.3, 2.25, 0.6, 13, 0.85), (0.3, 0.3, 1.25, 0.65, 25, 0.8)),
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


def _speckle_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    return x + x * c * torch.randn(x.shape, generator=g)


def _defocus_blur(x: torch.Tensor, c: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """A disk of the given radius (on CIFAR-10-C's 3x3 grid for radii <= 8), softened by a small Gaussian."""
    radius, alias = c
    r = max(1, math.ceil(radius))
    grid = torch.arange(-r, r + 1, dtype=torch.float32)
    disk = ((grid[:, None] ** 2 + grid[None] ** 2) <= radius ** 2).float()
    disk = gaussian_blur2d(disk[None, None], (3, 3), (alias, alias), border_type="constant")[0]
    return filter2d(x, disk / disk.sum(), border_type="reflect")


def _streak(x: torch.Tensor, length: int, g: torch.Generator, angles: tuple[float, float] = (-45, 45)) -> torch.Tensor:
    """Motion blur along a random angle per image (degrees, anti-clockwise from the x axis)."""
    k = min(int(length), 2 * min(x.shape[-2:]) - 1)  # reflect padding needs k // 2 < the side
    angle = torch.empty(len(x)).uniform_(*angles, generator=g)
    return motion_blur(x, k, angle, torch.zeros(len(x)), border_type="reflect", mode="bilinear")


def _motion_blur(x: torch.Tensor, c: int, g: torch.Generator) -> torch.Tensor:
    return _streak(x, c, g)


def _zoom(x: torch.Tensor, z: float) -> torch.Tensor:
    return TF.affine(x, angle=0.0, translate=[0, 0], scale=z, shear=[0.0], interpolation=TF.InterpolationMode.BILINEAR)


def _zoom_blur(x: torch.Tensor, c: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    top, step = c
    zooms = torch.arange(1, top, step).tolist()
    return (x + sum(_zoom(x, z) for z in zooms)) / (len(zooms) + 1)


def _glass_blur(x: torch.Tensor, c: tuple[float, int, int], g: torch.Generator) -> torch.Tensor:
    """CIFAR-10-C's loop, for a whole batch: blur, move pixels locally, blur again.

    Its "swap" `x[h, w], x[h', w'] = x[h', w'], x[h, w]` assigns numpy views, so it copies the neighbour into the
    pixel and leaves the neighbour as it was; the released files were made that way, and so is this.
    """
    sigma, delta, passes = c
    x = _gaussian_blur(x, sigma, g).clone()
    h, w = x.shape[-2:]
    b = torch.arange(len(x))
    for _ in range(passes):
        for i in range(h - delta, delta, -1):
            for j in range(w - delta, delta, -1):
                dy, dx = torch.randint(-delta, delta, (2, len(x)), generator=g)  # numpy's randint: high excluded
                x[b, :, i, j] = x[b, :, i + dy, j + dx]
    return _gaussian_blur(x, sigma, g)


def _elastic_transform(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    """A smooth random displacement field, rescaled to a mean length of c pixels (kornia's Gaussian smoothing)."""
    h, w = x.shape[-2:]
    sigma = 0.1 * max(h, w)
    k = 2 * math.ceil(3 * sigma) + 1
    noise = torch.rand(len(x), 2, h, w, generator=g) * 2 - 1
    field = gaussian_blur2d(noise, (k, k), (sigma, sigma), border_type="constant")
    pixels = field * torch.tensor([w / 2, h / 2]).view(1, 2, 1, 1)  # normalised grid units -> pixels
    scale = c / pixels.norm(dim=1).mean((1, 2)).clamp_min(1e-8)
    return elastic_transform2d(x, noise * scale.view(-1, 1, 1, 1), (k, k), (sigma, sigma), padding_mode="reflection")


def _fog(x: torch.Tensor, c: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    amount, decay = c
    b, _, h, w = x.shape
    plasma = diamond_square((b, 1, h, w), roughness=1 / decay, random_fn=partial(torch.rand, generator=g),
                            normalize_range=(0.0, 1.0))
    top = x.amax((1, 2, 3), keepdim=True)
    return (x + amount * plasma) * top / (top + amount)


def _snow(x: torch.Tensor, c: tuple, g: torch.Generator) -> torch.Tensor:
    """Flakes from thresholded noise, zoomed and streaked (kornia's motion blur), over a greyed-up image."""
    loc, scale, zoom, threshold, length, blend = c
    b, _, h, w = x.shape
    flakes = _zoom(loc + scale * torch.randn(b, 1, h, w, generator=g), zoom)
    flakes = _streak(torch.where(flakes < threshold, 0.0, flakes), length, g, angles=(45, 135))  # falling
    grey = rgb_to_grayscale(x) if x.shape[1] == 3 else x
    x = blend * x + (1 - blend) * torch.maximum(x, grey * 1.5 + 0.5)
    return x + flakes + flakes.flip(-1, -2)


_FUNCTIONS: dict[str, Callable[[torch.Tensor, Any, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur, "contrast": _contrast, "brightness": _brightness, "jpeg": _jpeg, "pixelate": _pixelate,
    "speckle_noise": _speckle_noise, "defocus_blur": _defocus_blur, "motion_blur": _motion_blur, "zoom_blur": _zoom_blur,
    "glass_blur": _glass_blur, "elastic_transform": _elastic_transform, "fog": _fog, "snow": _snow,
}


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def check(name: str, severity: int) -> None:
    if name not in PARAMS:
        hint = " (frost overlays the benchmark's own photographs: read the released files with --shift cifar10c:PATH)"
        raise UserError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}" + (hint if name == "frost" else ""))
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
