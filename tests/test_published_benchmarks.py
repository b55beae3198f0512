"""Published benchmarks: the study's frozen shift set, CIFAR-10-C's released files, evaluation on another folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stochvit.data import ImageSet, load_data
from stochvit.eval.corruptions import CORRUPTIONS, ORIGINAL_CORRUPTIONS, SEVERITIES
from stochvit.suites.study_runs import shift_set

REFERENCE = Path(__file__).parent / "data" / "study_shift_reference.npz"


def test_study_shift_set_keeps_the_original_eight_corruptions():
    """The CIFAR-10 study caches predictions on its shift set: widening the built-in kinds must not change it."""
    assert ORIGINAL_CORRUPTIONS == ("gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast",
                                    "brightness", "jpeg", "pixelate")
    assert CORRUPTIONS[:8] == ORIGINAL_CORRUPTIONS  # a kind's place seeds its noise: new kinds only at the end
    assert len(CORRUPTIONS) > 8
    # the very images: shift sets made before the wider set existed (digits, and colour images stored as input)
    ref = np.load(REFERENCE)
    digits = shift_set(load_data("digits").test, 80, seed=0)
    rgb = shift_set(ImageSet(torch.from_numpy(ref["rgb_input"]), torch.arange(40) % 10), 40, seed=0)
    for got, want in ((digits.images, ref["digits"]), (rgb.images, ref["rgb"])):
        diff = (got.int() - torch.from_numpy(want).int()).abs()
        # identical here; one grey level of float rounding allowed on other CPUs, on a few pixels at most
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (diff.max(), (diff > 0).float().mean())
    assert np.array_equal(digits.labels.numpy(), ref["digits_labels"])
    assert len(SEVERITIES) * len(ORIGINAL_CORRUPTIONS) == 40  # the 8 x 5 grid the study's docs name
