"""Batched random crop with zero padding and horizontal flip, on whatever device the batch is on.

The same augmentation as torchvision's per-sample `RandomCrop(size, padding)` + `RandomHorizontalFlip()`
(`stochvit.data.CropFlip`), written as one gather over the whole batch: no per-sample Python, so on CUDA the
images stay on the device and augmentation costs a few kernel launches per batch. Written by hand because
kornia's `RandomCrop` (0.9) slices each image in a Python loop over the batch, after copying the offsets to the host,
and takes only float images; torchvision's v2 transforms draw one crop per call, shared by the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each image of `x` (B, C, H, W), zero-padded by `padding`, at (top[i], left[i]), then mirror it where flip[i].

    Offsets are in the padded image, in [0, 2 * padding]; the output has x's shape and dtype.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = top.view(b, 1) + torch.arange(h, device=x.device)  # (B, H) rows of the padded images
    cols = left.view(b, 1) + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip.view(b, 1), cols.flip(1), cols)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    return padded[batch, :, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2).contiguous()  # (B, H, W, C) ->


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """`crop_flip` at offsets drawn uniformly from {0..2 * padding} and flips with probability 1/2, per image.

    Draws on x's device from `generator` (default: the device's global generator, which the trainer seeds and its
    checkpoints save, so a resumed run draws the same crops).
    """
    b = x.shape[0]
    kw = dict(device=x.device, generator=generator)
    top = torch.randint(0, 2 * padding + 1, (b,), **kw)
    left = torch.randint(0, 2 * padding + 1, (b,), **kw)
    mirror = torch.rand(b, **kw) < 0.5 if flip else torch.zeros(b, dtype=torch.bool, device=x.device)
    return crop_flip(x, top, left, mirror, padding)
