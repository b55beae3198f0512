"""Shared fixtures: small digits runs trained once per test session and reused by every suite's tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stochvit.train import TrainConfig, train

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg"

torch.set_num_threads(1)  # small models; avoids thread oversubscription beside subprocess tests


def _quick_run(tmp: Path, name: str, **overrides) -> Path:
    cfg = TrainConfig(eval_samples=4, **overrides)
    return train(cfg, out=tmp / name, quiet=True)


@pytest.fixture(scope="session")
def digits_runs(tmp_path_factory) -> dict[str, Path]:
    """A deterministic and a stochastic digits run with the default digits recipe (conv stem, 60 epochs, ~0.98-0.99)."""
    tmp = tmp_path_factory.mktemp("runs")
    return {"deterministic": _quick_run(tmp, "det", stochastic=None), "stochastic": _quick_run(tmp, "stoch")}


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip("../shared/data/cifar10-jpeg is not present in this checkout")
    return SHARED_CIFAR
