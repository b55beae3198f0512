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

# per-dataset training recipes: what a TrainConfig field left None takes. digits is tiny (1,257 training images)
# and likes a short, hot schedule on its 8x8 model; every other dataset gets the CIFAR-size recipe.
RECIPES: dict[str, dict[str, Any]] = {
    "digits": dict(model="vit_digits_patch2_8", epochs=60, batch_size=64, lr=3e-3),
    "default": dict(model="vit_tiny_patch4_32", epochs=10, batch_size=128, lr=1e-3),  # cifar10, cifar100, svhn, imagefolder
}


def recipe_for(data: str) -> dict[str, Any]:
    """The training recipe (model, epochs, batch_size, lr) of a data spec; a class subset keeps its parent's recipe."""
    base = data.split(":classes=")[0]
    return dict(RECIPES.get(base, RECIPES["default"]))


def recipe_help(key: str) -> str:
    """How a recipe field left None resolves, for `--help`: "None: 60 for digits, 10 otherwise"."""
    return f"None: {RECIPES['digits'][key]} for digits, {RECIPES['default'][key]} otherwise"


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
