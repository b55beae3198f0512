"""Data: the digits split (stratified, seeded, disjoint, complete), image folders, and clear errors for bad data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png, write_file

from stochvit.data import load_data
from stochvit.errors import UserError


def _keys(images: torch.Tensor) -> list[bytes]:
    """Every digits image is distinct (checked below), so its bytes identify it."""
    return [bytes(img.numpy().tobytes()) for img in images]


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def test_digits_split_is_disjoint_complete_and_stratified(digits):
    from sklearn.datasets import load_digits

    ref = load_digits()
    all_images = torch.from_numpy(np.round(ref.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    label_of = dict(zip(_keys(all_images), ref.target.tolist()))
    assert len(label_of) == len(ref.target) == 1797, "digits images are pairwise distinct"
    parts = {name: getattr(digits, name) for name in ("train", "val", "test")}
    keys = {name: _keys(part.images) for name, part in parts.items()}
    assert sum(len(k) for k in keys.values()) == 1797
    union = set().union(*keys.values())
    assert union == set(label_of), "every image is in exactly one split"
    assert len(union) == 1797
    for name, part in parts.items():
        assert [label_of[k] for k in keys[name]] == part.labels.tolist(), f"{name}: labels travel with their images"
    assert (len(parts["test"]), len(parts["val"])) == (180, 180)
    overall = Counter(ref.target.tolist())
    for name, part in parts.items():
        counts = Counter(part.labels.tolist())
        frac = len(part) / 1797
        for c in range(10):  # stratified: each class within 1 image of its proportional share (sklearn rounds per class)
            assert abs(counts[c] - overall[c] * frac) <= 1.5, (name, c, counts[c], overall[c] * frac)
    assert digits.describe()["sizes"] == dict(train=1437, val=180, test=180)
    assert (digits.num_classes, digits.in_chans, digits.img_size) == (10, 1, 8)


def test_digits_split_is_seeded(digits):
    again = load_data("digits", split_seed=0)
    other = load_data("digits", split_seed=1)
    assert _keys(again.test.images) == _keys(digits.test.images)
    assert _keys(again.val.images) == _keys(digits.val.images)
    assert set(_keys(other.test.images)) != set(_keys(digits.test.images))


def test_train_limit_keeps_a_stratified_subset_of_train(digits):
    small = load_data("digits", train_limit=200)
    assert abs(len(small.train) - 200) <= 1
    assert set(_keys(small.train.images)) <= set(_keys(digits.train.images))
    assert _keys(small.test.images) == _keys(digits.test.images), "the limit must not move the test split"
    assert all(18 <= n <= 22 for n in Counter(small.train.labels.tolist()).values())



def test_a_train_limit_just_below_the_split_drops_a_few_images_instead_of_failing(digits):
    n = len(digits.train)
    for limit in (n - 1, n - 5):  # fewer left out than classes: sklearn cannot stratify that, a seeded drop can
        near = load_data("digits", train_limit=limit)
        assert len(near.train) == limit and set(_keys(near.train.images)) <= set(_keys(digits.train.images))
        assert _keys(near.test.images) == _keys(digits.test.images)
        assert _keys(load_data("digits", train_limit=limit).train.images) == _keys(near.train.images), "seeded"

def test_samples_are_float_images_in_unit_range_and_train_is_augmented(digits):
    x, y = digits.val[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, digits.val.images[0].float() / 255)
    torch.manual_seed(0)
    crops = torch.stack([digits.train[0][0] for _ in range(20)])
    assert (crops != crops[0]).any(), "random crop with padding moves the training image"
    assert len(digits.mean) == len(digits.std) == 1 and 0 < digits.mean[0] < 1


# -- image folders -------------------------------------------------------------------------------


def make_folder(root: Path, classes: dict[str, int], size: int = 12, fmt: str = "png") -> Path:
    """Class folders of small random RGB images, written with torchvision.io."""
    g = torch.Generator().manual_seed(len(str(root)))
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
            data = encode_png(img) if fmt == "png" else encode_jpeg(img, quality=95)
            write_file(str(root / name / f"{i:03d}.{fmt}"), data)
    return root


def test_imagefolder_with_train_only_carves_a_seeded_split(tmp_path):
    make_folder(tmp_path / "train", {"cat": 20, "dog": 20})
    data = load_data(f"imagefolder:{tmp_path}")
    assert data.class_names == ["cat", "dog"]
    assert (data.in_chans, data.img_size) == (3, 12)
    sizes = data.describe()["sizes"]
    assert sum(sizes.values()) == 40 and sizes["test"] == 4 and sizes["val"] == 4
    assert sorted(Counter(data.test.labels.tolist()).values()) == [2, 2], "stratified"
    keys = [set(_keys(getattr(data, s).images)) for s in ("train", "val", "test")]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert _keys(load_data(f"imagefolder:{tmp_path}").test.images) == _keys(data.test.images)
    assert data.flip


def test_imagefolder_uses_given_test_and_val_folders_and_resizes(tmp_path):
    make_folder(tmp_path / "train", {"a": 12, "b": 12}, size=16, fmt="jpg")
    make_folder(tmp_path / "test", {"a": 3, "b": 2}, size=16, fmt="jpg")
    data = load_data(f"imagefolder:{tmp_path}", img_size=8)
    assert len(data.test) == 5 and sorted(data.test.labels.tolist()) == [0, 0, 0, 1, 1]
    assert len(data.train) + len(data.val) == 24
    assert data.img_size == 8 and data.test.images.shape[-2:] == (8, 8)
    make_folder(tmp_path / "val", {"a": 2, "b": 2}, size=16)
    data = load_data(f"imagefolder:{tmp_path}", img_size=8)
    assert (len(data.train), len(data.val), len(data.test)) == (24, 4, 5)


def test_imagefolder_without_split_folders_uses_the_root(tmp_path):
    make_folder(tmp_path, {"x": 15, "y": 15, "z": 15})
    data = load_data(f"imagefolder:{tmp_path}")
    assert data.class_names == ["x", "y", "z"] and sum(data.describe()["sizes"].values()) == 45


def test_corrupt_jpeg_is_a_user_error(tmp_path):
    make_folder(tmp_path, {"a": 10, "b": 10}, fmt="jpg")
    good = (tmp_path / "a" / "000.jpg").read_bytes()
    (tmp_path / "a" / "001.jpg").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(UserError, match="001.jpg"):
        load_data(f"imagefolder:{tmp_path}")
    (tmp_path / "a" / "001.jpg").write_bytes(b"this is not an image")
    with pytest.raises(UserError, match="001.jpg"):
        load_data(f"imagefolder:{tmp_path}")


def test_mixed_image_sizes_need_img_size(tmp_path):
    make_folder(tmp_path, {"a": 10}, size=12)
    make_folder(tmp_path, {"b": 10}, size=10)
    with pytest.raises(UserError, match="img-size"):
        load_data(f"imagefolder:{tmp_path}")
    assert load_data(f"imagefolder:{tmp_path}", img_size=10).img_size == 10


@pytest.mark.parametrize("layout", ["empty", "empty_classes", "missing", "file"])
def test_empty_or_missing_paths_are_user_errors(tmp_path, layout):
    root = tmp_path / "data"
    if layout == "empty":
        root.mkdir()
    elif layout == "empty_classes":
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
    elif layout == "file":
        root.write_text("not a folder")
    with pytest.raises(UserError, match=str(root)):
        load_data(f"imagefolder:{root}")


def test_too_few_images_for_a_split_is_a_user_error(tmp_path):
    make_folder(tmp_path, {"a": 2, "b": 2})
    with pytest.raises(UserError, match="cannot split 4 images of 2 classes"):
        load_data(f"imagefolder:{tmp_path}")
    with pytest.raises(UserError, match="train-limit"):
        load_data("digits", train_limit=5)  # fewer images than classes


def test_unknown_dataset_and_bad_fractions_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        load_data("mnist-but-spelled-wrong")
    with pytest.raises(UserError, match="val_fraction"):
        load_data("digits", val_fraction=1.5)
    with pytest.raises(UserError, match="cifar10"):
        load_data("cifar10", data_dir=tmp_path)  # offline and absent: says what to put where
