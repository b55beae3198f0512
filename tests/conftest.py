"""Shared fixtures: small digits runs trained once per test session and reused by every suite's tests."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from stochvit.train import TrainConfig, train

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg"

torch.set_num_threads(1)  # small models; avoids thread oversubscription beside subprocess tests


DIGITS_EPOCHS = 20  # the recipe's model, batch and lr on all of digits, a third of its 60 epochs: ~0.94 / ~0.97


def _train_digits_runs(folder: Path) -> None:
    """The two runs of `digits_runs`, side by side (the deterministic one in a spawned process of one thread)."""
    sto = TrainConfig(epochs=DIGITS_EPOCHS, eval_samples=4)  # the default layer
    det = replace(sto, stochastic=None)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(1,)) as pool:
        det_run = pool.submit(train, det, out=folder / "det", quiet=True)
        train(sto, out=folder / "stoch", quiet=True)
        det_run.result()


@pytest.fixture(scope="session")
def digits_runs(tmp_path_factory) -> dict[str, Path]:
    """A deterministic and a stochastic digits run: the default digits recipe (conv stem) cut to DIGITS_EPOCHS epochs,
    trained once per test session. Under pytest-xdist (`-n 2`) the first worker that needs them trains them into the
    session's shared temp folder, under a file lock, and every worker uses its own copy (tests write reports into
    run directories)."""
    from filelock import FileLock

    tmp = tmp_path_factory.mktemp("runs")
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        _train_digits_runs(tmp)
    else:
        shared = tmp_path_factory.getbasetemp().parent / "digits-runs"  # the session's folder, above the workers'
        with FileLock(str(shared) + ".lock"):
            if not (shared / "done").exists():
                _train_digits_runs(shared)
                (shared / "done").touch()
        for name in ("det", "stoch"):
            shutil.copytree(shared / name, tmp / name)
    return {"deterministic": tmp / "det", "stochastic": tmp / "stoch"}


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip("../shared/data/cifar10-jpeg is not present in this checkout")
    return SHARED_CIFAR
