"""The `stochvit` command: one entry point, a subcommand per job.

Each suite module under `stochvit.suites` contributes its subcommand through `add_parser(subparsers)`.
User mistakes raise `UserError`, printed as one line with exit status 2 (never a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

from ..data import AUGMENTS, SPECS_HELP
from ..errors import UserError
from ..layers import DISTRIBUTIONS, MODES, SHARINGS
from ..mlp import POSITIONS
from ..precision import PRECISIONS

SUITES = ("demo", "calibration", "robustness", "privacy", "federated", "transfer", "study")


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_eps(text: str) -> float:
    """"8/255" or "0.03" -> float; argparse-friendly."""
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


def add_data_args(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default, help=f"dataset: {SPECS_HELP}" + (f" (default: {default})" if default else
                                                                                " (default: the run's own)"))
    g.add_argument("--data-dir", default=None, help="folder holding torchvision dataset files (cifar10/cifar100/svhn)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and stochastic layer")
    g.add_argument("--model", default=None, help="timm model name (default: vit_digits_patch2_8 for digits, "
                   "vit_tiny_patch4_32 otherwise)")
    g.add_argument("--act", default="gelu", choices=("gelu", "relu"), help="MLP activation")
    g.add_argument("--drop-rate", type=float, default=0.0, help="dropout rate in the MLPs and projections")
    g.add_argument("--mc-dropout", action="store_true", help="keep dropout on at inference (MC dropout baseline)")
    g.add_argument("--stochastic", action=argparse.BooleanOptionalAction, default=True, help="use stochastic MLP layers")
    g.add_argument("--kind", default="diagonal", choices=tuple(DISTRIBUTIONS))
    g.add_argument("--distribution", default="uniform", choices=sorted({d for v in DISTRIBUTIONS.values() for d in v}))
    g.add_argument("--low", type=float, default=0.5, help="lower end of the scale range (diagonal kind)")
    g.add_argument("--high", type=float, default=1.5, help="upper end of the scale range (diagonal kind)")
    g.add_argument("--sharing", default="image", choices=SHARINGS, help="image: token-consistent (default)")
    g.add_argument("--position", default="pre_act", choices=POSITIONS)
    g.add_argument("--blocks", type=int_list, default=None, help="only these block indices, e.g. 0,1,2 (default: all)")


def stochastic_from_args(a: argparse.Namespace) -> dict | None:
    if not a.stochastic:
        return None
    return dict(kind=a.kind, distribution=a.distribution, low=a.low, high=a.high, sharing=a.sharing,
                position=a.position, blocks=a.blocks)


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    g = p.add_argument_group("data split")
    g.add_argument("--download", action="store_true", help="allow torchvision to download the dataset (needs internet)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split (keep fixed across runs)")
    g.add_argument("--train-limit", type=int, default=None, help="keep a stratified subset of this many training images")
    g.add_argument("--img-size", type=int, default=None, help="resize imagefolder images to this size")
    add_model_args(p)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="default: 60 for digits, 10 otherwise")
    g.add_argument("--batch-size", type=int, default=None, help="default: 64 for digits, 128 otherwise")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 3e-3 for digits, 1e-3 otherwise)")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--warmup-epochs", type=float, default=2.0)
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--augment", default="crop-flip", choices=AUGMENTS,
                   help="training augmentation: random crop with padding and flip, or none (raw images)")
    g.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0 disables)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA, and on CPUs with native bf16 for models >= 128 wide")
    g.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    g.add_argument("--eval-samples", type=int, default=10, help="K stochastic passes for the final evaluation")
    g.add_argument("--val-every", type=int, default=1, help="validate every N epochs (always after the last)")
    g.add_argument("--fused", action="store_true", help="compile the default layer's scale into the activation "
                   "(torch.compile: seconds of compilation, then a faster training step; needs a C++ compiler on CPU)")
    g.add_argument("--init-weights", default=None, metavar="RUN_DIR|FILE",
                   help="start from these weights (a run directory's model.safetensors, or a .safetensors file) "
                        "instead of a random init, e.g. to fine-tune a run adversarially")
    g = p.add_argument_group("adversarial training")
    g.add_argument("--adv", default=None, choices=("pgd", "fgsm-rs"), help="train on PGD or fast FGSM-with-random-start examples")
    g.add_argument("--adv-eps", type=parse_eps, default=8 / 255, help="l-inf radius in [0,1] pixel units (default 8/255)")
    g.add_argument("--adv-steps", type=int, default=7, help="PGD steps (pgd only)")


# recipe defaults by dataset: digits is tiny (1,257 training images) and likes a short, hot schedule
RECIPES = {"digits": dict(epochs=60, batch_size=64, lr=3e-3), None: dict(epochs=10, batch_size=128, lr=1e-3)}


def init_weights_path(value: str | None) -> str | None:
    """`--init-weights` as an absolute safetensors path (a run directory means its model.safetensors)."""
    if value is None:
        return None
    path = Path(value).expanduser().resolve()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UserError(f"--init-weights {value}: no such run directory or weights file "
                        "(give a finished run directory or a .safetensors file)")
    return str(path)


def train_config_from_args(a: argparse.Namespace):
    """A TrainConfig from `train`'s flags; commands that share only some of them (federated) get the defaults."""
    from dataclasses import fields

    from ..train import TrainConfig

    base = a.data.split(":classes=")[0]  # a class subset keeps its parent dataset's recipe
    recipe = RECIPES.get(base, RECIPES[None])
    default = {f.name: f.default for f in fields(TrainConfig)}
    optional = {k: getattr(a, k, default[k])
                for k in ("download", "warmup_epochs", "label_smoothing", "augment", "workers", "val_every", "fused")}
    return TrainConfig(
        data=a.data, data_dir=a.data_dir, split_seed=a.split_seed, train_limit=a.train_limit,
        img_size=a.img_size, model=a.model or ("vit_digits_patch2_8" if base == "digits" else "vit_tiny_patch4_32"),
        act=a.act, drop_rate=a.drop_rate, mc_dropout=a.mc_dropout, stochastic=stochastic_from_args(a),
        **{k: recipe[k] if getattr(a, k, None) is None else getattr(a, k)  # 0 is an error
           for k in ("epochs", "batch_size", "lr")},
        weight_decay=a.weight_decay, clip_grad=a.clip_grad or None, seed=a.seed, precision=a.precision,
        eval_samples=a.eval_samples, init_weights=init_weights_path(getattr(a, "init_weights", None)), **optional,
    )


