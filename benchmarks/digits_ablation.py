"""GELU vs ReLU under the default stochastic layer, on digits (several seeds), to choose the default activation.

    python benchmarks/activation.py --seeds 0,1,2 --out benchmarks/results/activation.json

Each cell trains the default digits recipe (60 epochs) deterministic and stochastic, with GELU and with
ReLU (the authors' ViT used ReLU), and reports test accuracy, NLL and ECE: single pass and K=10.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from stochvit.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="benchmarks/results/activation.json")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    cells: dict[str, list[dict]] = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for act in ("gelu", "relu"):
            for stochastic in (None, True):
                key = f"{act}-{'stochastic' if stochastic else 'deterministic'}"
                for seed in seeds:
                    cfg = TrainConfig(act=act, seed=seed, stochastic=stochastic)
                    run = train(cfg, out=Path(tmp) / f"{key}-{seed}", quiet=True)
                    test = json.loads((run / "summary.json").read_text())["test"]
                    row = {f"single_{k}": v["mean"] for k, v in test["single_pass"].items()}
                    row.update({f"k10_{k}": v for k, v in test["mc_average"].items()})
                    cells.setdefault(key, []).append(row)
                    print(key, seed, {k: round(v, 4) for k, v in row.items()}, flush=True)
    summary = {key: {m: dict(mean=statistics.mean(r[m] for r in rows), std=statistics.stdev(r[m] for r in rows))
                     for m in rows[0]} for key, rows in cells.items()}
    Path(a.out).write_text(json.dumps(dict(seeds=seeds, wall_seconds=time.time() - t0, cells=summary, runs=cells), indent=2))
    for key, s in summary.items():
        print(f"{key:<22} acc {s['single_accuracy']['mean']:.4f}±{s['single_accuracy']['std']:.4f}  "
              f"nll {s['single_nll']['mean']:.4f}  ece {s['single_ece']['mean']:.4f}  K=10 acc {s['k10_accuracy']['mean']:.4f}")


if __name__ == "__main__":
    main()
