"""`stochvit transfer --from SOURCE`: flags -> `suites.transfer.Settings` -> `run`."""

from __future__ import annotations

import argparse

from ..defaults import STOCHASTIC_TARGETS, TRANSFER_MODES
from ..suites.settings import TransferSettings as S
from ..suites.settings import default
from .common import (
    add_batch_size,
    add_command,
    add_data_args,
    add_layer_args,
    add_out,
    add_precision,
    add_runtime,
    add_samples,
    add_seed,
    add_split_args,
    add_tracking_args,
    alias,
    layer_from_args,
    unused_dir,
    write_args_yaml,
)

DESCRIPTION = """Transfer pretrained weights to a new task. --from is a stochvit run directory or a timm model name
with --weights PATH (.safetensors or .pth state dict; nothing is downloaded). The head is replaced for the new
classes, position embeddings are resampled when the patch grid differs and the first convolution is adapted to the
number of input channels (timm's helpers). --stochastic-target keeps the source's stochastic layers, turns them off,
or adds them (settings from --kind/--distribution/...) to a deterministic source. The output is a normal run directory
(evaluate, calibration, robustness and privacy accept it) with a transfer section in config.json and transfer.md.
Class-split tasks: --data digits:classes=5-9 (or imagefolder:PATH:classes=dog,frog,...)."""

TRAIN_FLAGS = ("data_dir", "train_limit", "img_size", "split_seed", "epochs", "lr", "batch_size", "weight_decay",
               "warmup_epochs", "seed", "precision", "eval_metric", "log")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "transfer", "fine-tune / linear-probe pretrained weights (run or timm) on a new task", DESCRIPTION)
    p.add_argument("--from", dest="source", required=True, metavar="RUN_DIR|TIMM_NAME", help="pretrained source")
    p.add_argument("--weights", default=None, metavar="PATH", help="local weights for a timm model name (.safetensors or .pth)")
    add_data_args(p, default(S, "data"))
    add_split_args(p)
    g = p.add_argument_group("transfer")
    g.add_argument("--transfer-mode", default=default(S, "transfer_mode"), choices=TRANSFER_MODES,
                   help="train everything, or only a new head on frozen features")
    alias(g, "--mode", "transfer_mode", choices=TRANSFER_MODES)
    g.add_argument("--stochastic-target", default=default(S, "stochastic_target"), choices=STOCHASTIC_TARGETS,
                   help="the stochastic layers: as the source has them, removed, or added")
    alias(g, "--stochastic", "stochastic_target", choices=STOCHASTIC_TARGETS)
    g.add_argument("--backbone-lr-scale", type=float, default=default(S, "backbone_lr_scale"),
                   help="finetune: backbone lr = lr * this (e.g. 0.1)")
    add_layer_args(p.add_argument_group("stochastic layer for --stochastic-target add"))
    g = p.add_argument_group("optimisation (None: the transfer recipe)")
    g.add_argument("--epochs", type=int, default=None, help="None: 20")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (None: 1e-3 finetune, 1e-2 linear-probe)")
    add_batch_size(g, None, "images per step (None: 64)")
    g.add_argument("--weight-decay", type=float, default=None, help="None: 0.05")
    g.add_argument("--warmup-epochs", type=float, default=None, help="None: 2")
    add_seed(g, "the training, the new head's init and the stochastic draws")
    add_precision(g)
    add_samples(g, 10, "stochastic passes of the final evaluation", old=("--eval-samples",))
    add_tracking_args(p)
    add_out(p, None, "new run directory", required=True)
    add_runtime(p)
    p.set_defaults(func=command)


def command(a: argparse.Namespace) -> None:
    from ..suites.transfer import Settings, run

    train = {k: getattr(a, k) for k in TRAIN_FLAGS} | dict(eval_samples=a.samples)
    fresh = unused_dir(a.out)
    try:
        r = run(Settings(a.source, a.out, a.weights, a.data, a.transfer_mode, a.stochastic_target, layer_from_args(a),
                         a.backbone_lr_scale, train, a.device))
    finally:
        if fresh:
            write_args_yaml(a.out, a)
    s, path = r.summary, r.out
    t = s["test"]
    print((path / "transfer.md").read_text())
    print(f"run: {path}\ntest accuracy {s['test_accuracy']:.4f} (single pass), {t['mc_average']['accuracy']:.4f} "
          f"(K={t['samples']} average); ECE {t['single_pass']['ece']['mean']:.4f}")
