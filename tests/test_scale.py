"""Batched device augmentation against torchvision's per-sample transforms, device batches, compile, the lr rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms.v2 import functional as TF

from stochvit.augment import crop_flip, random_crop_flip
from stochvit.data import ImageSet, augmentation
from stochvit.scale import DeviceBatches, adamw, scaled_lr, train_batches


def reference(img: torch.Tensor, top: int, left: int, flip: bool, padding: int) -> torch.Tensor:
    """torchvision's per-sample ops, as RandomCrop(padding) + RandomHorizontalFlip apply them."""
    h, w = img.shape[-2:]
    out = TF.crop(TF.pad(img, [padding]), top, left, h, w)
    return TF.horizontal_flip(out) if flip else out


def test_batched_crop_flip_matches_torchvision_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 12, 10), dtype=torch.uint8, generator=g)
    top, left = torch.tensor([0, 6, 3, 0, 6, 2]), torch.tensor([0, 6, 1, 6, 0, 4])
    flip = torch.tensor([False, True, True, False, True, False])
    out = crop_flip(x, top, left, flip, padding=3)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(6):
        assert torch.equal(out[i], reference(x[i], int(top[i]), int(left[i]), bool(flip[i]), 3)), i
    assert torch.equal(crop_flip(x, torch.full((6,), 3), torch.full((6,), 3), torch.zeros(6, dtype=torch.bool), 3), x)


def _offsets(out: torch.Tensor, padding: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, flip) of crops of the coordinate image: channel 0 holds row + 1, channel 1 column + 1, padding 0."""
    w = out.shape[-1]
    flipped = out[:, 1, padding, padding + 1] < out[:, 1, padding, padding]
    top = out[:, 0, padding, padding].long() - 1
    left = torch.where(flipped, out[:, 1, padding, w - 1 - padding], out[:, 1, padding, padding]).long() - 1
    return top.numpy(), left.numpy(), flipped.numpy()


def test_random_offsets_are_uniform_flips_fair_and_seeded():
    size, p, n = 16, 2, 9000
    rows = torch.arange(1, size + 1, dtype=torch.uint8)
    coord = torch.stack([rows.view(-1, 1).expand(size, size), rows.view(1, -1).expand(size, size)])
    x = coord.expand(n, 2, size, size)
    out = random_crop_flip(x, p, generator=torch.Generator().manual_seed(1))
    top, left, flipped = _offsets(out, p)
    for i in (0, 17, 4242):  # the decoded offsets reproduce the crop
        assert torch.equal(out[i], reference(x[i], int(top[i]), int(left[i]), bool(flipped[i]), p))
    for offsets in (top, left):
        counts = np.bincount(offsets, minlength=2 * p + 1)
        assert len(counts) == 2 * p + 1 and stats.chisquare(counts).pvalue > 1e-3, counts
    assert stats.binomtest(int(flipped.sum()), n).pvalue > 1e-3
    assert torch.equal(random_crop_flip(x, p, generator=torch.Generator().manual_seed(1)), out), "same seed, same crops"
    assert not torch.equal(random_crop_flip(x, p, generator=torch.Generator().manual_seed(2)), out)
    unflipped = random_crop_flip(x[:64], p, flip=False)
    assert (unflipped[:, 1, p, p + 1] > unflipped[:, 1, p, p]).all()


def test_device_batches_cover_the_epoch_seeded_with_the_trainer_augmentation():
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    data = ImageSet(images, torch.arange(50), augmentation(8, flip=True))
    batches = train_batches(data, 16, torch.device("cpu"))
    assert isinstance(batches, DeviceBatches) and len(batches) == 4 and (batches.padding, batches.flip) == (1, True)
    torch.manual_seed(3)
    first = list(batches)
    torch.manual_seed(3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, batches))
    labels = torch.cat([y for _, y in first])
    assert sorted(labels.tolist()) == list(range(50)), "every image once per epoch"
    x = torch.cat([x for x, _ in first])
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert not torch.equal((x * 255).round().to(torch.uint8), images[labels]), "augmented"
    plain = ImageSet(images, torch.arange(50))
    x, y = next(iter(train_batches(plain, 50, torch.device("cpu"))))
    assert torch.equal(x, images[y].float() / 255), "--augment none: the raw images"
    other = ImageSet(images, torch.arange(50), torch.nn.Identity())
    assert not isinstance(train_batches(other, 16, torch.device("cpu")), DeviceBatches), "any other transform: a DataLoader"


def test_learning_rate_rule_and_optimiser_implementation():
    assert scaled_lr(1e-3, 128, 1024) == pytest.approx(1e-3 * 8 ** 0.5)
    assert scaled_lr(1e-3, 128, 1024, "linear") == pytest.approx(8e-3)
    assert scaled_lr(3e-3, 64, 64) == 3e-3
    opt = adamw([dict(params=[torch.nn.Parameter(torch.ones(2))])], 1e-3, torch.device("cpu"))
    assert not opt.defaults["fused"]  # fused only on CUDA: CPU runs keep torch's default numerics (bit-exact resume)


def test_cli_scales_the_recipe_lr_with_the_global_batch(monkeypatch):
    from stochvit.cli import build_parser
    from stochvit.cli.train import train_config_from_args

    parse = build_parser().parse_args
    assert train_config_from_args(parse(["train"])).lr == 3e-3 / 2**0.5  # the digits recipe: batch 32
    assert train_config_from_args(parse(["train", "--batch-size", "256"])).lr == pytest.approx(6e-3)
    assert train_config_from_args(parse(["train", "--batch-size", "256", "--lr-base-scale", "linear"])).lr == \
        pytest.approx(3e-3 / 2**0.5 * 8)
    assert train_config_from_args(parse(["train", "--batch-size", "256", "--lr", "1e-3"])).lr == 1e-3
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert train_config_from_args(parse(["train", "--data", "cifar10", "--batch-size", "128"])).lr == pytest.approx(2e-3)


def _compile_works() -> bool:
    try:
        torch.compile(lambda t: t * 2)(torch.ones(2))
        return True
    except Exception:  # no C++ compiler, or inductor unsupported here
        return False


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    if not _compile_works():
        pytest.skip("torch.compile does not work on this machine")
    from stochvit.train import TrainConfig, train

    losses = []
    for name, compile_ in (("eager", False), ("compiled", True)):
        cfg = TrainConfig(stochastic=None, epochs=1, train_limit=64, batch_size=32, eval_samples=1, compile=compile_)
        run = train(cfg, out=tmp_path / name, quiet=True)
        losses.append(json.loads((run / "metrics.jsonl").read_text())["train_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
