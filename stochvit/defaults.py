"""The settings' choices and defaults, in one place that imports nothing heavy.

The layers, models, data and precision modules take their choices and defaults from here, and so does the command
line, which can then print them in `--help` without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "diagonal": ("uniform", "gaussian", "bernoulli"),
    "full": ("uniform", "gaussian", "orthogonal"),
}
SHARINGS = ("image", "batch", "token")
MODES = ("on", "mean", "off")  # stochastic layers: sample, expectation, identity
POSITIONS = ("pre_act", "post_act", "output")  # where the layer sits in the MLP
PRECISIONS = ("auto", "fp32", "bf16")
AUGMENTS = ("crop-flip", "none")  # training augmentation: random crop with padding and flip, or the raw images
SPECS_HELP = "digits | cifar10 | cifar100 | svhn | imagefolder:PATH, optionally with :classes=5-9 (indices or names)"

# the default stochastic layer: a per-channel scale U(0.5, 1.5) after fc1, one draw per image, in every block
DEFAULT_STOCHASTIC: dict[str, Any] = dict(
    kind="diagonal", distribution="uniform", low=0.5, high=1.5, sharing="image", position="pre_act", blocks=None
)

# the measurement library's names (stochvit.eval), for the command line's choices
NORMS = ("linf", "l2")  # threat models of the attacks
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast", "brightness", "jpeg",
               "pixelate")  # CIFAR-10-C style, stochvit.eval.corruptions
SEVERITIES = (1, 2, 3, 4, 5)
SPLIT_NAMES = ("first", "mid", "last")  # named split points of split inference (besides block counts)
TRANSFER_MODES = ("finetune", "linear-probe")
STOCHASTIC_TARGETS = ("keep", "off", "add")  # a transfer's stochastic layers: as the source, removed, or added


@dataclass
class AttackConfig:
    """Budgets of the two feature-inversion attacks (defaults sized for 8x8 digits on a CPU)."""

    decoder_steps: int = 1000
    decoder_batch: int = 64
    decoder_lr: float = 2e-3
    decoder_width: int = 64
    opt_steps: int = 300
    opt_lr: float = 0.05
    tv_weight: float = 0.01
