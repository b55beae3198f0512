"""`stochvit transfer`: fine-tune or linear-probe a pretrained (stochastic) ViT on a new task into a run directory.

The engine is `stochvit.eval.transfer`; this is its typed entry point, `run(Settings(source, out, ...))`.
"""

from __future__ import annotations

from pathlib import Path

from ..defaults import DEFAULT_STOCHASTIC
from .settings import TransferSettings as Settings


def run(s: Settings) -> Path:
    """Prepare and train the transferred run (what `stochvit transfer` does); returns the run directory."""
    from ..eval.transfer import transfer

    layer = {**DEFAULT_STOCHASTIC, **(s.layer or {})}
    return transfer(s.source, s.out, data=s.data, weights=s.weights, mode=s.transfer_mode, stochastic=s.stochastic_target,
                    layer=layer, backbone_lr_scale=s.backbone_lr_scale, **s.train)
