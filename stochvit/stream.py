"""Streamed image folders: datasets too large to decode into memory, decoded lazily in DataLoader workers.

ImageNet at 224 px would take about 190 GB as one uint8 tensor. A streamed folder keeps only the file list: each
sample is read and decoded when it is drawn (`stochvit.data.read_image`, in the loader's worker processes), then
transformed, torchvision/timm style:

- large images (target side above SMALL_IMAGE): RandomResizedCrop + flip for training, and for evaluation a
  resize of the shorter side to side / CROP_PCT followed by a centre crop (timm's default crop_pct of 0.875);
- small, CIFAR-like images: the in-memory recipe exactly (resize to side x side when --img-size is given, random
  crop with 1/8 padding + flip), so that a streamed and an in-memory run of the same folder train alike and
  evaluate on the same pixels.

The listing and the seeded split are the in-memory path's own (`stochvit.data.list_folders`, `split_indices`), so
both modes see the same train / val / test images. Under torchrun, the trainer shards a streamed train split with
`DistributedSampler` like any other dataset.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .data import DataBundle, FolderListing, augmentation, read_image, split_indices
from .errors import UserError

SMALL_IMAGE = 64  # target sides up to this use the in-memory small-image recipe (crop with padding + flip)
CROP_PCT = 0.875  # evaluation: resize the shorter side to side / CROP_PCT, then centre-crop (timm's default)
MEMORY_FRACTION = 0.4  # `auto` decodes into memory while the decoded set fits in this fraction of available RAM
STATS_IMAGES = 2000  # the input normalisation of a streamed set is measured on at most this many training images


def available_memory() -> int:
    """Bytes of RAM available to new allocations (Linux MemAvailable; the physical total elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget() -> int:
    """The decoded size up to which `--data-mode auto` decodes into memory: MEMORY_FRACTION of available RAM.

    Decoding holds two copies at its peak (the per-image tensors and the stacked one, then the split subsets), and
    the training itself needs the rest.
    """
    return int(MEMORY_FRACTION * available_memory())


def decoded_bytes(listing: FolderListing, img_size: int | None) -> int:
    """The size of the listed folder as uint8 RGB tensors: every image at img_size (or the first image's size)."""
    if img_size is None:
        _, h, w = read_image(listing.samples[0][0]).shape
    else:
        h = w = img_size
    return len(listing) * 3 * h * w


def should_stream(spec: str, listing: FolderListing, img_size: int | None, budget: int | None = None) -> bool:
    """`auto`'s choice: stream when the decoded folder would exceed `budget` bytes (default `memory_budget()`).

    Says so in one line on stderr (rank 0 only) when it streams.
    """
    budget = memory_budget() if budget is None else budget
    size = decoded_bytes(listing, img_size)
    if size <= budget:
        return False
    if os.environ.get("RANK", "0") == "0":
        print(f"stochvit: streaming {spec} from disk: decoded it would take {size / 1e9:.2f} GB, over the memory budget "
              f"of {budget / 1e9:.2f} GB ({MEMORY_FRACTION:g} of available RAM); --data-mode memory decodes it anyway",
              file=sys.stderr, flush=True)
    return True


def eval_transform(size: int) -> v2.Transform:
    """Resize to size x size (small images, as in memory) or shorter side to size / CROP_PCT + centre crop."""
    if size <= SMALL_IMAGE:
        return v2.Resize((size, size), antialias=True)
    return v2.Compose([v2.Resize(int(size / CROP_PCT), antialias=True), v2.CenterCrop(size)])


def train_transform(size: int, flip: bool = True) -> v2.Transform:
    """The in-memory crop-with-padding + flip for small images; RandomResizedCrop + flip for large ones."""
    if size <= SMALL_IMAGE:
        return v2.Compose([eval_transform(size), augmentation(size, flip)])
    ops: list[v2.Transform] = [v2.RandomResizedCrop(size, antialias=True)]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops)


class StreamSet(Dataset):
    """Image files and labels; yields float images in [0, 1] of shape (3, size, size), decoded when drawn.

    `transform` is the training augmentation (None: the evaluation view, `eval_transform`). The interface is
    `stochvit.data.ImageSet`'s, so the trainer and every suite take either.
    """

    def __init__(self, paths: list[str], labels: torch.Tensor, size: int, transform: v2.Transform | None = None,
                 workers: int = 0) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels, self.size, self.transform = list(paths), labels.long(), size, transform
        self.view = eval_transform(size)
        self.workers = workers  # DataLoader workers for evaluation passes (the trainer sets its --workers)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = read_image(self.paths[i])
        img = (self.transform or self.view)(img)
        return img.float().div_(255), self.labels[i]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def subset(self, indices: np.ndarray | torch.Tensor, transform: v2.Transform | None = None,
               labels: torch.Tensor | None = None) -> StreamSet:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return StreamSet([self.paths[i] for i in idx.tolist()], self.labels[idx] if labels is None else labels,
                         self.size, transform, self.workers)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image (evaluation view) as float [0, 1] and labels: for the suites' test splits, decoded now."""
        view = self.subset(np.arange(len(self)))
        batches = list(DataLoader(view, batch_size=256, num_workers=self.workers))
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std over at most STATS_IMAGES training images (seeded; all of them when fewer)."""
        idx = np.arange(len(self))
        if len(idx) > STATS_IMAGES:
            idx = np.sort(np.random.default_rng(0).choice(idx, STATS_IMAGES, replace=False))
        x, _ = self.subset(idx).tensors()
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def stream_bundle(spec: str, listing: FolderListing, img_size: int | None, split_seed: int, val_fraction: float,
                  test_fraction: float, train_limit: int | None) -> DataBundle:
    """A DataBundle of StreamSets with the in-memory path's split of the same folder."""
    size = img_size
    if size is None:
        _, h, w = read_image(listing.samples[0][0]).shape
        if h != w:
            raise UserError(f"{spec}: images must be square, got {h}x{w} ({listing.samples[0][0]}); pass --img-size")
        size = h
    labels = listing.labels(listing.samples)
    paths = [p for p, _ in listing.samples]
    pool = StreamSet(paths, torch.from_numpy(labels), size)
    parts = {p: StreamSet([f for f, _ in s], torch.from_numpy(listing.labels(s)), size) for p, (_, s) in listing.parts.items()}
    train_idx, val_idx, test_idx = split_indices(labels, "test" in parts, "val" in parts, split_seed, val_fraction,
                                                 test_fraction, train_limit)
    val = parts["val"] if val_idx is None else pool.subset(val_idx)
    test = parts["test"] if test_idx is None else pool.subset(test_idx)
    if len(val) == 0 or len(test) == 0:
        raise UserError(f"{spec}: too few images for a validation and a test split")
    train = pool.subset(train_idx)
    mean, std = train.channel_stats()
    train.transform = train_transform(size, flip=True)
    return DataBundle(
        name=spec, train=train, val=val, test=test, class_names=listing.class_names, mean=mean, std=std, flip=True,
        split=dict(seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction, train_limit=train_limit),
    )
