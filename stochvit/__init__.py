"""stochvit: vision transformers with token-consistent stochastic layers, and suites that measure them."""

import os

from .errors import UserError
from .layers import MCDropout, StochasticLinear, is_random, sampling
from .mlp import StochasticMlp, destochastify, set_fused, stochastify
from .models import Normalized, create_model
from .predict import predict_proba, sample_probs
from .runs import load_run

__version__ = "0.1.0"  # the only place: pyproject.toml reads it (dynamic version)


def load_model(run_dir: str | os.PathLike[str]) -> Normalized:
    """A finished run's model in eval mode, taking images in [0, 1] (the run's normalisation is part of it)."""
    return load_run(run_dir).model


__all__ = [
    "MCDropout", "Normalized", "StochasticLinear", "StochasticMlp", "UserError", "create_model", "destochastify",
    "is_random", "load_model", "load_run", "predict_proba", "sample_probs", "sampling", "set_fused", "stochastify",
]
