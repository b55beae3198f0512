"""`stochvit transfer`: fine-tune or linear-probe a pretrained (stochastic) ViT on a new task into a run directory.

The engine is `stochvit.eval.transfer`; this is its typed entry point, `run(Settings(source, out, ...))`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..defaults import DEFAULT_STOCHASTIC
from .settings import Result
from .settings import TransferSettings as Settings


@dataclass
class TransferResult(Result):
    """`out`: the new run directory (its transfer.md says what was transferred); `summary`: its summary.json."""

    summary: dict


def run(s: Settings) -> TransferResult:
    """Prepare and train the transferred run (what `stochvit transfer` does) into the run directory `s.out`."""
    from ..eval.transfer import transfer
    from ..runs import read_json

    layer = {**DEFAULT_STOCHASTIC, **(s.layer or {})}
    path = transfer(s.source, s.out, data=s.data, weights=s.weights, mode=s.transfer_mode, stochastic=s.stochastic_target,
                    layer=layer, backbone_lr_scale=s.backbone_lr_scale, device=s.device, **s.train)
    return TransferResult(path, read_json(path / "summary.json", "summary"))
