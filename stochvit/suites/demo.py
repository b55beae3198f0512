"""`stochvit demo`: the main job on the embedded digits data, a few minutes on 2 CPU cores.

Trains a deterministic and a stochastic ViT with the default digits recipe (finished runs under --out are
reused, interrupted ones resumed), then runs the calibration suite on both, with temperature scaling and
corrupted test copies, and prints the side-by-side table and a one-paragraph reading of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

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
        print(f"training the {path.name} ViT on digits (default recipe: 60 epochs) into {path}")
        train(TrainConfig(stochastic=stochastic, seed=seed), out=path, device=device)
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
