"""Digits feature-privacy benchmark: deterministic vs stochastic ViT, split after an early, a middle and the last
block, decoder and white-box optimisation inversion, against Gaussian feature noise on the deterministic model.

    nice -n 10 python benchmarks/privacy.py              # reuse (or train) the runs, then `stochvit privacy`

Runs: the default digits recipe (60 epochs, seed 0), deterministic and stochastic U(0.5, 1.5) (and U(0, 2) when
present). The calibration benchmark trains exactly these into benchmarks/runs/digits-calibration; finished ones
are reused from there, missing ones are trained into benchmarks/runs/digits-privacy. The suite writes into
benchmarks/runs/digits-privacy/report; the reading is written up by hand in benchmarks/results/privacy.md.
Extra arguments are passed on to `stochvit privacy` (e.g. --n-victims 16 --decoder-steps 500).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from stochvit.cli import main as stochvit
from stochvit.train import TrainConfig, train

BENCH = Path(__file__).resolve().parent / "runs"
SHARED = BENCH / "digits-calibration"
OWN = BENCH / "digits-privacy"
RUNS: dict[str, dict] = {  # name -> TrainConfig overrides of the default digits recipe
    "deterministic": dict(stochastic=None),
    "stoch-u0.5-1.5": dict(stochastic=dict(distribution="uniform", low=0.5, high=1.5)),
}
OPTIONAL = ("stoch-u0-2",)  # included when the calibration benchmark has finished it


def run_dir(name: str, overrides: dict | None) -> Path | None:
    for root in (SHARED, OWN):
        if (root / name / "summary.json").exists():
            return root / name
    if overrides is None:
        return None
    t0 = time.perf_counter()
    path = train(TrainConfig(**overrides), out=OWN / name, quiet=True)
    print(f"trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def main() -> int:
    torch.set_num_threads(1)  # the machine is shared: one thread avoids OpenMP thrashing
    runs = [run_dir(n, o) for n, o in RUNS.items()] + [run_dir(n, None) for n in OPTIONAL]
    args = ["privacy", *[str(r) for r in runs if r is not None], "--blocks", "1,mid,last", "--noise-baseline", "0.3,0.6,1.0,2.0",
            "--n-victims", "32", "--out", str(OWN / "report"), *sys.argv[1:]]
    print("stochvit " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    code = stochvit(args)
    print(f"wall time {time.perf_counter() - t0:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
