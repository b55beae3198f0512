"""Shared fixtures: small digits runs trained once per test session and reused by every suite's tests."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from stochvit.train import TrainConfig, train

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg"

torch.set_num_threads(1)  # small models; avoids thread oversubscription beside subprocess tests


DIGITS_EPOCHS = 20  # the recipe's model, batch and lr on all of digits, a third of its 60 epochs: ~0.94 / ~0.97


@pytest.fixture(scope="session")
def digits_runs(tmp_path_factory) -> dict[str, Path]:
    """A deterministic and a stochastic digits run: the default digits recipe (conv stem) cut to DIGITS_EPOCHS epochs,
    trained side by side (the deterministic one in a spawned process of one thread), once per session."""
    tmp = tmp_path_factory.mktemp("runs")
    sto = TrainConfig(epochs=DIGITS_EPOCHS, eval_samples=4)  # the default layer
    det = replace(sto, stochastic=None)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(1,)) as pool:
        det_run = pool.submit(train, det, out=tmp / "det", quiet=True)
        sto_run = train(sto, out=tmp / "stoch", quiet=True)
        return {"deterministic": det_run.result(), "stochastic": sto_run}


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip("../shared/data/cifar10-jpeg is not present in this checkout")
    return SHARED_CIFAR
