"""`stochvit demo`: flags -> `suites.demo.Settings` -> `run`."""

from __future__ import annotations

import argparse

from ..defaults import recipe_text
from ..suites.settings import DemoSettings as S
from ..suites.settings import default
from .common import add_batch_size, add_command, add_out, add_overwrite, add_precision, add_runtime, add_samples, add_seed


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "demo", "main job: train a deterministic and a stochastic ViT on digits and compare their calibration",
                    "Train a deterministic and a token-consistent stochastic ViT on the embedded digits data (the default "
                    f"digits recipe: {recipe_text()}, 3x3 conv stem; finished runs under --out are reused), then "
                    "print the side-by-side calibration table: accuracy, NLL, Brier, ECE variants, AURC, AUROC, with "
                    "temperature scaling and under CIFAR-10-C style corruptions.")
    add_out(p, default(S, "out"), "output folder for the two runs and OUT/calibration")
    g = p.add_argument_group("evaluation")
    add_samples(g, default(S, "samples"))
    g.add_argument("--shift", action=argparse.BooleanOptionalAction, default=default(S, "shift"),
                   help="also evaluate on corrupted test copies")
    add_seed(g, "both trainings and the evaluation's stochastic passes")
    add_precision(g, default(S, "precision"))
    add_batch_size(g, default(S, "batch_size"), "images per forward pass of the evaluation")
    add_overwrite(p)
    add_runtime(p)
    p.set_defaults(func=command)


def command(a: argparse.Namespace) -> None:
    from ..suites.demo import Settings, run

    run(Settings(a.out, a.samples, a.shift, a.seed, a.precision, a.batch_size, a.overwrite, a.device))
