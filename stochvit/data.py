"""Datasets as in-memory uint8 image tensors with seeded splits.

Every dataset is decoded once into a `(N, C, H, W)` uint8 tensor (CIFAR-10 is 150 MB), so training
never waits on JPEG decoding. Samples come out as float images in [0, 1]; normalisation lives inside
the model (`stochvit.models.Normalized`) so that attacks and inversions work in pixel space.

Specs: "digits" (scikit-learn's bundled 8x8 digits, the embedded default), "cifar10", "cifar100",
"svhn" (torchvision, from --data-dir, downloaded only with --download) and "imagefolder:PATH".
Any spec may end in ":classes=SEL" (e.g. "digits:classes=5-9", "imagefolder:PATH:classes=dog,frog"):
a class subset, relabelled 0..k-1 in the order given, taken from the parent dataset's split.

An image folder too large to decode into memory is streamed instead (`data_mode`, `stochvit.stream`): the same
listing and the same seeded split (`split_indices`), decoded lazily in DataLoader workers.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .defaults import DATA_MODES, SPECS_HELP
from .errors import UserError

TORCHVISION_SETS = ("cifar10", "cifar100", "svhn")
CLASS_FILTER = ":classes="


class ImageSet(Dataset):
    """Images (uint8, N x C x H x W) and labels; yields float images in [0, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels.long(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(img)
        return img.float().div_(255), self.labels[i]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every sample."""
        return tuple(self.images.shape[1:])

    def subset(self, indices: np.ndarray | torch.Tensor, transform: v2.Transform | None = None,
               labels: torch.Tensor | None = None) -> ImageSet:
        """The images at `indices` (with new `labels` when given: a relabelled class subset)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.images[idx], self.labels[idx] if labels is None else labels, transform)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the images in [0, 1] (the model's input normalisation)."""
        return _channel_stats(self.images)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as float [0, 1] and labels, without augmentation."""
        return self.images.float().div(255), self.labels


@dataclass
class DataBundle:
    name: str
    train: ImageSet  # or a stochvit.stream.StreamSet: the same interface, decoded lazily
    val: ImageSet
    test: ImageSet
    class_names: list[str]
    mean: list[float]
    std: list[float]
    flip: bool
    split: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_chans(self) -> int:
        return int(self.train.shape[0])

    @property
    def img_size(self) -> int:
        return int(self.train.shape[-1])

    def describe(self) -> dict:
        return dict(
            name=self.name, num_classes=self.num_classes, in_chans=self.in_chans, img_size=self.img_size,
            sizes=dict(train=len(self.train), val=len(self.val), test=len(self.test)), split=self.split,
        )

    def test_source(self) -> str:
        """Where the test images come from, in words: reports name it beside every number."""
        spec = self.name.rpartition(CLASS_FILTER)[0] or self.name
        seed, fraction = self.split.get("seed", 0), self.split.get("test_fraction", 0.1)
        if spec in TORCHVISION_SETS:
            return f"the official {spec} test set ({len(self.test)} images)"
        if spec.startswith("imagefolder:"):
            root = Path(spec.split(":", 1)[1])
            if (root / "test").is_dir():
                return f"the {len(self.test)} images of {root / 'test'}"
            where = root / "train" if (root / "train").is_dir() else root
            return (f"a seeded {fraction:.0%} split (split seed {seed}) of the images in {where}, {len(self.test)} images, "
                    "held out from the training folder itself, not a separate test set")
        return f"a seeded {fraction:.0%} split (split seed {seed}) of {spec}, {len(self.test)} images"


class CropFlip(v2.Compose):
    """Random crop with zero padding, then an optional horizontal flip (torchvision's per-sample transforms).

    Its settings are attributes, so the trainer can run the same augmentation batched on the device instead
    (`stochvit.augment.random_crop_flip`) when the images are in memory.
    """

    def __init__(self, img_size: int, padding: int, flip: bool) -> None:
        ops: list[v2.Transform] = [v2.RandomCrop(img_size, padding=padding)]
        if flip:
            ops.append(v2.RandomHorizontalFlip())
        super().__init__(ops)
        self.padding, self.flip = padding, flip


def augmentation(img_size: int, flip: bool) -> CropFlip:
    """Standard small-image augmentation: random crop with padding (1/8 of the side), optional flip."""
    return CropFlip(img_size, max(1, img_size // 8), flip)


def split_indices(labels: np.ndarray, test_given: bool, val_given: bool, split_seed: int, val_fraction: float,
                  test_fraction: float, train_limit: int | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The seeded, stratified split of one labelled pool: (train, val, test) indices into it.

    val and test are None where they come from their own folders or sets (`*_given`); `train_limit` keeps a
    stratified subset of train. The in-memory and the streamed paths both split here, from the labels alone.
    """
    test_idx = None
    if test_given:
        rest = np.arange(len(labels))
    else:
        rest, test_idx = _stratified_split(labels, test_fraction, split_seed)
    val_idx = None
    if val_given:
        train_idx = rest
    else:
        keep, held = _stratified_split(labels[rest], val_fraction / (1 - test_fraction) if not test_given else val_fraction,
                                       split_seed)
        train_idx, val_idx = rest[keep], rest[held]
    if train_limit is not None and train_limit < len(train_idx):
        if len(train_idx) - train_limit < len(np.unique(labels[train_idx])):  # too few left out to stratify them
            sub = np.sort(np.random.default_rng(split_seed).permutation(len(train_idx))[:train_limit])
        else:
            sub, _ = _stratified_split(labels[train_idx], 1 - train_limit / len(train_idx), split_seed)
        train_idx = train_idx[sub]
    return train_idx, val_idx, test_idx


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(len(labels))
    if fraction <= 0:
        return idx, idx[:0]
    try:
        keep, held = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as e:  # sklearn: too few images per class for a stratified split
        raise UserError(f"cannot split {len(labels)} images of {len(np.unique(labels))} classes, holding out {fraction:.3g} "
                        f"stratified: {e}; use more images or change --train-limit") from None
    return np.sort(keep), np.sort(held)


def _channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images.float().div(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def _load_digits() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    return images, torch.from_numpy(d.target), [str(i) for i in range(10)]


def _load_torchvision(name: str, data_dir: Path, download: bool, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "svhn": tvd.SVHN}[name]
    kwargs = dict(split="train" if train else "test") if name == "svhn" else dict(train=train)
    try:
        ds = cls(str(data_dir), download=download, **kwargs)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        folder = getattr(cls, "base_folder", name)
        hint = f"put the torchvision {name} files under {data_dir} (e.g. {data_dir}/{folder})"
        raise UserError(f"{name} not found in {data_dir}: {hint}, or pass --download when online. ({e})") from None
    except OSError as e:  # offline download: URLError is an OSError
        raise UserError(f"could not download {name} ({e}); this machine may be offline: "
                        f"copy the files into {data_dir} instead") from None
    data = ds.data if name == "svhn" else ds.data.transpose(0, 3, 1, 2)
    labels = np.asarray(ds.labels if name == "svhn" else ds.targets)
    names = list(getattr(ds, "classes", [str(i) for i in range(10)]))
    return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels), names


def _list_folder(root: Path, seen: dict[tuple[int, int], str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Class folders of `root` and their image files, as (path, class name), without following symlinked folders.

    torchvision's ImageFolder follows every symlink, so a link to a parent folder (`ln -s .. T/a/up`) lists each
    image many times, in every split: test images end up in train. Symlinked folders below a class folder are
    skipped (one warning line); a file reached twice (symlinked files, hard links, class folders linked to each
    other, or the same file in two splits) is refused. `seen` maps (device, inode) to the first path, across splits.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except OSError as e:
        raise UserError(f"{root}: not a class-folder tree of images ({e})") from None
    if not classes:
        raise UserError(f"{root}: not a class-folder tree of images (no class folders in it)")
    samples: list[tuple[str, str]] = []
    skipped: list[str] = []
    empty: list[str] = []
    for name in classes:
        count = 0
        for folder, subdirs, files in os.walk(root / name, onerror=_walk_error):  # followlinks=False: no loops
            skipped += [os.path.join(folder, d) for d in subdirs if os.path.islink(os.path.join(folder, d))]
            subdirs.sort()
            for f in sorted(files):
                if not f.lower().endswith(IMG_EXTENSIONS):
                    continue
                path = os.path.join(folder, f)
                try:
                    st = os.stat(path)
                except OSError as e:
                    raise UserError(f"cannot read image {path}: {e.strerror or e}") from None
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    raise UserError(f"{path} is the same file as {seen[key]} (a symlink or hard link): each image must "
                                    "appear once across train, val and test; remove the duplicate")
                seen[key] = path
                samples.append((path, name))
                count += 1
        if count == 0:
            empty.append(name)
    if empty:
        raise UserError(f"{root}: not a class-folder tree of images (no image files in class folder(s) "
                        f"{', '.join(empty)}; supported extensions: {', '.join(IMG_EXTENSIONS)})")
    if skipped:
        print(f"stochvit: warning: {root}: not following {len(skipped)} symlinked folder(s), e.g. {skipped[0]}",
              file=sys.stderr, flush=True)
    return classes, samples


def _walk_error(e: OSError) -> None:
    raise UserError(f"cannot list {e.filename}: {e.strerror or e}")


class UnreadableImage(UserError):
    """An image file that cannot be read or decoded; the message names the file.

    Raised in a DataLoader worker, it comes back to the main process rebuilt from the worker's formatted traceback
    (torch's ExceptionWrapper calls the type with that text): the constructor keeps only the original message.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith(f"Caught {type(self).__name__}") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def read_image(path: str) -> torch.Tensor:
    """One image file as uint8 RGB (C, H, W); an unreadable or corrupt file is an UnreadableImage naming it."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError as e:  # BMP, PPM, PGM and TIFF: torchvision lists them as image files but does not decode them
        return _decode_with_pil(path, e)
    except OSError as e:
        raise UnreadableImage(f"cannot decode image {path}: {e}") from None


def _decode_with_pil(path: str, error: RuntimeError) -> torch.Tensor:
    """Formats torchvision's decoder lacks, through PIL (RGB); still unreadable: an UnreadableImage naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError):
        first = (str(error).strip().splitlines() or [""])[-1].split(". ")[0][-200:]
        raise UnreadableImage(f"cannot decode image {path}: {first}") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _decode_folder(root: Path, samples: list[tuple[str, str]], class_index: dict[str, int],
                   img_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode listed images; labels come from `class_index` (the train folder's), so every split agrees."""
    from tqdm import tqdm

    resize = v2.Resize((img_size, img_size), antialias=True) if img_size else None
    images, size = [], None
    for path, _ in tqdm(samples, desc=f"decode {root.name}", unit="img", leave=False, mininterval=2):
        img = read_image(path)
        if resize is not None:
            img = resize(img)
        elif size is None:
            size = img.shape
        elif img.shape != size:
            raise UserError(f"{path} is {tuple(img.shape[1:])} but earlier images are {tuple(size[1:])}; "
                            "pass --img-size to resize all")
        images.append(img)
    return torch.stack(images), torch.tensor([class_index[c] for _, c in samples])


@dataclass
class FolderListing:
    """An image-folder tree listed and checked, nothing decoded: the train (or root) folder and any val/test folders."""

    train_root: Path
    class_names: list[str]
    samples: list[tuple[str, str]]  # (path, class name) of the train (or root) folder
    parts: dict[str, tuple[Path, list[tuple[str, str]]]]  # "val" / "test" folders and their samples

    def labels(self, samples: list[tuple[str, str]]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.class_names)}
        return np.array([index[c] for _, c in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples) + sum(len(s) for _, s in self.parts.values())


def list_folders(root: Path) -> FolderListing:
    """The train (or root) folder and any val/test folders, listed and checked before anything is decoded.

    Class indices come from the train folder's class names: a val/ lacking a class keeps the others' labels,
    and a split with a class that train lacks is refused up front (not after the whole training).
    """
    parts = {p: root / p for p in ("train", "val", "test") if (root / p).is_dir()}
    if parts and "train" not in parts:  # the root's class folders would include val/ or test/ themselves
        raise UserError(f"{root} has {' and '.join(p + '/' for p in parts)} but no train/ folder; put the training "
                        "images in train/<class>/, or use only class folders at the top")
    seen: dict[tuple[int, int], str] = {}
    train_root = parts.pop("train", root)
    names, samples = _list_folder(train_root, seen)
    if len(names) < 2:  # a classifier of one class fails in torchmetrics after the first epoch
        raise UserError(f"{train_root} has only one class folder ({names[0]}); a classifier needs at least two")
    listed = {p: _list_folder(d, seen) for p, d in parts.items()}
    for p, (classes, _) in listed.items():
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise UserError(f"{parts[p]} has class folder(s) {', '.join(unknown)} that {train_root} lacks "
                            f"(its classes: {', '.join(names)}); every split must use the train folder's classes")
    return FolderListing(train_root, names, samples, {p: (parts[p], s) for p, (_, s) in listed.items()})


def _load_folders(listing: FolderListing,
                  img_size: int | None) -> tuple[tuple[torch.Tensor, torch.Tensor, list[str]], dict]:
    """Decode a listed folder tree: (train images, labels, class names) and any val/test (images, labels)."""
    index = {c: i for i, c in enumerate(listing.class_names)}
    images, labels = _decode_folder(listing.train_root, listing.samples, index, img_size)
    others = {p: _decode_folder(d, s, index, img_size or images.shape[-1]) for p, (d, s) in listing.parts.items()}
    return (images, labels, listing.class_names), others


def load_data(
    spec: str = "digits",
    data_dir: str | Path | None = None,
    download: bool = False,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    train_limit: int | None = None,
    img_size: int | None = None,
    data_mode: str = "auto",
    memory_budget: int | None = None,
) -> DataBundle:
    """Load a dataset and its seeded, stratified train/val/test split.

    The split seed is separate from the training seed, so runs with different seeds (ensembles)
    share one test split. `train_limit` keeps a stratified subset of the training split.
    `data_mode` "stream" (or "auto" past `memory_budget` bytes, default `stochvit.stream.memory_budget()`) decodes
    an image folder lazily instead (`stochvit.stream`); the split is the same.
    """
    if data_mode not in DATA_MODES:
        raise UserError(f"invalid --data-mode={data_mode}; expected one of {', '.join(DATA_MODES)}")
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise UserError(f"{name}={f} must be in [0, 1)")
    parent, sep, selection = spec.rpartition(CLASS_FILTER)
    if sep:
        full = load_data(parent, data_dir, download, split_seed, val_fraction, test_fraction, None, img_size, data_mode,
                         memory_budget)
        return select_classes(full, selection, spec, train_limit)
    test = None
    if data_mode == "stream" and not spec.startswith("imagefolder:"):
        raise UserError(f"--data-mode stream needs an imagefolder:PATH dataset, not {spec!r} (which fits in memory)")
    val = None
    if spec == "digits":
        images, labels, names = _load_digits()
        flip = False
    elif spec in TORCHVISION_SETS:
        root = Path(data_dir) if data_dir else Path("data")
        images, labels, names = _load_torchvision(spec, root, download, train=True)
        test = _load_torchvision(spec, root, download, train=False)[:2]
        flip = spec != "svhn"
    elif spec.startswith("imagefolder:"):
        root = Path(spec.split(":", 1)[1]).expanduser()
        if not root.is_dir():
            raise UserError(f"imagefolder path {root} does not exist or is not a directory")
        listing = list_folders(root)
        if data_mode != "memory":
            from .stream import should_stream, stream_bundle

            if data_mode == "stream" or should_stream(spec, listing, img_size, memory_budget):
                return stream_bundle(spec, listing, img_size, split_seed, val_fraction, test_fraction, train_limit)
        (images, labels, names), parts = _load_folders(listing, img_size)
        test, val = parts.get("test"), parts.get("val")
        flip = True
    else:
        raise UserError(f"unknown dataset {spec!r}; expected {SPECS_HELP}")
    return _split_bundle(spec, images, labels, names, test, val, flip, split_seed, val_fraction, test_fraction, train_limit)


def _split_bundle(spec: str, images: torch.Tensor, labels: torch.Tensor, names: list[str], test: tuple | None,
                  val: tuple | None, flip: bool, split_seed: int, val_fraction: float, test_fraction: float,
                  train_limit: int | None) -> DataBundle:
    """The bundle of decoded images: the seeded split of what the dataset does not ship as its own test/val parts."""
    if images.shape[-1] != images.shape[-2]:
        raise UserError(f"{spec}: images must be square, got {tuple(images.shape[-2:])}; pass --img-size")
    full = ImageSet(images, labels)
    val_given = val is not None
    train_idx, val_idx, test_idx = split_indices(labels.numpy(), test is not None, val_given, split_seed, val_fraction,
                                                 test_fraction, train_limit)
    test_set = full.subset(test_idx) if test is None else ImageSet(*test)
    val_set = ImageSet(*val) if val_given else full.subset(val_idx)
    if len(val_set) == 0 or len(test_set) == 0:
        raise UserError(f"{spec}: too few images for a validation and a test split")
    mean, std = _channel_stats(images[torch.as_tensor(train_idx)])
    size = int(images.shape[-1])
    return DataBundle(
        name=spec, train=full.subset(train_idx, augmentation(size, flip)), val=val_set, test=test_set,
        class_names=names, mean=mean, std=std, flip=flip,
        split=dict(seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction, train_limit=train_limit),
    )


def parse_classes(selection: str, names: list[str]) -> list[int]:
    """Class indices from "5-9", "0,2,4" or class names ("dog,frog"), in the order given."""
    picked: list[int] = []
    for token in (t.strip() for t in selection.split(",")):
        lo, dash, hi = token.partition("-")
        if token in names:
            picked.append(names.index(token))
        elif token.isdigit() or (dash and lo.isdigit() and hi.isdigit()):
            picked.extend(range(int(lo), int(hi) + 1) if dash else [int(token)])
        else:
            raise UserError(f"classes={selection!r}: {token!r} is neither a class index, a range a-b, nor one of {names}")
    bad = [i for i in picked if i >= len(names)]
    if bad or len(set(picked)) != len(picked) or len(picked) < 2:
        raise UserError(f"classes={selection!r}: need at least 2 distinct classes among 0-{len(names) - 1}")
    return picked


def select_classes(full: DataBundle, selection: str, name: str, train_limit: int | None = None) -> DataBundle:
    """Keep a subset of classes, relabelled 0..k-1; its test images are exactly the parent's test images of those classes.

    Used for class-split transfer (pretrain on classes 0-4, transfer to 5-9). `train_limit` applies after the selection.
    """
    keep = parse_classes(selection, full.class_names)
    relabel = torch.full((full.num_classes,), -1, dtype=torch.long)
    relabel[keep] = torch.arange(len(keep))

    def restrict(part: ImageSet, limit: int | None = None) -> ImageSet:
        labels = relabel[part.labels]
        idx = torch.nonzero(labels >= 0).squeeze(1).numpy()
        if limit is not None and limit < len(idx):
            sub, _ = _stratified_split(labels[idx].numpy(), 1 - limit / len(idx), full.split.get("seed", 0))
            idx = idx[sub]
        return part.subset(idx, part.transform, labels=labels[idx])

    train = restrict(full.train, train_limit)
    mean, std = train.channel_stats()
    return DataBundle(
        name=name, train=train, val=restrict(full.val), test=restrict(full.test), class_names=[full.class_names[i] for i in keep],
        mean=mean, std=std, flip=full.flip, split={**full.split, "train_limit": train_limit, "classes": keep},
    )
