"""The published corruption benchmarks CIFAR-10-C and CIFAR-100-C (Hendrycks & Dietterich 2019), read from their files.

The release is a folder of `.npy` files: one per corruption, shape (5 N, 32, 32, 3) uint8 with N = 10,000 (the
official CIFAR test set, corrupted at severity 1, then 2, ... 5), and `labels.npy`, the N test labels repeated for
each severity. Files are memory-mapped (`np.load(mmap_mode="r")`), so a (corruption, severity) cell reads only its
N images. Results on these files compare directly with published numbers; `stochvit.eval.corruptions` only imitates them.

Read by hand because the benchmark is not packaged for torchvision or timm; every file is checked (present,
an array, the shape and dtype above, labels alike in every severity block) before any image is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import ImageSet
from ..defaults import CIFAR_C_EXTRA, CIFAR_C_STANDARD, SEVERITIES
from ..errors import UserError

BENCHMARKS = {"cifar10c": ("CIFAR-10-C", 10), "cifar100c": ("CIFAR-100-C", 100)}
STANDARD, EXTRA = CIFAR_C_STANDARD, CIFAR_C_EXTRA  # the 15 kinds of the literature's mean, then the 4 extras


def is_benchmark(spec: str) -> bool:
    return spec.split(":", 1)[0] in BENCHMARKS


def _load(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path}: no such file ({what})")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable .npy array ({what}): {e}") from None


@dataclass(frozen=True)
class CorruptionBenchmark:
    """One release folder; `cell(corruption, severity)` is an ImageSet of that cell's images and labels."""

    spec: str
    root: Path
    title: str
    num_classes: int
    labels: torch.Tensor  # (N,) the labels of every severity block

    @property
    def per_severity(self) -> int:
        return len(self.labels)

    def available(self) -> list[str]:
        return [c for c in STANDARD + EXTRA if (self.root / f"{c}.npy").is_file()]

    def resolve(self, corruptions: tuple[str, ...] | None) -> tuple[str, ...]:
        """The corruptions to read: the 15 standard ones by default, every known one for ("all",)."""
        if corruptions is None:
            return STANDARD
        if tuple(corruptions) == ("all",):
            return STANDARD + EXTRA
        unknown = [c for c in corruptions if c not in STANDARD + EXTRA]
        if unknown:
            raise UserError(f"{self.title} has no corruption {', '.join(map(repr, unknown))}; its kinds: "
                            f"{', '.join(STANDARD + EXTRA)}")
        return tuple(corruptions)

    def check(self, corruptions: tuple[str, ...], severities: tuple[int, ...], img_size: int, in_chans: int,
              num_classes: int) -> None:
        """Every needed file present and shaped as released, and images that fit the model, before anything is read."""
        bad = [s for s in severities if s not in SEVERITIES]
        if bad:
            raise UserError(f"severities {bad} are not among {SEVERITIES}")
        if num_classes != self.num_classes:
            raise UserError(f"{self.title} has {self.num_classes} classes but the model has {num_classes}")
        if in_chans != 3 or img_size != 32:
            raise UserError(f"{self.title} holds 32x32 colour images but the model takes {in_chans}x{img_size}x{img_size}")
        missing = [c for c in corruptions if not (self.root / f"{c}.npy").is_file()]
        if missing:
            have = self.available()
            raise UserError(f"{self.root}: missing {', '.join(c + '.npy' for c in missing)} (present: "
                            f"{', '.join(have) or 'none'}); pass --corruptions with the ones you have")
        want = (len(SEVERITIES) * self.per_severity, 32, 32, 3)
        for c in corruptions:
            a = _load(self.root / f"{c}.npy", c)
            if a.shape != want or a.dtype != np.uint8:
                raise UserError(f"{self.root / (c + '.npy')}: shape {a.shape} {a.dtype}, expected {want} uint8 "
                                f"(5 severities x {self.per_severity} images, as labels.npy says)")

    def cell(self, corruption: str, severity: int, indices: np.ndarray | None = None) -> ImageSet:
        """The images of one (corruption, severity), optionally only `indices` of the N test images."""
        n = self.per_severity
        block = _load(self.root / f"{corruption}.npy", corruption)[(severity - 1) * n: severity * n]
        images = np.array(block if indices is None else block[indices])  # read from the file into memory
        labels = self.labels if indices is None else self.labels[torch.as_tensor(indices)]
        return ImageSet(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels.clone())


def open_benchmark(spec: str) -> CorruptionBenchmark:
    """`cifar10c:PATH` or `cifar100c:PATH`: the release folder, with its labels read and checked."""
    kind, sep, path = spec.partition(":")
    if kind not in BENCHMARKS or not sep or not path:
        raise UserError(f"--shift {spec!r}: expected cifar10c:PATH or cifar100c:PATH (a folder of the released .npy files)")
    title, classes = BENCHMARKS[kind]
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"{title} folder {root} does not exist or is not a directory")
    y = _load(root / "labels.npy", "the labels")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) == 0 or len(y) % len(SEVERITIES):
        raise UserError(f"{root / 'labels.npy'}: shape {y.shape} {y.dtype}, expected integer labels of 5 severity blocks")
    blocks = np.asarray(y).reshape(len(SEVERITIES), -1)
    if not (blocks == blocks[0]).all():
        raise UserError(f"{root / 'labels.npy'}: the 5 severity blocks do not hold the same labels; the released file "
                        "repeats the test labels once per severity")
    if blocks.min() < 0 or blocks.max() >= classes:
        raise UserError(f"{root / 'labels.npy'}: labels {blocks.min()}..{blocks.max()} are outside 0..{classes - 1} "
                        f"of {title}")
    return CorruptionBenchmark(spec, root, title, classes, torch.from_numpy(blocks[0].astype(np.int64)))
