"""stochvit: vision transformers with token-consistent stochastic layers, and suites that measure them."""

from .errors import UserError
from .layers import MCDropout, StochasticLinear, is_random, sampling
from .mlp import StochasticMlp, destochastify, set_fused, stochastify
from .models import Normalized, create_model
from .predict import predict_proba, sample_probs

__version__ = "0.1.0"

__all__ = [
    "MCDropout", "Normalized", "StochasticLinear", "StochasticMlp", "UserError", "create_model", "destochastify",
    "is_random", "predict_proba", "sample_probs", "sampling", "set_fused", "stochastify",
]
