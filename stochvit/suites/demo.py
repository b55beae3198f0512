"""`stochvit demo`: the main job on the embedded digits data, a few minutes on 2 CPU cores.

Trains a deterministic and a stochastic ViT with the default digits recipe (finished runs under --out are
reused, interrupted ones resumed), then runs the calibration suite on both, with temperature scaling and
corrupted test copies, and prints the side-by-side table and a one-paragraph reading of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..defaults import recipe_text
from ..errors import UserError
from .settings import DemoSettings as Settings
from .settings import Result

MODELS = (("deterministic", None), ("stochastic", True))


def _train_or_reuse(path: Path, stochastic: bool | None, seed: int = 0, device: str | None = None) -> Path:
    from ..train import TrainConfig, train

    if (path / "summary.json").exists():
        print(f"reusing finished run {path}")
        return path
    t0 = time.perf_counter()
    if (path / "config.json").exists():
        print(f"resuming {path}")
        train(resume=path, device=device)
    else:
        print(f"training the {path.name} ViT on digits (default recipe: {recipe_text()}) into {path}")
        train(TrainConfig(stochastic=stochastic, seed=seed), out=path, device=device)
    print(f"{path.name}: trained in {time.perf_counter() - t0:.0f} s")
    return path


_TITLES = {"accuracy": "accuracy", "nll": "NLL", "ece": "ECE"}


def _differences(rows: list[dict], condition: str) -> list[str]:
    """One line per metric of stochastic - deterministic in a calibration report's comparisons of one condition."""
    out = []
    for c in rows:
        if c["method"] == "stochastic" and c["baseline"] == "deterministic" and c["metric"] in _TITLES:
            verdict = c["verdict"] + (f" (smallest detectable {c['half_width']:.3f})" if c["low"] <= 0 <= c["high"] else "")
            out.append(f"  {condition:<10} {_TITLES[c['metric']]:<8} {c['baseline_value']:.3f} -> {c['method_value']:.3f}  "
                       f"{c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]  {verdict}")
    return out


def reading(report: dict) -> str:
    """Plain-words comparison of the stochastic K-sample prediction with the deterministic baseline (calibration.json):
    each difference with its paired 95% interval and verdict (`stochvit.eval.stats`). The demo trains one seed per
    model, so the interval covers the sampling of test images only, not of training."""
    ts = report["methods"]["deterministic +TS"]["test"]["mc_average"]
    comparisons = report["comparisons"]
    lines = [f"Stochastic (K={report['samples']} average) vs deterministic: difference [95% CI], verdict",
             *_differences(comparisons["clean"], "clean")]
    if "shift" in comparisons:
        lines += _differences(comparisons["shift"], "corrupted")
    lines.append(f"Temperature-scaled deterministic: ECE {ts['ece']:.3f}, NLL {ts['nll']:.3f}.")
    if "shift" in comparisons:
        lines.append(f"corrupted: mean over {len(report['corruptions'])} kinds x {len(report['severities'])} severities "
                     f"of {report['shift_images']} test images.")
    lines.append(f"Intervals: paired bootstrap over the {report['images']} test images. The demo trains one seed per "
                 "model, so they cover test-image sampling only, not training (several seeds: `stochvit study`).")
    return "\n".join(lines)


@dataclass
class DemoResult(Result):
    """`out`: the calibration report folder; `runs`: the two run directories; `report`: its calibration.json."""

    runs: list[Path]
    report: dict


def run(s: Settings) -> DemoResult:
    """Train (or reuse) both runs under `s.out`, then write and print the calibration report (in OUT/calibration)."""
    from ..precision import resolve_device
    from . import calibration

    if s.samples < 1:
        raise UserError(f"samples={s.samples} must be >= 1")
    resolve_device(s.device)  # a device this machine lacks: refused before training
    out = Path(s.out)
    paths = [_train_or_reuse(out / name, stochastic, s.seed, s.device) for name, stochastic in MODELS]
    print("\nevaluating calibration" + (" (clean and corrupted test copies)" if s.shift else ""))
    cal = calibration.run(calibration.Settings(paths, samples=s.samples, shift=s.shift, out=out / "calibration",
                                               precision=s.precision, seed=s.seed, batch_size=s.batch_size,
                                               overwrite=s.overwrite, device=s.device))
    print("\n" + reading(cal.report))
    print(f"\nplots and tables: {cal.out}/ (reliability.png, shift.png, confidence_hist.png, calibration.md)")
    return DemoResult(cal.out, paths, cal.report)
