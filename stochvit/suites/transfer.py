"""`stochvit transfer`: fine-tune or linear-probe a pretrained (stochastic) ViT on a new task into a run directory."""

from __future__ import annotations

import argparse

from ..cli import add_data_args, int_list
from ..layers import DISTRIBUTIONS, SHARINGS
from ..mlp import POSITIONS
from ..precision import PRECISIONS

DESCRIPTION = """Transfer pretrained weights to a new task. --from is a stochvit run directory or a timm model name
with --weights PATH (.safetensors or .pth state dict; nothing is downloaded). The head is replaced for the new
classes, position embeddings are resampled when the patch grid differs and the first convolution is adapted to the
number of input channels (timm's helpers). --stochastic keeps the source's stochastic layers, turns them off, or adds
them (settings from --kind/--distribution/...) to a deterministic source. The output is a normal run directory
(evaluate, calibration, robustness and privacy accept it) with a transfer section in config.json and transfer.md.
Class-split tasks: --data digits:classes=5-9 (or imagefolder:PATH:classes=dog,frog,...)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..eval.transfer import MODES, STOCHASTIC_MODES

    p = subparsers.add_parser("transfer", help="fine-tune / linear-probe pretrained weights (run or timm) on a new task",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, metavar="RUN_DIR|TIMM_NAME", help="pretrained source")
    p.add_argument("--weights", default=None, metavar="PATH", help="local weights for a timm model name (.safetensors or .pth)")
    add_data_args(p)
    p.add_argument("--train-limit", type=int, default=None, help="keep a stratified subset of this many training images")
    p.add_argument("--img-size", type=int, default=None, help="resize imagefolder images to this size")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split")
    g = p.add_argument_group("transfer")
    g.add_argument("--mode", default="finetune", choices=MODES, help="train everything, or only a new head on frozen features")
    g.add_argument("--stochastic", default="keep", choices=STOCHASTIC_MODES, help="stochastic layers (default: keep)")
    g.add_argument("--backbone-lr-scale", type=float, default=1.0, help="finetune: backbone lr = lr * this (e.g. 0.1)")
    g = p.add_argument_group("stochastic layer settings for --stochastic add")
    g.add_argument("--kind", default="diagonal", choices=tuple(DISTRIBUTIONS))
    g.add_argument("--distribution", default="uniform", choices=sorted({d for v in DISTRIBUTIONS.values() for d in v}))
    g.add_argument("--low", type=float, default=0.5)
    g.add_argument("--high", type=float, default=1.5)
    g.add_argument("--sharing", default="image", choices=SHARINGS)
    g.add_argument("--position", default="pre_act", choices=POSITIONS)
    g.add_argument("--blocks", type=int_list, default=None, help="only these block indices (default: all)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="default 20")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 finetune, 1e-2 linear-probe)")
    g.add_argument("--batch-size", type=int, default=None, help="default 64")
    g.add_argument("--weight-decay", type=float, default=None, help="default 0.05")
    g.add_argument("--warmup-epochs", type=float, default=None, help="default 2")
    g.add_argument("--seed", type=int, default=None, help="training seed (also the new head's init; default 0)")
    g.add_argument("--precision", default=None, choices=PRECISIONS)
    g.add_argument("--eval-samples", type=int, default=None, help="K stochastic passes for the final evaluation (default 10)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="new run directory")
    p.set_defaults(func=cmd_transfer)


def cmd_transfer(a: argparse.Namespace) -> None:
    from ..eval.transfer import transfer
    from ..runs import read_json

    layer = dict(kind=a.kind, distribution=a.distribution, low=a.low, high=a.high, sharing=a.sharing, position=a.position,
                 blocks=a.blocks)
    path = transfer(a.source, a.out, data=a.data, weights=a.weights, mode=a.mode, stochastic=a.stochastic, layer=layer,
                    backbone_lr_scale=a.backbone_lr_scale, data_dir=a.data_dir, train_limit=a.train_limit, img_size=a.img_size,
                    split_seed=a.split_seed, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, weight_decay=a.weight_decay,
                    warmup_epochs=a.warmup_epochs, seed=a.seed, precision=a.precision, eval_samples=a.eval_samples)
    s = read_json(path / "summary.json", "summary")
    t = s["test"]
    print((path / "transfer.md").read_text())
    print(f"run: {path}\ntest accuracy {s['test_accuracy']:.4f} (single pass), {t['mc_average']['accuracy']:.4f} "
          f"(K={t['samples']} average); ECE {t['single_pass']['ece']['mean']:.4f}")
