"""The settings' choices and defaults, in one place that imports nothing heavy.

The layers, models, data and precision modules take their choices and defaults from here, and so does the command
line, which can then print them in `--help` without loading torch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
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
DATA_MODES = ("auto", "memory", "stream")  # auto: stream an image folder whose decoded size exceeds the memory budget
LR_SCALES = ("sqrt", "linear")  # how a recipe's learning rate follows the global batch (stochvit.scale.scaled_lr)
SPECS_HELP = "digits | cifar10 | cifar100 | svhn | imagefolder:PATH, optionally with :classes=5-9 (indices or names)"

MAX_SCALE = 1e4  # largest |low| / |high| accepted: a scale of 1e308 made the sampler's range infinite


def check_choice(name: str, value: Any, allowed: tuple) -> Any:
    """`value` if it is one of `allowed`, else a ValueError naming the setting and its choices."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")
    return value


@dataclass(frozen=True)
class LayerConfig:
    """The stochastic layer's settings: the one place of their defaults and their checks.

    kind, distribution, low, high and sharing configure `stochvit.StochasticLinear`; position is where it sits in the
    MLP (`stochvit.StochasticMlp`); blocks are the block indices that get one (None: every block). The default is a
    per-channel scale U(0.5, 1.5) after fc1, one draw per image, in every block. The JSON form, `to_dict()` (read back
    by `from_dict`), is what a run's config.json stores under "stochastic" and what `TrainConfig.stochastic` holds;
    the command line's flags and the Flower app's run-config keys are its fields.
    """

    kind: str = "diagonal"
    distribution: str = "uniform"
    low: float = 0.5
    high: float = 1.5
    sharing: str = "image"
    position: str = "pre_act"
    blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, tuple(DISTRIBUTIONS))
        check_choice("distribution", self.distribution, DISTRIBUTIONS[self.kind])
        check_choice("sharing", self.sharing, SHARINGS)
        check_choice("position", self.position, POSITIONS)
        if self.kind == "full" and self.sharing == "token":
            raise ValueError("sharing='token' is only defined for kind='diagonal' (a full matrix per token is not a token map)")
        for side in ("low", "high"):
            v = getattr(self, side)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or abs(v) > MAX_SCALE:
                raise ValueError(f"invalid {side}={v}: must be a finite number within +-{MAX_SCALE:g} (scales that "
                                 "large overflow the activations; the default range is 0.5..1.5)")
        if self.low > self.high:
            raise ValueError(f"low={self.low} must not exceed high={self.high} (the variance (high-low)^2/12 would be negative)")
        if self.kind == "diagonal" and self.distribution == "bernoulli" and self.low + self.high <= 0:
            raise ValueError(f"distribution='bernoulli' needs a positive mean (low+high)/2, got {(self.low + self.high) / 2}")
        if self.blocks is not None:
            ok = isinstance(self.blocks, (list, tuple)) and all(isinstance(b, int) and not isinstance(b, bool)
                                                                 for b in self.blocks)
            if not ok:
                raise ValueError(f"blocks={self.blocks!r} must be a list of block indices (or None: every block)")
            if not self.blocks:  # an empty list used to surface as the model "has no timm Mlp"
                raise ValueError("blocks is empty: give block indices such as 0,1 (None for every block; a deterministic "
                                 "model has no stochastic layer at all)")
            object.__setattr__(self, "blocks", tuple(self.blocks))

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> LayerConfig:
        """From the JSON form; missing keys take the defaults, unknown keys are refused."""
        known = [f.name for f in fields(cls)]
        if unknown := set(settings) - set(known):
            raise ValueError(f"stochastic: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**settings)

    @classmethod
    def coerce(cls, stochastic: bool | dict | LayerConfig | None) -> LayerConfig | None:
        """None for a deterministic model (None or False), the default layer for True, else the given settings."""
        if stochastic is None or stochastic is False:
            return None
        if stochastic is True:
            return cls()
        if isinstance(stochastic, cls):
            return stochastic
        if not isinstance(stochastic, dict):
            raise ValueError(f"stochastic must be True, False or a dict of layer settings, got {stochastic!r}")
        return cls.from_dict(stochastic)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the dict a run's config.json has always stored (blocks a list, or None)."""
        return {**asdict(self), "blocks": None if self.blocks is None else list(self.blocks)}

    def layer_kwargs(self) -> dict[str, Any]:
        """The `StochasticLinear` keywords (everything but position and blocks)."""
        return dict(kind=self.kind, distribution=self.distribution, low=self.low, high=self.high, sharing=self.sharing)


DEFAULT_LAYER = LayerConfig()
DEFAULT_STOCHASTIC: dict[str, Any] = DEFAULT_LAYER.to_dict()  # its JSON form (the command line's defaults)


# per-dataset training recipes: what a TrainConfig field left None takes. digits is tiny (1,257 training images)
# and likes a short, hot schedule on its 8x8 model behind a 3x3 conv stem (the plain patch-2 model, whose tokens carry
# 4 pixels, sits near chance for 10 epochs: benchmarks/RESULTS.md), in batches of 32 (twice the steps of batch 64,
# 1.2x its training time; 3e-3 at 64 scaled by the square-root rule): the deterministic model's 0.983-0.989 test
# accuracy at batch 64 became 0.989 on seeds 0-2, the stochastic one's 0.989-0.994 became 0.983-0.989 (one test image
# is 0.56 points); every other dataset gets the CIFAR-size recipe.
RECIPES: dict[str, dict[str, Any]] = {
    "digits": dict(model="vit_digits_convstem_8", epochs=60, batch_size=32, lr=3e-3 / 2**0.5),
    "default": dict(model="vit_tiny_patch4_32", epochs=10, batch_size=128, lr=1e-3),  # cifar10, cifar100, svhn, imagefolder
}


def recipe_for(data: str) -> dict[str, Any]:
    """The training recipe (model, epochs, batch_size, lr) of a data spec; a class subset keeps its parent's recipe."""
    base = data.split(":classes=")[0]
    return dict(RECIPES.get(base, RECIPES["default"]))


# Models small enough that a second intra-op thread buys nothing idle and collapses under load: measured for the digits
# ViT by `benchmarks/throughput.py --sections threads` (benchmarks/RESULTS.md). The CLI trains them on one thread
# unless --threads or OMP_NUM_THREADS says otherwise; larger models keep torch's default, one thread per core.
ONE_THREAD_MODELS = ("vit_digits_patch2_8", "vit_digits_convstem_8")


def default_threads(model: str | None) -> int | None:
    """The CLI's thread count for training `model` when neither --threads nor OMP_NUM_THREADS is given (None: torch's)."""
    return 1 if model in ONE_THREAD_MODELS else None


def recipe_text(data: str = "digits") -> str:
    """A recipe in words, for `--help`: "vit_digits_convstem_8, 60 epochs, batch 32, lr 0.00212"."""
    r = recipe_for(data)
    return f"{r['model']}, {r['epochs']} epochs, batch {r['batch_size']}, lr {r['lr']:.3g}"


def recipe_help(key: str) -> str:
    """How a recipe field left None resolves, for `--help`: "None: 60 for digits, 10 otherwise"."""
    return f"None: {RECIPES['digits'][key]} for digits, {RECIPES['default'][key]} otherwise"


# the measurement library's names (stochvit.eval), for the command line's choices
NORMS = ("linf", "l2")  # threat models of the attacks
# CIFAR-10-C style, stochvit.eval.corruptions; new kinds go at the end (a kind's place seeds its noise)
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast", "brightness", "jpeg",
               "pixelate", "speckle_noise", "defocus_blur", "motion_blur", "zoom_blur", "glass_blur", "elastic_transform",
               "fog", "snow")
# the first release's 8 kinds: the calibration suite's default and the study's shift set (cached predictions depend on it)
ORIGINAL_CORRUPTIONS = CORRUPTIONS[:8]
# the released CIFAR-10-C / CIFAR-100-C files (stochvit.eval.cifar_c): the 15 kinds the literature averages over
# (mean corruption error), then the 4 held-out extras of the release
CIFAR_C_STANDARD = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
                    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
                    "jpeg_compression")
CIFAR_C_EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
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
