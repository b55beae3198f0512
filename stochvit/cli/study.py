"""`stochvit study SPEC.toml`: flags -> `suites.study.Settings` -> `run` and `report`."""

from __future__ import annotations

import argparse

from ..suites.settings import StudySettings as S
from ..suites.settings import default
from .common import add_command, add_out, add_runtime


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "study", "train a study's runs and report every claim with 95%% intervals",
                    "Train a study's missing runs, measure its claims, and write one report with intervals "
                    "(the seeds are the spec's).")
    p.add_argument("spec", help="TOML study spec (see benchmarks/studies/*.toml)")
    p.add_argument("--no-train", dest="train", action="store_false",
                   help="report on finished runs only, train nothing (the suites still measure finished runs that lack a "
                        "cached report)")
    p.add_argument("--n-boot", type=int, default=default(S, "n_boot"), help="bootstrap resamples per comparison")
    p.add_argument("--jobs", type=int, default=None, help="trainings and suite measurements side by side (None: the spec's jobs)")
    add_out(p, None, "report folder (None: the spec's out/report)")
    add_runtime(p, device=False)  # the trainings run with the spec's threads
    p.set_defaults(func=command)


def command(a: argparse.Namespace) -> None:
    from ..suites.study import Settings, report, run

    out = report(run(Settings(a.spec, a.train, a.n_boot, a.jobs)), a.out)
    print((out / "study.md").read_text())
    print(f"report: {out / 'study.md'}")
