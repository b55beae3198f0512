"""stochvit: vision transformers with token-consistent stochastic layers, and suites that measure them.

The public names load on first use (PEP 562), so that `stochvit --help` does not pay for importing torch and timm.
`import stochvit` still registers the small-image ViTs in timm: at once when timm is already loaded, otherwise as
soon as timm is imported (an import hook), so `import stochvit; timm.create_model("vit_digits_patch2_8")` works.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # the only place: pyproject.toml reads it (dynamic version)

_PUBLIC = {
    "UserError": "errors",
    "MCDropout": "layers", "StochasticLinear": "layers", "is_random": "layers", "sampling": "layers",
    "StochasticMlp": "mlp", "destochastify": "mlp", "set_fused": "mlp", "stochastify": "mlp",
    "Normalized": "models", "create_model": "models",
    "predict_proba": "predict", "sample_probs": "predict",
    "load_run": "runs",
}

if TYPE_CHECKING:
    from .errors import UserError
    from .layers import MCDropout, StochasticLinear, is_random, sampling
    from .mlp import StochasticMlp, destochastify, set_fused, stochastify
    from .models import Normalized, create_model
    from .predict import predict_proba, sample_probs
    from .runs import load_run


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'stochvit' has no attribute {name!r}")


def load_model(run_dir: str | os.PathLike[str]) -> Normalized:
    """A finished run's model in eval mode, taking images in [0, 1] (the run's normalisation is part of it)."""
    from .runs import load_run

    return load_run(run_dir).model


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Imports `stochvit.models` (which registers its models with timm) right after timm itself is imported."""

    def find_spec(self, name, path, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_timm = spec.loader.exec_module

        def exec_module(module):
            exec_timm(module)
            importlib.import_module("stochvit.models")

        spec.loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    importlib.import_module("stochvit.models")
elif not any(isinstance(f, _RegisterWithTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTimm())

__all__ = [
    "MCDropout", "Normalized", "StochasticLinear", "StochasticMlp", "UserError", "create_model", "destochastify",
    "is_random", "load_model", "load_run", "predict_proba", "sample_probs", "sampling", "set_fused", "stochastify",
]
assert set(__all__) == {*_PUBLIC, "load_model"}
