"""`stochvit train`: flags -> `TrainConfig` -> `stochvit.train.train`."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path

from ..defaults import AUGMENTS, DATA_MODES, LR_SCALES, recipe_for, recipe_help
from ..errors import UserError
from .common import (
    add_batch_size,
    add_command,
    add_data_args,
    add_model_args,
    add_out,
    add_precision,
    add_runtime,
    add_samples,
    add_seed,
    add_split_args,
    add_tracking_args,
    layer_from_args,
    parse_eps,
    unused_dir,
    write_args_yaml,
)


def add_optimisation_args(p: argparse.ArgumentParser, federated: bool = False) -> argparse._ArgumentGroup:
    """The optimiser's flags shared by train and federated (local training)."""
    g = p.add_argument_group("local optimisation" if federated else "optimisation")
    add_batch_size(g, None, f"images per step ({recipe_help('batch_size')})")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate" + (", cosine-decayed over rounds" if federated
                   else "") + f" ({recipe_help('lr')})")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0 disables)")
    add_seed(g, "the initial model, the data order, the stochastic draws" + (" and the partition" if federated else ""))
    add_precision(g)
    add_samples(g, 10, "stochastic passes of the final evaluation", old=("--eval-samples",))
    return g


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "train", "train a (stochastic) ViT into a run directory",
                    "Train a ViT with token-consistent stochastic MLP layers (or a deterministic baseline).")
    add_data_args(p)
    add_split_args(p)
    g = p.add_argument_group("data split")
    g.add_argument("--download", action="store_true", help="allow torchvision to download the dataset (needs internet)")
    g.add_argument("--data-mode", default="auto", choices=DATA_MODES,
                   help="memory: decode into one uint8 tensor; stream: decode an imagefolder lazily in --workers "
                        "processes (stochvit.stream); auto: stream when decoded it would exceed 0.4 of available RAM")
    add_model_args(p)
    g = add_optimisation_args(p)
    g.add_argument("--epochs", type=int, default=None, help=recipe_help("epochs"))
    g.add_argument("--lr-base-scale", default="sqrt", choices=LR_SCALES,
                   help="without --lr: the recipe's rate times the square root (sqrt, timm's rule for Adam-family "
                        "optimisers) or the ratio (linear) of the global batch (--batch-size x WORLD_SIZE) to the recipe's")
    g.add_argument("--compile", action="store_true", help="torch.compile the training step (minutes of compilation on "
                   "a CPU, where it paid 1.10x for vit_tiny and nothing for digits; meant for CUDA)")
    g.add_argument("--warmup-epochs", type=float, default=2.0, help="linear warmup before the cosine decay")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the training loss")
    g.add_argument("--augment", default="crop-flip", choices=AUGMENTS,
                   help="training augmentation: random crop with padding and flip, or none (raw images)")
    g.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    g.add_argument("--val-every", type=int, default=1, help="validate every N epochs (always after the last)")
    g.add_argument("--fused", action="store_true", help="compile the default layer's scale into the activation "
                   "(torch.compile; needs a C++ compiler on CPU). Measured no faster than the eager layer on a 2-core "
                   "Xeon; --compile is the faster option there")
    g.add_argument("--init-weights", default=None, metavar="RUN_DIR|FILE",
                   help="start from these weights (a run directory's model.safetensors, a .safetensors file, or a plain "
                        ".pth state dict, read with weights_only=True) "
                        "instead of a random init, e.g. to fine-tune a run adversarially")
    g = p.add_argument_group("adversarial training")
    g.add_argument("--adv", default=None, choices=("pgd", "fgsm-rs"), help="train on PGD or fast FGSM-with-random-start examples")
    g.add_argument("--adv-eps", type=parse_eps, default=8 / 255, help="l-inf radius in [0,1] pixel units (8/255 = 0.0314)")
    g.add_argument("--adv-steps", type=int, default=7, help="PGD steps (pgd only)")
    add_tracking_args(p)
    add_out(p, None, "run directory (None: runs/<timestamp>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run with its own settings (other flags are refused, except --lr: "
                        "a new peak learning rate from the last checkpoint on, e.g. after a NaN loss)")
    add_runtime(p)
    p.set_defaults(func=command)


