"""Redraw the committed benchmark plots from their saved numbers, with the current plot code (no training, no attacks).

    python benchmarks/replot.py                     # benchmarks/runs and benchmarks/results
    python benchmarks/replot.py benchmarks/runs/cifar10

Each folder is redrawn by its own suite's `replot` (or, for a run, `Curves.plot`) from the file it wrote:
    metrics.jsonl    -> curves.png
    calibration.json -> shift.png, shift_by_corruption.png (metrics.png when the report has intervals)
    robustness.json  -> robust_accuracy.png
    privacy.json     -> privacy_utility.png
What needs per-image predictions or images (reliability.png, confidence_hist.png, adversarial_examples.png,
reconstructions.png) is only redrawn by running the suite again. benchmarks/studies/ is left to the study report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stochvit.runs import Curves
from stochvit.suites import calibration, privacy, robustness

HERE = Path(__file__).resolve().parent
REPLOT = {"calibration.json": calibration.replot, "robustness.json": robustness.replot, "privacy.json": privacy.replot}


def replot_folder(folder: Path) -> list[Path]:
    drawn = []
    if (folder / "metrics.jsonl").is_file() and (folder / "curves.png").is_file():
        Curves(folder).plot()
        drawn.append(folder / "curves.png")
    for name, redraw in REPLOT.items():
        if (folder / name).is_file():
            drawn += redraw(folder)
    return drawn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="*", type=Path, default=[HERE / "runs", HERE / "results"])
    a = p.parse_args()
    studies = (HERE / "studies").resolve()
    for root in a.roots:
        for folder in sorted({root, *(d for d in root.rglob("*") if d.is_dir())}):
            if folder.resolve().is_relative_to(studies):
                continue
            for path in replot_folder(folder):
                print(path)


if __name__ == "__main__":
    main()
