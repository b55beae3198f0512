"""`stochvit demo`: the main job on the embedded digits data, a few minutes on 2 CPU cores.

Trains a deterministic and a stochastic ViT with the default digits recipe (finished runs under --out are
reused, interrupted ones resumed), then runs the calibration suite on both, with temperature scaling and
corrupted test copies, and prints the side-by-side table and a one-paragraph reading of it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import UserError
from ..runs import read_json

MODELS = (("deterministic", None), ("stochastic", True))


def _train_or_reuse(path: Path, stochastic: bool | None) -> Path:
    from ..train import TrainConfig, train

    if (path / "summary.json").exists():
        print(f"reusing finished run {path}")
        return path
    t0 = time.perf_counter()
    if (path / "config.json").exists():
        print(f"resuming {path}")
        train(resume=path)
    else:
        print(f"training the {path.name} ViT on digits (default recipe: 60 epochs) into {path}")
        train(TrainConfig(stochastic=stochastic), out=path)
    print(f"{path.name}: trained in {time.perf_counter() - t0:.0f} s")
    return path


def reading(report: dict) -> str:
    """Plain-words comparison of the stochastic K-sample prediction with the deterministic baseline (calibration.json)."""
    m = report["methods"]
    det, sto = m["deterministic"]["test"]["mc_average"], m["stochastic"]["test"]["mc_average"]
    ts = m["deterministic +TS"]["test"]["mc_average"]
    k = report["samples"]
    lines = [f"Stochastic (K={k} average) vs deterministic: accuracy {det['accuracy']:.3f} -> {sto['accuracy']:.3f}, "
             f"NLL {det['nll']:.3f} -> {sto['nll']:.3f}, ECE {det['ece']:.3f} -> {sto['ece']:.3f} "
             f"(temperature-scaled deterministic: ECE {ts['ece']:.3f}, NLL {ts['nll']:.3f})."]
    if report["corruptions"]:
        def shifted(name: str, key: str) -> float:
            sm = m[name]["shift_mean"]
            return sum(sm[str(s)]["mc_average"][key] for s in report["severities"]) / len(report["severities"])

        lines.append(f"Under corruption (mean over {len(report['corruptions'])} kinds x {len(report['severities'])} severities): "
                     f"ECE {shifted('deterministic', 'ece'):.3f} -> {shifted('stochastic', 'ece'):.3f}, "
                     f"accuracy {shifted('deterministic', 'accuracy'):.3f} -> {shifted('stochastic', 'accuracy'):.3f}.")
    return "\n".join(lines)


def run_demo(out: str | Path = "runs/demo", samples: int = 10, shift: bool = True) -> Path:
    from .calibration import run_calibration

    out = Path(out)
    paths = [_train_or_reuse(out / name, stochastic) for name, stochastic in MODELS]
    print("\nevaluating calibration" + (" (clean and corrupted test copies)" if shift else ""))
    report_dir = run_calibration(paths, samples=samples, shift=shift, out=out / "calibration")
    print("\n" + reading(read_json(report_dir / "calibration.json", "calibration report")))
    print(f"\nplots and tables: {report_dir}/ (reliability.png, shift.png, confidence_hist.png, calibration.md)")
    return report_dir


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="main job: train a deterministic and a stochastic ViT on digits and compare their calibration",
        description="Train a deterministic and a token-consistent stochastic ViT on the embedded digits data (default "
                    "recipe, about a minute each on 2 CPU cores; finished runs under --out are reused), then print the "
                    "side-by-side calibration table: accuracy, NLL, Brier, ECE variants, AURC, AUROC, with temperature "
                    "scaling and under CIFAR-10-C style corruptions.")
    p.add_argument("--out", default="runs/demo", help="output folder for the two runs and the report (default: runs/demo)")
    p.add_argument("--samples", type=int, default=10, help="K stochastic passes (default: 10)")
    p.add_argument("--shift", action=argparse.BooleanOptionalAction, default=True, help="also evaluate on corrupted test copies")
    p.set_defaults(func=cmd_demo)


def cmd_demo(a: argparse.Namespace) -> None:
    if a.samples < 1:
        raise UserError("--samples must be >= 1")
    run_demo(a.out, a.samples, a.shift)