def init_weights_path(value: str | None) -> str | None:
    """`--init-weights` as an absolute safetensors path (a run directory means its model.safetensors)."""
    if value is None:
        return None
    path = Path(value).expanduser().resolve()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists():
        raise UserError(f"--init-weights {value}: no such run directory or weights file "
                        "(give a finished run directory, a .safetensors or a .pth file)")
    return str(path)


def train_config_from_args(a: argparse.Namespace):
    """A TrainConfig from `train`'s flags; commands that share only some of them (federated) get the defaults."""
    from ..train import TrainConfig

    default = {f.name: f.default for f in fields(TrainConfig)}
    optional = {k: getattr(a, k, default[k])
                for k in ("download", "warmup_epochs", "label_smoothing", "augment", "workers", "val_every", "fused",
                          "data_mode", "compile", "eval_metric", "log")}
    lr = getattr(a, "lr", None)
    if lr is None:  # the recipe's rate at the global batch
        from ..scale import scaled_lr

        recipe = recipe_for(a.data)
        batch = (getattr(a, "batch_size", None) or recipe["batch_size"]) * int(os.environ.get("WORLD_SIZE", "1"))
        lr = scaled_lr(recipe["lr"], recipe["batch_size"], batch, getattr(a, "lr_base_scale", "sqrt"))
    return TrainConfig(
        data=a.data, data_dir=a.data_dir, split_seed=a.split_seed, train_limit=a.train_limit,
        img_size=a.img_size, model=a.model,
        act=a.act, drop_rate=a.drop_rate, mc_dropout=a.mc_dropout, stochastic=layer_from_args(a) if a.stochastic else None,
        **{k: getattr(a, k, None) for k in ("epochs", "batch_size")}, lr=lr,  # None: the data's recipe; 0 is an error
        weight_decay=a.weight_decay, clip_grad=a.clip_grad or None, seed=a.seed, precision=a.precision,
        eval_samples=a.samples, init_weights=init_weights_path(getattr(a, "init_weights", None)), **optional,
    ).resolved()


def flags_given_with(a: argparse.Namespace, command: str, keep: tuple[str, ...] = ()) -> list[str]:
    """The flags of `command` whose value differs from its default (given on the command line), as sorted --names.

    `--resume` used to ignore `--epochs`, `--lr` and `--out` silently; this names them instead.
    """
    from . import build_parser

    defaults = vars(build_parser().parse_args([command]))
    return sorted(f"--{k.replace('_', '-')}" for k, v in vars(a).items()
                  if k not in (*keep, "func", "command") and k in defaults and v != defaults[k])


def command(a: argparse.Namespace) -> None:
    from ..train import is_main_process, new_run_dir, train

    if a.resume:
        ignored = flags_given_with(a, "train", keep=("resume", "lr", "threads", "device"))
        if ignored:
            raise UserError(f"--resume continues a run with its own settings and directory; remove {', '.join(ignored)} "
                            "(only --lr, --threads and --device may change, e.g. --lr after a NaN loss; a different "
                            "schedule needs a new run)")
        path = train(resume=a.resume, lr=a.lr, device=a.device)
    else:
        cfg = train_config_from_args(a)
        adv_flags = set(flags_given_with(a, "train")) & {"--adv-eps", "--adv-steps"}
        if adv_flags and not a.adv:
            raise UserError(f"{', '.join(sorted(adv_flags))} set adversarial training's budget; add --adv pgd|fgsm-rs")
        if "--adv-steps" in adv_flags and a.adv == "fgsm-rs":
            raise UserError("--adv-steps counts PGD steps; fgsm-rs takes one step (use --adv pgd, or drop --adv-steps)")
        if a.adv:
            cfg.adv = dict(method=a.adv, eps=a.adv_eps, steps=a.adv_steps)
        a.out = str(a.out or new_run_dir())  # args.yaml records the directory
        fresh = unused_dir(a.out) and is_main_process()
        try:
            path = train(cfg, out=a.out, device=a.device)
        finally:
            if fresh:
                write_args_yaml(a.out, a)
    if not is_main_process():  # under torchrun only rank 0 reports
        return
    from ..runs import read_json

    s = read_json(path / "summary.json", "summary")
    t = s["test"]
    print(f"run: {path}\ntest accuracy {s['test_accuracy']:.4f} (single pass), {t['mc_average']['accuracy']:.4f} "
          f"(K={t['samples']} average); ECE {t['single_pass']['ece']['mean']:.4f}; trained in {s['train_seconds']:.0f} s")
