"""The digits recipe's sweep: recipe variants x seeds x {deterministic, stochastic}, test accuracy and time.

Each cell is one `stochvit.train.train` run on split seed 0: the default digits recipe (`stochvit.defaults.RECIPES`)
with a variant's overrides (`VARIANTS`: another model, label smoothing, ...). The test accuracy is read from the
run's summary: single pass, and the K-pass average (`eval_samples`, as the demo). Finished cells in the JSON are
kept, so a stopped sweep continues where it was. The run directories go under --runs.

Time: with --jobs 2 the cells of one (seed, model) run side by side, one per variant, so that each pair shares the
machine's load; `train_seconds` (wall) and `cpu_seconds` (the worker's CPU time) of a variant over the baseline's, per
pair, are the time ratio.

    OMP_NUM_THREADS=1 python benchmarks/digits_recipe.py --runs /tmp/runs --variants bn ls0.1 --seeds 0 1 2 3 4 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import timm
import torch

from stochvit.models import _DIGITS, _STEMS, _register
from stochvit.train import TrainConfig, train

BASE = "vit_digits_convstem_8"
# models registered here only, for the sweep (the library ships the winners): name -> (architecture, stem)
EXTRA_MODELS = {"vit_digits_convstem_nobn_8": (_DIGITS, {**_STEMS[BASE], "stem_norm": False}),
                "vit_digits_convstem64_8": (_DIGITS, {**_STEMS[BASE], "stem_width": 64}),
                "vit_digits_convstem_dp1_8": ({**_DIGITS, "drop_path_rate": 0.1}, _STEMS[BASE]),
                "vit_digits_convstem_dp2_8": ({**_DIGITS, "drop_path_rate": 0.2}, _STEMS[BASE])}
# variant -> TrainConfig overrides of the digits recipe as the sweep began (batch 64, lr 3e-3: "bn"); "bs32" was adopted
BATCH64 = dict(batch_size=64, lr=3e-3)
VARIANTS: dict[str, dict] = {
    "bn": dict(model=BASE),
    "no-bn": dict(model="vit_digits_convstem_nobn_8"),
    "ls0.1": dict(model=BASE, label_smoothing=0.1),
    "stem64": dict(model="vit_digits_convstem64_8"),
    "wd0.1": dict(model=BASE, weight_decay=0.1),
    "lr2e-3": dict(model=BASE, lr=2e-3),
    "dp0.1": dict(model="vit_digits_convstem_dp1_8"),  # stochastic depth (timm's drop_path_rate)
    "dp0.2": dict(model="vit_digits_convstem_dp2_8"),
    "drop0.1": dict(model=BASE, drop_rate=0.1),  # dropout in the MLPs and projections (timm's drop_rate)
    "bs32": dict(model=BASE, batch_size=32, lr=3e-3 / 2**0.5),  # twice the steps, lr scaled by sqrt(batch): adopted
}
VARIANTS = {name: {**BATCH64, **overrides} for name, overrides in VARIANTS.items()}
MODELS = {"deterministic": None, "stochastic": True}


def register() -> None:
    """The sweep's extra stems in timm's registry (in each worker too)."""
    for name, (arch, stem) in EXTRA_MODELS.items():
        if name not in timm.list_models(name):
            _register(name, arch, stem)


def _worker_init() -> None:
    torch.set_num_threads(1)
    register()


def cell(variant: str, model: str, seed: int, samples: int, runs: Path) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    path = runs / f"{variant}-seed{seed}" / model
    resumed = (path / "checkpoint.pt").exists()  # a finished run is read, an interrupted one resumed (its time is partial)
    if resumed and not (path / "summary.json").exists():
        train(resume=path, quiet=True)
    elif not resumed:
        shutil.rmtree(path, ignore_errors=True)  # killed before its first checkpoint
        train(TrainConfig(stochastic=MODELS[model], seed=seed, eval_samples=samples, **VARIANTS[variant]), out=path,
              quiet=True)
    summary = json.loads((path / "summary.json").read_text())
    test = summary["test"]
    return dict(variant=variant, model=model, seed=seed, samples=samples, resumed=resumed,
                wall_seconds=round(time.perf_counter() - t0, 1), cpu_seconds=round(time.process_time() - c0, 1),
                train_seconds=summary["train_seconds"],
                single_pass=test["single_pass"]["accuracy"]["mean"], mc_average=test["mc_average"]["accuracy"],
                val_accuracy=summary["val"]["single_pass"]["accuracy"]["mean"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/digits-recipe.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["bn"], choices=list(VARIANTS))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--jobs", type=int, default=1, help="cells trained side by side, one thread each")
    p.add_argument("--runs", type=Path, required=True, help="folder for the run directories")
    a = p.parse_args()
    register()
    rows = json.loads(a.out.read_text())["cells"] if a.out.exists() else []
    done = {(r["variant"], r["model"], r["seed"]) for r in rows}
    todo = [(v, m, s) for s in a.seeds for m in a.models for v in a.variants if (v, m, s) not in done]
    with ProcessPoolExecutor(a.jobs, initializer=_worker_init) as pool:
        for future in as_completed([pool.submit(cell, *key, a.samples, a.runs) for key in todo]):
            rows.append(future.result())
            print(json.dumps(rows[-1]), flush=True)
            a.out.write_text(json.dumps(dict(recipe="digits: 60 epochs, batch 64, lr 3e-3 unless a variant says "
                                                    "otherwise (bs32: today's recipe), split seed 0",
                                             variants=VARIANTS, cells=rows),
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
