"""Digits calibration benchmark: every baseline of issue 3 trained with the default digits recipe, then one
`stochvit calibration` table with temperature scaling and shift.

    nice -n 10 python benchmarks/calibration.py                 # train what is missing, then evaluate
    nice -n 10 python benchmarks/calibration.py --train-only    # only the runs

Runs go to benchmarks/runs/digits-calibration/<name> (finished ones are reused); the suite writes into
benchmarks/runs/digits-calibration/report. Results are written up by hand in benchmarks/results/calibration.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from stochvit.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent / "runs" / "digits-calibration"

# name -> TrainConfig overrides on the default digits recipe (60 epochs, batch 64, lr 3e-3, seed 0)
RUNS: dict[str, dict] = {  # in order of training
    "deterministic": dict(stochastic=None),
    "stoch-u0.5-1.5": dict(stochastic=dict(distribution="uniform", low=0.5, high=1.5)),
    "mc-dropout-0.1": dict(stochastic=None, drop_rate=0.1, mc_dropout=True),
    "label-smoothing-0.1": dict(stochastic=None, label_smoothing=0.1),
    "deterministic-seed1": dict(stochastic=None, seed=1),
    "deterministic-seed2": dict(stochastic=None, seed=2),
    "stoch-u0-2": dict(stochastic=dict(distribution="uniform", low=0.0, high=2.0)),
    "stoch-bernoulli": dict(stochastic=dict(distribution="bernoulli", low=0.5, high=1.5)),
}
ENSEMBLE = ("deterministic", "deterministic-seed1", "deterministic-seed2")
SINGLE = ("deterministic", "stoch-u0.5-1.5", "stoch-u0-2", "stoch-bernoulli", "mc-dropout-0.1", "label-smoothing-0.1")


def train_all() -> None:
    for name, overrides in RUNS.items():
        path = ROOT / name
        if (path / "summary.json").exists():
            continue
        t0 = time.perf_counter()
        if (path / "config.json").exists():
            train(resume=path, quiet=True)
        else:
            train(TrainConfig(**overrides), out=path, quiet=True)
        print(f"trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate the runs that finished")
    p.add_argument("--samples", type=int, default=10)
    a = p.parse_args()
    torch.set_num_threads(1)  # the machine is shared: one thread avoids OpenMP thrashing
    if not a.eval_only:
        train_all()
    if a.train_only:
        return
    from stochvit.suites import calibration

    def done(names: tuple[str, ...]) -> list[Path]:
        return [ROOT / n for n in names if (ROOT / n / "summary.json").exists()]

    members = done(ENSEMBLE)
    t0 = time.perf_counter()
    calibration.run(calibration.Settings(done(SINGLE), ensembles=[members] if len(members) > 1 else [], samples=a.samples,
                                         shift=True, out=ROOT / "report"))
    print(f"calibration suite: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
