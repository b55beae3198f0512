"""The digits recipe's sweep: conv-stem ViT with and without BatchNorm, seeds x {deterministic, stochastic}.

Each cell is one `stochvit.train.train` run with the digits recipe (60 epochs, batch 64, lr 3e-3) on split seed 0;
the test accuracy is read from the run's summary: single pass, and the K-pass average (`eval_samples`, as the demo).
Cells run one at a time, variant by variant; finished cells in the JSON are kept, so a stopped sweep continues where
it was. The run directories go under --runs (seed 0's are the demo's two runs: `stochvit demo --out` a copy reuses them).

    OMP_NUM_THREADS=1 python benchmarks/digits_recipe.py --out benchmarks/results/digits-recipe.json --runs /tmp/runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from stochvit.models import _DIGITS, _STEMS, _register
from stochvit.train import TrainConfig, train

# the stem without BatchNorm, registered here only (the library ships the winner as vit_digits_convstem_8)
NO_BN = "vit_digits_convstem_nobn_8"
VARIANTS = {"bn": "vit_digits_convstem_8", "no-bn": NO_BN}
MODELS = {"deterministic": None, "stochastic": True}


def cell(variant: str, model: str, seed: int, samples: int, runs: Path) -> dict:
    t0 = time.perf_counter()
    path = train(TrainConfig(model=VARIANTS[variant], stochastic=MODELS[model], seed=seed, eval_samples=samples),
                 out=runs / f"{variant}-seed{seed}" / model, quiet=True)
    summary = json.loads((path / "summary.json").read_text())
    test = summary["test"]
    return dict(variant=variant, model=model, seed=seed, samples=samples, wall_seconds=round(time.perf_counter() - t0, 1),
                train_seconds=summary["train_seconds"], single_pass=test["single_pass"]["accuracy"]["mean"],
                mc_average=test["mc_average"]["accuracy"], val_accuracy=summary["val"]["single_pass"]["accuracy"]["mean"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/digits-recipe.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--runs", type=Path, required=True, help="folder for the run directories")
    a = p.parse_args()
    _register(NO_BN, _DIGITS, {**_STEMS["vit_digits_convstem_8"], "stem_norm": False})
    rows = json.loads(a.out.read_text())["cells"] if a.out.exists() else []
    done = {(r["variant"], r["model"], r["seed"]) for r in rows}
    for variant in a.variants:
        for seed in a.seeds:
            for model in MODELS:
                if (variant, model, seed) in done:
                    continue
                rows.append(cell(variant, model, seed, a.samples, a.runs))
                print(json.dumps(rows[-1]), flush=True)
                a.out.write_text(json.dumps(dict(recipe="digits: 60 epochs, batch 64, lr 3e-3, split seed 0",
                                                 cells=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
