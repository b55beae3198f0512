"""Issue 17 (reliability): no silent wrong results, no tracebacks for user mistakes, no half-written runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_png, write_file

from stochvit.data import load_data
from stochvit.errors import UserError


def _keys(images: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in images}


def make_folder(root: Path, classes: dict[str, int], size: int = 8, seed: int = 0) -> Path:
    """Class folders of random PNGs; each image differs, so its bytes identify it across splits."""
    g = torch.Generator().manual_seed(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
            write_file(str(root / name / f"{i:03d}.png"), encode_png(img))
    return root


# --- symlinked folders and duplicated files -------------------------------------------------------------------


def test_symlink_loop_is_not_followed_and_splits_stay_disjoint(tmp_path, capsys):
    """The issue's exact case: 24 images in T/a, T/b and `ln -s .. T/a/up` once gave 984 samples."""
    root = make_folder(tmp_path / "T", {"a": 12, "b": 12})
    os.symlink("..", root / "a" / "up")
    data = load_data(f"imagefolder:{root}")
    assert sum(data.describe()["sizes"].values()) == 24
    assert data.class_names == ["a", "b"]
    keys = [_keys(getattr(data, s).images) for s in ("train", "val", "test")]
    assert sum(len(k) for k in keys) == 24, "every image once"
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    err = capsys.readouterr().err
    assert "not following 1 symlinked folder" in err and "up" in err


@pytest.mark.parametrize("how", ["symlinked_file", "hard_link", "class_linked_to_class", "same_file_in_two_splits"])
def test_a_file_reached_twice_is_refused(tmp_path, how):
    if how == "same_file_in_two_splits":
        make_folder(tmp_path / "train", {"a": 12, "b": 12})
        make_folder(tmp_path / "test", {"a": 2, "b": 2}, seed=1)
        os.link(tmp_path / "train" / "a" / "000.png", tmp_path / "test" / "a" / "dup.png")
        root, dup = tmp_path, "dup.png"
    else:
        root = make_folder(tmp_path / "T", {"a": 12, "b": 12})
        if how == "symlinked_file":
            os.symlink(root / "a" / "000.png", root / "b" / "zzz.png")
            dup = "zzz.png"
        elif how == "hard_link":
            os.link(root / "a" / "000.png", root / "b" / "zzz.png")
            dup = "zzz.png"
        else:
            os.symlink("a", root / "c")  # a top-level class folder that is a link to another class
            dup = "c"
    with pytest.raises(UserError, match=f"{dup}.* is the same file as .*remove the duplicate"):
        load_data(f"imagefolder:{root}")


# --- class indices of val/ and test/ come from train/ ---------------------------------------------------------


def test_val_lacking_a_class_keeps_the_train_folders_labels(tmp_path):
    """S/train/{a,b,c} with S/val/{a,c}: the val images of c were labelled b."""
    make_folder(tmp_path / "train", {"a": 10, "b": 10, "c": 10}, seed=0)
    make_folder(tmp_path / "val", {"a": 3, "c": 4}, seed=1)
    make_folder(tmp_path / "test", {"c": 2}, seed=2)
    data = load_data(f"imagefolder:{tmp_path}")
    assert data.class_names == ["a", "b", "c"]
    assert sorted(data.val.labels.tolist()) == [0] * 3 + [2] * 4
    assert data.test.labels.tolist() == [2, 2]
    # each val image of c carries c's label: match the decoded images to the files of val/c
    c_files = {tmp_path / "val" / "c" / f"{i:03d}.png" for i in range(4)}
    from torchvision.io import decode_image
    c_keys = {decode_image(str(f)).numpy().tobytes() for f in c_files}
    assert {img.numpy().tobytes() for img, y in zip(data.val.images, data.val.labels) if y == 2} == c_keys


@pytest.mark.parametrize("split", ["val", "test"])
def test_split_with_a_class_train_lacks_is_refused_before_decoding(tmp_path, split, monkeypatch):
    make_folder(tmp_path / "train", {"a": 10, "b": 10})
    make_folder(tmp_path / split, {"a": 2, "b": 2, "zebra": 2}, seed=1)
    import stochvit.data

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded images before checking the class folders")

    monkeypatch.setattr(stochvit.data, "_decode_folder", no_decoding)
    with pytest.raises(UserError, match=f"{split} has class folder.*zebra.*train"):
        load_data(f"imagefolder:{tmp_path}")


def test_val_or_test_without_train_is_refused(tmp_path):
    make_folder(tmp_path, {"a": 10, "b": 10})
    make_folder(tmp_path / "test", {"a": 2, "b": 2}, seed=1)
    with pytest.raises(UserError, match="no train/ folder"):
        load_data(f"imagefolder:{tmp_path}")
