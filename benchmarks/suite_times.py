"""Wall time of each suite per 1,000 test images, from the real suites run on a small cut of a committed run's data.

    python benchmarks/suite_times.py --out benchmarks/results/suite-times.json     # ~5 min idle on 2 cores (see below)

The run's data is decoded once (not timed) and each suite's `data_for` returns it with the test split (and, for
calibration, the validation split) cut to a seeded `--images` subset; then `run(Settings(...))` of evaluate,
calibration, robustness and privacy runs as the command would, into a temporary folder, and its wall time is scaled
by 1000 / images.

- evaluate and calibration run at their default settings (K=10; calibration without shift, 1000 bootstrap resamples).
- robustness and privacy at their defaults take hours even on 100 images on a CPU, so they run at reduced iteration
  budgets (robustness: `--steps/--eot/--queries` on `--robustness-images`; privacy: `--decoder-steps/--opt-steps`, with
  the default 32 victims) and their time at the defaults is extrapolated linearly in the iterations, attack by attack,
  from the seconds each report records (what no attack-specific time covers is kept as measured). Attacks that skip
  examples already fooled make the extrapolation an upper bound. The measured time at the reduced budget is reported too.
- privacy's cost is per configuration (run x split point x noise level) and per victim, not per test image: it is
  reported as the suite's total for the two runs, not scaled to 1,000 images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import stochvit.suites.calibration
import stochvit.suites.evaluate
import stochvit.suites.privacy
import stochvit.suites.robustness
from stochvit.defaults import AttackConfig
from stochvit.runs import data_for, load_run

SUITES = ("evaluate", "calibration", "robustness", "privacy")
MODULES = {name: getattr(stochvit.suites, name) for name in SUITES}


def cut(data, images: int, seed: int = 0):
    """The bundle with its test and validation splits cut to `images` seeded random images each."""
    g = torch.Generator().manual_seed(seed)

    def part(s):
        return s.subset(torch.randperm(len(s), generator=g)[: min(images, len(s))].sort().values) if images < len(s) else s

    return replace(data, test=part(data.test), val=part(data.val))


@contextlib.contextmanager
def served(data):
    """Every suite's `data_for` returns `data` (decoded once) while this lasts."""
    old = {n: m.data_for for n, m in MODULES.items()}
    for m in MODULES.values():
        m.data_for = lambda *a, **k: data
    try:
        yield
    finally:
        for n, m in MODULES.items():
            m.data_for = old[n]


def robustness_default_seconds(r: dict, s, default) -> dict:
    """Each attack's recorded seconds scaled to the default budget (`default`: the default Settings)."""
    it = lambda steps=False, eot=False, queries=False: ((default.steps / s.steps if steps else 1)  # noqa: E731
                                                        * (default.eot / s.eot if eot else 1)
                                                        * (default.queries / s.queries if queries else 1))
    factor = {"fgsm": 1.0, "pgd": it(steps=True), "eot-pgd": it(True, True), "apgd-ce": it(True, True),
              "apgd-dlr": it(True, True), "square": it(eot=True, queries=True), "transfer": it(True, True)}
    parts, scaled = {}, {}
    for name, per_eps in r["attacks"].items():
        for lab, e in per_eps.items():
            sec = e["seconds"]
            if name == "aa-rand":  # its seconds include the APGD-CE/DLR runs it reuses: only the worst-case pass is its own
                sec = max(0.0, sec - sum(r["attacks"][p][lab]["seconds"] for p in ("apgd-ce", "apgd-dlr")
                                         if p in r["attacks"]))
                f = it(eot=True)
            else:
                f = factor[name]
            parts[f"{name} {lab}"], scaled[f"{name} {lab}"] = sec, sec * f
    for key, mult in (("large_eps", it(True, True)), ("more_iterations", it(True, True))):
        if key in r:
            parts[key], scaled[key] = r[key]["seconds"], r[key]["seconds"] * mult
    rest = r["seconds"] - sum(parts.values())  # clean and per-attack evaluations, bootstrap: budget-independent
    return dict(measured_parts=parts, default_parts=scaled, rest_seconds=rest, default_seconds=rest + sum(scaled.values()))


