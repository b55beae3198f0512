"""A study's claims on runs trained outside it (the transfer and federated benchmark scripts), compared from their run
directories, so that one command, `stochvit study SPEC`, rebuilds every verdict of the spec.

    [compare.federated]                                # one table per claim family
    about = "CIFAR-10, 5 clients, 8 rounds x 1 local epoch"   # the report's description of the runs and their regime
    folder = "../runs/cifar10-federated"               # relative to the spec file
    seeds = [0, 1, 2]
    samples = 5                                        # K of the runs' cached K-pass-average predictions
    metrics = ["accuracy", "nll", "ece"]               # default
    comparisons = [["IID stochastic", "IID deterministic"]]
    [compare.federated.runs]                           # label -> run folder under `folder`, one per seed
    "IID stochastic" = "iid-stochastic-seed{seed}"
    "IID deterministic" = "iid-deterministic-seed{seed}"

A run folder's template may use `{seed}` and `{seed_suffix}` ("" for seed 0, "-seedS" otherwise: the transfer
script's folder names). Nothing is trained here: a seed whose runs are missing on either side is left out (a progress
report), and each run's predictions come from its cached `test-probs-K{K}-seed0.safetensors` (or its weights, once;
`stochvit.suites.compare_runs`): paired per seed, the t-interval over per-seed differences plus the image-bootstrap
variance.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..eval.stats import Comparison
from .compare_runs import METRICS, RunPredictions, compare_runs

KEYS = ("about", "folder", "seeds", "samples", "metrics", "comparisons", "runs")


@dataclass(frozen=True)
class ExternalClaim:
    """Comparisons between groups of finished run directories (one per seed) that the study does not train."""

    name: str
    about: str
    folder: Path
    seeds: tuple[int, ...]
    samples: int
    metrics: tuple[str, ...]
    comparisons: tuple[tuple[str, str], ...]
    runs: dict[str, str]  # label -> folder template

    def run_dir(self, label: str, seed: int) -> Path:
        return self.folder / self.runs[label].format(seed=seed, seed_suffix=f"-seed{seed}" if seed else "")

    def finished_seeds(self, method: str, baseline: str) -> list[int]:
        return [s for s in self.seeds if all((self.run_dir(lab, s) / "summary.json").exists() for lab in (method, baseline))]


def parse_external(name: str, body: dict[str, Any], spec_dir: Path, seeds: tuple[int, ...], where: str) -> ExternalClaim:
    """A spec's [compare.NAME] table, validated (every error names the table and the key); `seeds`: its `seeds`,
    already checked by the spec's own rule (`study_runs.load_spec`)."""
    if bad := sorted(set(body) - set(KEYS)):
        raise UserError(f"{where} has unknown keys {bad}; expected {list(KEYS)}")
    for key in ("folder", "runs", "comparisons"):
        if key not in body:
            raise UserError(f"{where} needs `{key}`")
    runs = body["runs"]
    if not isinstance(runs, dict) or not runs or not all(isinstance(t, str) for t in runs.values()):
        raise UserError(f"{where}: `runs` must map labels to run folder templates")
    for label, template in runs.items():
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        if bad := sorted(fields - {"seed", "seed_suffix"}):
            raise UserError(f"{where}: run {label!r} template {template!r} uses {bad}; only {{seed}} and {{seed_suffix}}")
    samples = body.get("samples", 10)
    if type(samples) is not int or samples < 1:
        raise UserError(f"{where}: samples={samples!r} must be a positive integer")
    metrics = tuple(body.get("metrics", METRICS))
    if bad := [m for m in metrics if m not in METRICS]:
        raise UserError(f"{where}: metrics {bad} are not among {list(METRICS)}")
    pairs = tuple(tuple(c) for c in body["comparisons"])
    for pair in pairs:
        if len(pair) != 2 or not set(pair) <= set(runs):
            raise UserError(f"{where}: comparison {list(pair)} names an unknown run label; known: {list(runs)}")
    folder = Path(os.path.normpath(spec_dir / body["folder"]))  # an absolute folder stays itself
    return ExternalClaim(name, str(body.get("about", "")), folder, seeds, samples, metrics, pairs, dict(runs))


def measure_external(claim: ExternalClaim, n_boot: int, log=print) -> list[Comparison]:
    """Every comparison of the claim over the seeds both sides have finished, metric by metric."""
    predictions = RunPredictions(claim.samples)
    rows = []
    for method, baseline in claim.comparisons:
        if not (seeds := claim.finished_seeds(method, baseline)):
            continue  # not finished yet (progress report)
        log(f"compare {claim.name}: {method} vs {baseline}, seeds {seeds}")
        rows += compare_runs([claim.run_dir(method, s) for s in seeds], [claim.run_dir(baseline, s) for s in seeds],
                             method, baseline, predictions, claim.metrics, n_boot=n_boot)
    return rows
