"""One factor at a time on digits, deterministic and stochastic, over several seeds (issue 2's two open choices).

    python benchmarks/digits_ablation.py --factor act --seeds 0,1,2        # GELU vs ReLU: the default activation
    python benchmarks/digits_ablation.py --factor precision --seeds 0,1,2  # fp32 vs bf16 autocast: accuracy parity

Each cell trains the default digits recipe (60 epochs, `stochvit.train.TrainConfig` defaults) with one value of the
factor, deterministic and with the default stochastic layer, and reports test accuracy, NLL and ECE: single pass and
K=10, mean and std over seeds. Results: benchmarks/results/digits-<factor>.json. bf16 is only meaningful on a CPU
with native bf16 (avx512_bf16/AMX) or a GPU; elsewhere it is emulated and very slow.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stochvit.train import TrainConfig, train

FACTORS = {"act": ("gelu", "relu"), "precision": ("fp32", "bf16")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--factor", choices=tuple(FACTORS), required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=None, help="default: benchmarks/results/digits-<factor>.json")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    out = Path(a.out or f"benchmarks/results/digits-{a.factor}.json")
    cells: dict[str, list[dict]] = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for value in FACTORS[a.factor]:
            for stochastic in (None, True):
                key = f"{value}-{'stochastic' if stochastic else 'deterministic'}"
                for seed in seeds:
                    cfg = TrainConfig(seed=seed, stochastic=stochastic, **{a.factor: value})
                    run = train(cfg, out=Path(tmp) / f"{key}-{seed}", quiet=True)
                    summary = json.loads((run / "summary.json").read_text())
                    test = summary["test"]
                    row = {f"single_{k}": v["mean"] for k, v in test["single_pass"].items()}
                    row.update({f"k10_{k}": v for k, v in test["mc_average"].items()}, train_seconds=summary["train_seconds"])
                    cells.setdefault(key, []).append(row)
                    print(key, seed, {k: round(v, 4) for k, v in row.items()}, flush=True)
    summary = {key: {m: dict(mean=statistics.mean(r[m] for r in rows), std=statistics.stdev(r[m] for r in rows))
                     for m in rows[0]} for key, rows in cells.items()}
    out.write_text(json.dumps(dict(factor=a.factor, seeds=seeds, threads=torch.get_num_threads(),
                                   wall_seconds=time.time() - t0, cells=summary, runs=cells), indent=2) + "\n")
    for key, s in summary.items():
        print(f"{key:<22} acc {s['single_accuracy']['mean']:.4f}±{s['single_accuracy']['std']:.4f}  "
              f"nll {s['single_nll']['mean']:.4f}  ece {s['single_ece']['mean']:.4f}  K=10 acc {s['k10_accuracy']['mean']:.4f}  "
              f"train {s['train_seconds']['mean']:.0f} s")


if __name__ == "__main__":
    main()