def privacy_default_seconds(r: dict, cfg: AttackConfig) -> dict:
    d = AttackConfig()
    f = {"decoder": d.decoder_steps / cfg.decoder_steps, "optimization": d.opt_steps / cfg.opt_steps}
    attack = {a: sum(e["attacks"][a]["seconds"] for e in r["entries"] if a in e["attacks"]) for a in f}
    rest = r["seconds"] - sum(attack.values())
    return dict(measured_parts=attack, default_parts={a: attack[a] * f[a] for a in f}, rest_seconds=rest,
                default_seconds=rest + sum(attack[a] * f[a] for a in f))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="benchmarks/runs/cifar10-full/stochastic", help="a finished stochastic run")
    p.add_argument("--baseline", default="benchmarks/runs/cifar10-full/deterministic",
                   help="its deterministic baseline (privacy's noise baseline needs one)")
    p.add_argument("--images", type=int, default=200, help="test (and calibration's validation) images")
    p.add_argument("--robustness-images", type=int, default=20, help="attacked test images")
    p.add_argument("--steps", type=int, default=5, help="robustness: PGD/APGD iterations (default suite: 100)")
    p.add_argument("--eot", type=int, default=2, help="robustness: EOT passes (default suite: 20)")
    p.add_argument("--queries", type=int, default=50, help="robustness: Square queries (default suite: 1000)")
    p.add_argument("--decoder-steps", type=int, default=50, help="privacy: decoder steps (default suite: 1000)")
    p.add_argument("--opt-steps", type=int, default=15, help="privacy: optimisation-inversion steps (default suite: 300)")
    p.add_argument("--suites", default=",".join(SUITES), help=f"comma list of {','.join(SUITES)}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (None: torch's default)")
    p.add_argument("--out", default="benchmarks/results/suite-times.json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    suites = [s.strip() for s in a.suites.split(",") if s.strip()]
    t0 = time.perf_counter()
    run = load_run(a.run)
    data = cut(data_for(run.config), a.images)
    result = dict(machine=platform.processor() or platform.machine(), torch=torch.__version__,
                  threads=torch.get_num_threads(), run=a.run, baseline=a.baseline, images=len(data.test),
                  data_seconds=time.perf_counter() - t0, suites={})
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, served(data):
        tmp = Path(tmp)
        for name in suites:
            t = time.perf_counter()
            if name == "evaluate":
                m = stochvit.suites.evaluate
                m.run(m.Settings(a.run, out=tmp / "eval.json"))
            elif name == "calibration":
                m = stochvit.suites.calibration
                m.run(m.Settings([a.run], out=tmp / "calibration", quiet=True))
            elif name == "robustness":
                m = stochvit.suites.robustness
                s = m.Settings(a.run, steps=a.steps, eot=a.eot, queries=a.queries, n_examples=a.robustness_images,
                               out=tmp / "robustness")
                r = m.run(s).report
            elif name == "privacy":
                m = stochvit.suites.privacy
                cfg = AttackConfig(decoder_steps=a.decoder_steps, opt_steps=a.opt_steps)
                r = m.run(m.Settings([a.run, a.baseline], attack=cfg, out=tmp / "privacy")).report
            else:
                p.error(f"--suites: unknown {name!r}")
            sec = time.perf_counter() - t
            row: dict = dict(seconds=sec)
            if name in ("evaluate", "calibration"):
                row.update(images=len(data.test), seconds_per_1000=sec * 1000 / len(data.test), settings="defaults")
            elif name == "robustness":
                row.update(images=r["n_examples"], settings=dict(steps=a.steps, eot=a.eot, queries=a.queries),
                           seconds_per_1000=sec * 1000 / r["n_examples"], **robustness_default_seconds(r, s, m.Settings()))
                row["default_seconds"] += sec - r["seconds"]  # loading and writing the report, as measured
                row["default_seconds_per_1000"] = row["default_seconds"] * 1000 / r["n_examples"]
            else:
                row.update(victims=r["settings"]["n_victims"], test_images=len(data.test),
                           settings=dict(decoder_steps=a.decoder_steps, opt_steps=a.opt_steps), **privacy_default_seconds(r, cfg))
                row["default_seconds"] += sec - r["seconds"]  # loading and writing the report, as measured
            result["suites"][name] = row
            out.write_text(json.dumps(result, indent=2) + "\n")  # after every suite: a late failure keeps the rest
            print(f"{name}: {sec:.0f} s", file=sys.stderr, flush=True)
    result["total_seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = [f"# Suite wall times ({r['machine']}, torch {r['torch']}, {r['threads']} threads; run {r['run']}; "
             f"data decoded once in {r['data_seconds']:.0f} s, not counted)", "",
             "| suite | measured on | settings | measured s | s per 1,000 test images | at the defaults (extrapolated) |",
             "|---|---|---|---|---|---|"]
    for name, row in r["suites"].items():
        if name == "privacy":
            on, per = f"{row['victims']} victims, {row['test_images']} test images, 2 runs", "-"
            default = f"{row['default_seconds']:.0f} s in all"
        else:
            on, per = f"{row['images']} images", f"{row['seconds_per_1000']:.0f}"
            default = f"{row['default_seconds_per_1000']:.0f} s per 1,000" if "default_seconds_per_1000" in row else "(measured)"
        lines.append(f"| {name} | {on} | {row['settings'] if isinstance(row['settings'], str) else json.dumps(row['settings'])} "
                     f"| {row['seconds']:.1f} | {per} | {default} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
