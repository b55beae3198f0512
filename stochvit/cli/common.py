"""The flags every subcommand shares, with one name per concept and defaults from the library.

One vocabulary: `--samples` is always the number of stochastic passes, `--seed` always seeds what a command samples,
`--precision` and `-b/--batch-size` go wherever a model runs, `--out` is where outputs go and `--overwrite` allows
replacing a report made with other settings. Old spellings stay accepted as hidden aliases. Nothing here imports
torch: `--help` prints at once.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..defaults import DEFAULT_STOCHASTIC, DISTRIBUTIONS, POSITIONS, PRECISIONS, SHARINGS, SPECS_HELP, recipe_help


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default."""


def add_command(sub: argparse._SubParsersAction, name: str, help: str, description: str | None = None,
                ) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help, formatter_class=Formatter)


def alias(p: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, dest: str, **kwargs: Any) -> None:
    """An old spelling of a flag, still accepted and hidden from --help."""
    p.add_argument(old, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


# -- values --------------------------------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def name_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}, got {text!r}")
        return names
    return parse


def parse_eps(text: str) -> float:
    """"8/255" or "0.03" -> float."""
    t = text.strip()
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(t)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"cannot read epsilon {text!r}: write e.g. 8/255 or 0.03") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"epsilon {text!r} must be a finite number >= 0")
    return value


def eps_list(text: str) -> list[float]:
    values = [parse_eps(t) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one epsilon, e.g. 1/255,2/255,4/255,8/255")
    return sorted(set(values))


# -- shared flags --------------------------------------------------------------------------------------------------

def add_data_args(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default, help=f"dataset: {SPECS_HELP}" + ("" if default else "; None: the run's own"))
    g.add_argument("--data-dir", default=None, help="folder holding torchvision dataset files (cifar10/cifar100/svhn)")


def add_split_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data split")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split (keep fixed across runs)")
    g.add_argument("--train-limit", type=int, default=None, help="keep a stratified subset of this many training images")
    g.add_argument("--img-size", type=int, default=None, help="resize imagefolder images to this size")


def add_layer_args(g: argparse._ArgumentGroup, what: str = "") -> None:
    """The stochastic layer's settings; defaults are the library's (`stochvit.defaults.DEFAULT_STOCHASTIC`)."""
    d = DEFAULT_STOCHASTIC
    g.add_argument("--kind", default=d["kind"], choices=tuple(DISTRIBUTIONS), help=f"diagonal scale or full random matrix{what}")
    g.add_argument("--distribution", default=d["distribution"], choices=sorted({x for v in DISTRIBUTIONS.values() for x in v}),
                   help="distribution of the sampled parameters")
    g.add_argument("--low", type=float, default=d["low"], help="lower end of the scale range (diagonal kind)")
    g.add_argument("--high", type=float, default=d["high"], help="upper end of the scale range (diagonal kind)")
    g.add_argument("--sharing", default=d["sharing"], choices=SHARINGS,
                   help="image: one draw per image shared by its tokens (token-consistent)")
    g.add_argument("--position", default=d["position"], choices=POSITIONS, help="where the layer sits in the MLP")
    g.add_argument("--blocks", type=int_list, default=d["blocks"], help="only these block indices, e.g. 0,1,2 (None: all)")


def layer_from_args(a: argparse.Namespace) -> dict:
    return {k: getattr(a, k) for k in DEFAULT_STOCHASTIC}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and stochastic layer")
    g.add_argument("--model", default=None, help=f"timm model name ({recipe_help('model')})")
    g.add_argument("--act", default="gelu", choices=("gelu", "relu"), help="MLP activation")
    g.add_argument("--drop-rate", type=float, default=0.0, help="dropout rate in the MLPs and projections")
    g.add_argument("--mc-dropout", action="store_true", help="keep dropout on at inference (MC dropout baseline)")
    g.add_argument("--stochastic", action=argparse.BooleanOptionalAction, default=True, help="use stochastic MLP layers")
    add_layer_args(g)


def add_samples(g, default: int, what: str = "stochastic passes averaged", old: tuple[str, ...] = ()) -> None:
    g.add_argument("--samples", type=int, default=default, help=f"K {what} (deterministic models use 1)")
    for name in old:
        alias(g, name, "samples", type=int)


def add_seed(g, what: str) -> None:
    g.add_argument("--seed", type=int, default=0, help=f"seeds {what}: the same command gives the same numbers")


def add_precision(g, default: str = "auto") -> None:
    g.add_argument("--precision", default=default, choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA, and on CPUs with native bf16 for models >= 128 wide; else fp32")


def add_batch_size(g, default: int | None, what: str = "images per forward pass") -> None:
    g.add_argument("-b", "--batch-size", type=int, default=default, help=what)


def add_out(p, default: str | None, what: str, required: bool = False) -> None:
    p.add_argument("--out", default=default, required=required, help=what)


def add_overwrite(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing report made with other settings (otherwise refused)")
