"""`stochvit calibration RUN_DIR...`: flags -> `suites.calibration.Settings` -> `run`."""

from __future__ import annotations

import argparse

from ..defaults import CIFAR_C_EXTRA, CORRUPTIONS, ORIGINAL_CORRUPTIONS
from ..suites.settings import CalibrationSettings as S
from ..suites.settings import default
from .common import (
    add_batch_size,
    add_command,
    add_data_args,
    add_out,
    add_overwrite,
    add_precision,
    add_runtime,
    add_samples,
    add_seed,
    int_list,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "calibration", "calibration of runs vs temperature scaling, MC dropout, ensembles; optionally under shift",
        "Evaluate trained runs on the test split: accuracy, NLL, Brier, ECE, adaptive ECE, MCE, classwise ECE, "
        "AURC and misclassification AUROC, single-pass (mean ± std over K passes) and K-sample average, each "
        "without and with temperature scaling fitted on validation NLL. --ensemble adds a deep ensemble of runs; "
        "--shift adds CIFAR-10-C style corruptions at 5 severities (--shift cifar10c:PATH: the published files). "
        "Every method after the first is compared with "
        "the first (paired bootstrap 95% CI and verdict); values and plots carry 95% intervals. Writes "
        "calibration.json, calibration.md and PNG plots into --out.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run directories, one table row group each")
    add_data_args(p, default=None)
    g = p.add_argument_group("evaluation")
    add_samples(g, default(S, "samples"))
    g.add_argument("--ensemble", nargs="+", action="append", metavar="RUN_DIR", default=None,
                   help="run directories averaged into one deep-ensemble method (repeat the flag for several ensembles)")
    g.add_argument("--shift", nargs="?", const=True, default=default(S, "shift"), metavar="cifar10c:PATH",
                   help="also evaluate under corruption: alone, stochvit's CIFAR-10-C style corruptions of the test split "
                        "(an imitation); with cifar10c:PATH or cifar100c:PATH, the published benchmark's .npy files "
                        "(its images are the official test set's; numbers compare with the literature)")
    g.add_argument("--corruptions", default=None,
                   help="comma-separated kinds, or all. Built-in default: " + ", ".join(ORIGINAL_CORRUPTIONS) +
                        "; all: " + ", ".join(CORRUPTIONS) + ". cifar10c/cifar100c default: the 15 standard kinds "
                        "(all adds the 4 extras: " + ", ".join(CIFAR_C_EXTRA) + ")")
    g.add_argument("--severities", type=int_list, default=",".join(map(str, default(S, "severities"))),
                   help="comma-separated severities in 1..5")
    g.add_argument("--shift-limit", type=int, default=None, help="evaluate shift on a stratified subset of this many test images")
    g.add_argument("--n-boot", type=int, default=default(S, "n_boot"),
                   help="bootstrap resamples for the 95%% intervals and the paired comparisons with the first method")
    add_seed(g, "the stochastic passes")
    add_precision(g, default(S, "precision"))
    add_batch_size(g, default(S, "batch_size"))
    add_out(p, None, "report folder (None: FIRST_RUN_DIR/calibration)")
    add_overwrite(p)
    add_runtime(p)
    p.set_defaults(func=command)


def command(a: argparse.Namespace) -> None:
    from ..suites.calibration import Settings, run

    corruptions = None if a.corruptions is None else tuple(c.strip() for c in a.corruptions.split(",") if c.strip())
    run(Settings(a.run_dirs, a.ensemble or [], a.data, a.data_dir, a.samples, a.shift, corruptions,
                 tuple(a.severities), a.shift_limit, a.seed, a.precision, a.batch_size, a.n_boot, a.out, a.overwrite,
                 device=a.device))
