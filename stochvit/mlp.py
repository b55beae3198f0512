"""`StochasticMlp`, a drop-in for `timm.layers.Mlp`, and `stochastify`, which converts timm models.

The stochastic layer has no parameters, so conversion never touches weights: state dicts of a
converted model and of the plain timm model are interchangeable.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from timm.layers import Mlp
from torch import nn

from .defaults import DEFAULT_LAYER, LayerConfig
from .layers import StochasticLinear

Position = Literal["pre_act", "post_act", "output"]


class StochasticMlp(Mlp):
    """timm `Mlp` with a `StochasticLinear` at `position`.

    "pre_act": after fc1, before the activation (the authors' choice); "post_act": after the
    activation; "output": on the MLP output. Remaining keywords configure the layer.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        *args: Any,
        position: Position = DEFAULT_LAYER.position,
        kind: str = DEFAULT_LAYER.kind,
        distribution: str = DEFAULT_LAYER.distribution,
        low: float = DEFAULT_LAYER.low,
        high: float = DEFAULT_LAYER.high,
        sharing: str = DEFAULT_LAYER.sharing,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_features, hidden_features, out_features, *args, **kwargs)
        self._attach(position, dict(kind=kind, distribution=distribution, low=low, high=high, sharing=sharing))

    def _attach(self, position: str, layer_cfg: dict[str, Any]) -> None:
        cfg = LayerConfig(position=position, **layer_cfg)  # the settings' checks
        if not isinstance(self.fc1, nn.Linear):
            raise ValueError("StochasticMlp needs token-last nn.Linear layers (use_conv=True is not supported)")
        self.position = position
        self.fused: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # act(h * s) kernel, see set_fused
        width = self.fc2.out_features if position == "output" else self.fc1.out_features
        self.stochastic = StochasticLinear(width, **cfg.layer_kwargs())

    @classmethod
    def from_mlp(cls, mlp: Mlp, position: Position = DEFAULT_LAYER.position, **layer_cfg: Any) -> StochasticMlp:
        """Wrap an existing `Mlp`, sharing its submodules (and so its weights)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in vars(mlp).items() if not k.startswith("_")})  # plain attributes
        for name, child in mlp.named_children():
            new.add_module(name, child)
        new._attach(position, layer_cfg)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.fused is not None and torch.is_grad_enabled() and self.stochastic.mode == "on":  # training only
            x = self.fused(x, self.stochastic.draw(x))
        else:
            if self.position == "pre_act":
                x = self.stochastic(x, inplace=True)  # x is our own intermediate
            x = self.act(x)
        if self.position == "post_act":
            x = self.stochastic(x, inplace=True)  # x is our own intermediate
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        if self.position == "output":
            x = self.stochastic(x, inplace=True)  # x is our own intermediate
        return x


def set_fused(model: nn.Module, on: bool = True) -> int:
    """Fuse the default layer's scale into the activation, act(fc1(x) * s), as one kernel compiled by torch.compile.

    Eager PyTorch spends one extra elementwise pass over the hidden features on the scale, forward and backward; the
    compiled kernel folds it into the activation's own pass. Now that the eager layer no longer scales in place under
    autograd, this does not pay on the 2-core Xeon measured: 0.916 of the plain model against the eager layer's 0.955
    in one run (benchmarks/RESULTS.md); `torch.compile` of the whole model (`train --compile`) is the way to a free
    layer. It applies to diagonal layers at position "pre_act" while
    they sample (mode "on") with gradients enabled, i.e. to training steps: under no_grad the eager in-place path was as
    fast or faster (benchmarks/RESULTS.md). The draws are the same as the eager path's. The first call compiles
    (seconds; needs a C++ compiler on CPU); without one stochvit warns once and stays eager. Returns how many MLPs
    were switched (the others keep their eager layer).
    """
    mlps = [m for m in model.modules()
            if isinstance(m, StochasticMlp) and m.position == "pre_act" and m.stochastic.kind == "diagonal"]
    for m in mlps:
        m.fused = _fused_scale_act(m.act) if on else None
    return len(mlps)


_COMPILED: dict[str, Callable] = {}
_EAGER_ONLY: list[str] = []  # set once compilation has failed: every later call stays eager


def _fused_scale_act(act: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """act(h * s), compiled once per activation; falls back to eager (with one warning) when compilation fails."""
    key = repr(act)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(lambda h, s: act(h * s), dynamic=None)
    compiled = _COMPILED[key]

    def run(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if not _EAGER_ONLY:
            try:
                return compiled(h, s)
            except Exception as e:  # noqa: BLE001 - any compiler failure (no C++ compiler, unsupported op) means eager
                _EAGER_ONLY.append(f"{type(e).__name__}: {e}"[:300])
                warnings.warn(f"stochvit: the fused scale could not be compiled ({_EAGER_ONLY[0]}); running eager",
                              stacklevel=2)
        return act(h * s)  # training: in place on fc1's output (a view) would copy it in the backward

    return run


def _mlps_in(model: nn.Module, blocks: Iterable[int] | None) -> list[tuple[nn.Module, str, Mlp]]:
    """(parent, attribute, mlp) for each plain timm Mlp, restricted to `model.blocks[i]` if asked."""
    roots: list[nn.Module] = [model]
    if blocks is not None:
        if not hasattr(model, "blocks"):
            raise ValueError(f"blocks={list(blocks)} given but {type(model).__name__} has no .blocks")
        n = len(model.blocks)
        indices = list(blocks)
        bad = [i for i in indices if not -n <= i < n]
        if bad:
            raise ValueError(f"blocks={indices}: indices {bad} are out of range for a model with {n} blocks")
        roots = [model.blocks[i] for i in indices]
    found = []
    for root in roots:
        for parent in root.modules():
            for name, child in parent.named_children():
                if type(child) is Mlp:
                    found.append((parent, name, child))
    return found


def stochastify(model: nn.Module, blocks: Iterable[int] | None = None, position: Position = DEFAULT_LAYER.position,
                **layer_cfg: Any) -> int:
    """Convert, in place, every timm `Mlp` of `model` (or of `model.blocks[i]` for i in `blocks`).

    Returns the number of MLPs converted. Weights are untouched.
    """
    LayerConfig(position=position, **layer_cfg)  # validate the settings once, before touching the model
    converted = _mlps_in(model, blocks)
    for parent, name, mlp in converted:
        setattr(parent, name, StochasticMlp.from_mlp(mlp, position, **layer_cfg))
    return len(converted)


def destochastify(model: nn.Module) -> int:
    """Turn every `StochasticMlp` back into a plain timm `Mlp` (same weights). Returns the count."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, StochasticMlp):
                plain = Mlp.__new__(Mlp)
                nn.Module.__init__(plain)
                for key in ("fc1", "act", "drop1", "norm", "fc2", "drop2"):
                    plain.add_module(key, getattr(child, key))
                setattr(parent, name, plain)
                count += 1
    return count