def flags_given_with(a: argparse.Namespace, command: str, keep: tuple[str, ...] = ()) -> list[str]:
    """The flags of `command` whose value differs from its default (given on the command line), as --names.

    `--resume` used to ignore `--epochs`, `--lr` and `--out` silently; this names them instead.
    """
    defaults = vars(build_parser().parse_args([command]))
    return [f"--{k.replace('_', '-')}" for k, v in vars(a).items()
            if k not in (*keep, "func", "command") and k in defaults and v != defaults[k]]


def cmd_train(a: argparse.Namespace) -> None:
    from ..train import is_main_process, train

    if a.resume:
        ignored = flags_given_with(a, "train", keep=("resume",))
        if ignored:
            raise UserError(f"--resume continues a run with its own settings and directory; remove {', '.join(ignored)} "
                            f"(a different schedule or --lr needs a new run)")
        path = train(resume=a.resume)
    else:
        cfg = train_config_from_args(a)
        if a.adv:
            cfg.adv = dict(method=a.adv, eps=a.adv_eps, steps=a.adv_steps)
        path = train(cfg, out=a.out)
    if not is_main_process():  # under torchrun only rank 0 reports
        return
    from ..runs import read_json

    s = read_json(path / "summary.json", "summary")
    t = s["test"]
    print(f"run: {path}\ntest accuracy {s['test_accuracy']:.4f} (single pass), {t['mc_average']['accuracy']:.4f} "
          f"(K={t['samples']} average); ECE {t['single_pass']['ece']['mean']:.4f}; trained in {s['train_seconds']:.0f} s")


def cmd_evaluate(a: argparse.Namespace) -> None:
    from ..suites.evaluate import run_evaluate

    if a.samples < 1:
        raise UserError("--samples must be >= 1")
    run_evaluate(a.run_dir, a.data, a.data_dir, a.samples, a.mode, a.split)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stochvit", description=__doc__.splitlines()[0].rstrip(":") if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a (stochastic) ViT into a run directory",
                       description="Train a ViT with token-consistent stochastic MLP layers (or a deterministic baseline).")
    add_train_args(p)
    p.add_argument("--out", default=None, help="run directory (default: runs/<timestamp>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run with its own settings (other flags are refused)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, NLL, Brier, ECE of a run (single-pass and K-sample)",
                       description="Evaluate a run directory; writes eval-*.json into it.")
    p.add_argument("run_dir")
    add_data_args(p, default=None)
    p.add_argument("--samples", type=int, default=10, help="K stochastic passes")
    p.add_argument("--mode", default="on", choices=MODES,
                   help="stochastic layers: sample (on), expectation (mean), identity (off)")
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.set_defaults(func=cmd_evaluate)

    for name in SUITES:
        try:
            module = importlib.import_module(f"stochvit.suites.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(("flwr", "stochvit.suites")):
                continue  # optional extra not installed, or suite not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"stochvit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stochvit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
