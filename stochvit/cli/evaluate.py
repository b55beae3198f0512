"""`stochvit evaluate RUN_DIR`: flags -> `suites.evaluate.Settings` -> `run`."""

from __future__ import annotations

import argparse

from ..defaults import MODES
from ..suites.settings import EvaluateSettings as S
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
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "evaluate", "accuracy, NLL, Brier, ECE of a run (single-pass and K-sample)",
                    "Evaluate a run directory; writes RUN_DIR/eval-<data>-<split>-<mode>-k<K>-seed<S>.json (seeded: "
                    "the same command gives the same numbers). --data evaluates on other labelled data with the run's "
                    "class names (e.g. imagefolder:PATH of class folders, or cifar10 with --data-dir for the official "
                    "test set); --split all on every image of it.")
    p.add_argument("run_dir")
    add_data_args(p, default=None)
    g = p.add_argument_group("evaluation")
    add_samples(g, default(S, "samples"))
    g.add_argument("--mode", default=default(S, "mode"), choices=MODES,
                   help="stochastic layers: sample (on), expectation (mean), identity (off)")
    g.add_argument("--split", default=default(S, "split"), choices=("test", "val", "all"),
                   help="which split to evaluate; all: every image of --data (an external test set), not a split of it")
    add_seed(g, "the stochastic passes")
    add_precision(g, default(S, "precision"))
    add_batch_size(g, default(S, "batch_size"))
    add_out(p, None, "output JSON file (None: RUN_DIR/eval-<data>-<split>-<mode>-k<K>-seed<S>.json)")
    add_overwrite(p)
    add_runtime(p)
    p.set_defaults(func=command)


def command(a: argparse.Namespace) -> None:
    from ..suites.evaluate import Settings, format_table, run

    r = run(Settings(a.run_dir, a.data, a.data_dir, a.samples, a.mode, a.split, a.seed, a.precision, a.batch_size, a.out,
                     a.overwrite, a.device))
    print(f"{r.report['run']} on {r.report['images']} (mode={a.mode})\n{format_table(r.report)}"
          + (f"\nwrote {r.out}" if r.out else ""))
