"""Digits robustness benchmark (issue 4): clean, stochastic and adversarially trained models under naive and adaptive attacks.

    nice -n 10 python benchmarks/robustness.py               # train what is missing, then attack all four models
    nice -n 10 python benchmarks/robustness.py --train-only

Models (default digits recipe: 60 epochs, batch 64, lr 3e-3, seed 0):
  deterministic, stochastic            reused from benchmarks/runs/digits-calibration when finished there, else trained here
  adv-deterministic, adv-stochastic    adversarial fine-tuning of those two: 20 more epochs (lr 1e-3, 1 warmup epoch) on
                                       FGSM-RS examples (l-inf, eps 16/255), one budget for both; fine-tuning rather than
                                       60 epochs from scratch because the shared CPU ran at ~40 s per adversarial epoch
Each model is attacked with `stochvit.suites.robustness` at one shared budget (naive PGD, EOT-PGD, the AutoAttack-rand-style
composite, Square and a transfer attack from its partner model), reports go to benchmarks/runs/digits-robustness/<name>/report,
and a combined table is printed and written to benchmarks/runs/digits-robustness/summary.md. The reading is written by hand in
benchmarks/results/robustness.md. Single-threaded torch: on a shared 2-core machine it is several times faster than two threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stochvit.runs import load_run
from stochvit.suites.robustness import Settings, eps_label, evaluate_robustness, write_outputs
from stochvit.train import TrainConfig, train

HERE = Path(__file__).resolve().parent
ROOT = HERE / "runs" / "digits-robustness"
REUSE = HERE / "runs" / "digits-calibration"
ADV = dict(method="fgsm-rs", eps=16 / 255, steps=1)
FINETUNE = dict(epochs=20, lr=1e-3, warmup_epochs=1.0)
RUNS: dict[str, tuple[dict, str | None]] = {  # name -> (TrainConfig overrides, calibration run to reuse)
    "deterministic": (dict(stochastic=None), "deterministic"),
    "stochastic": (dict(), "stoch-u0.5-1.5"),
    "adv-deterministic": (dict(stochastic=None, adv=ADV, **FINETUNE), None),
    "adv-stochastic": (dict(adv=ADV, **FINETUNE), None),
}
CLEAN = {"adv-deterministic": "deterministic", "adv-stochastic": "stochastic"}  # weights the fine-tuning starts from
PARTNER = {"deterministic": "stochastic", "stochastic": "deterministic",
           "adv-deterministic": "adv-stochastic", "adv-stochastic": "adv-deterministic"}
SETTINGS = dict(norm="linf", eps=[4 / 255, 8 / 255, 16 / 255, 32 / 255],
                attacks=["pgd", "eot-pgd", "aa-rand", "square", "transfer"], eot=8, steps=10, restarts=1,
                queries=100, passes=10, n_examples=100, batch_size=100, seed=0)


def run_path(name: str) -> Path:
    reuse = RUNS[name][1]
    if reuse and (REUSE / reuse / "summary.json").exists():
        return REUSE / reuse
    return ROOT / name


def train_missing() -> None:
    for name, (overrides, _) in RUNS.items():  # clean runs first: the adversarial ones start from them
        path = run_path(name)
        if (path / "summary.json").exists():
            continue
        start = time.perf_counter()
        if (path / "config.json").exists():
            train(resume=path, quiet=True)
        else:
            init = {"init_weights": str(run_path(CLEAN[name]) / "model.safetensors")} if name in CLEAN else {}
            train(TrainConfig(**overrides, **init), out=path, quiet=True)
        print(f"trained {name} in {time.perf_counter() - start:.0f} s -> {path}", flush=True)


def evaluate_all() -> None:
    rows = {}
    for name in RUNS:
        run, partner = load_run(run_path(name)), load_run(run_path(PARTNER[name]))
        s = Settings(**SETTINGS)
        start = time.perf_counter()
        result, grid = evaluate_robustness(run, s, surrogate=partner, quiet=True)
        write_outputs(result, grid, ROOT / name / "report", s.passes)
        rows[name] = result
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    lines = ["| model | clean | attack | " + " | ".join(eps_label(e, "linf") for e in SETTINGS["eps"]) + " | seconds |",
             "|---|---|---|" + "---|" * (len(SETTINGS["eps"]) + 1)]
    for name, r in rows.items():
        for attack in [*SETTINGS["attacks"], "worst case"]:
            per = r["worst_case"] if attack == "worst case" else r["attacks"][attack]
            seconds = "" if attack == "worst case" else f"{sum(v['seconds'] for v in per.values()):.0f}"
            cells = [f"{per[lb]['mean']:.3f} / {per[lb]['all_pass']:.3f}" for lb in per]
            lines.append(f"| {name} | {r['clean']['mean']:.3f} | {attack} | " + " | ".join(cells) + f" | {seconds} |")
    lines += ["", "Sanity checks:", ""]
    for name, r in rows.items():
        lines.append(f"- {name}: " + ", ".join(f"{c['status']} ({c['check']})" for c in r["sanity"]))
    text = "\n".join(lines) + "\n"
    (ROOT / "summary.md").write_text(text)
    (ROOT / "summary.json").write_text(json.dumps(rows, indent=1, default=float))
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ROOT.mkdir(parents=True, exist_ok=True)
    train_missing()
    if not args.train_only:
        evaluate_all()


if __name__ == "__main__":
    main()
