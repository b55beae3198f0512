"""A study's robustness and privacy claims: the suites run on the finished runs of named methods, compared seed by seed.

Spec sections; besides `methods` and `comparisons`, any field of the suite's Settings dataclass
(`stochvit.suites.settings`) except those the study sets itself (the run, `out`, `overwrite`, the surrogate):

    [robustness]                                       # RobustnessSettings; eps may be written "2/255"
    methods = ["deterministic", "stochastic"]          # whose runs are attacked (default: every method)
    comparisons = [["stochastic", "deterministic"]]    # (method, baseline); default: every method vs the first
    attacks = ["eot-pgd", "aa-rand"]
    [privacy]                                          # PrivacySettings; [privacy.attack]: AttackConfig
    split_blocks = "1"
    noise_baseline = [0.3]                             # also makes "<method> + noise 0.3" (deterministic methods)

Claims. Robustness: per epsilon, the worst case over the attacks run (AutoAttack-rand's composite when they are
eot-pgd and aa-rand) under the mean rule (per example, the fraction of fresh passes it survives), and the clean
accuracy of the same examples; higher is better. Privacy: per split point k and attack, the inversion's PSNR and SSIM
on undefended features (a noise level: the deterministic run's noisy features); **lower is better**, the attacker
reconstructs less, so "better" in a privacy verdict means the method leaks less than its baseline.

Pairing. Every run is attacked on the same seeded test subset (the suite's `seed` picks the examples or victims, the
same for every run), and a method meets its baseline over the seeds both have finished, pairwise:
`stochvit.eval.stats.compare` gives a t-interval over the per-seed paired differences plus the image-bootstrap
variance (one seed per side: the paired bootstrap over the images).

Caching. A run's suite report goes into RUN_DIR/study-SUITE-HASH/ (HASH: of the suite's settings), written all at once
by the suite itself, so a rerun only reads it and a killed study redoes only the run it was measuring (the privacy
suite also keeps that run's finished configurations).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..defaults import AttackConfig
from ..errors import UserError
from ..eval.stats import Comparison, Scores, compare
from .settings import PrivacySettings, RobustnessSettings, record

SUITES = {"robustness": RobustnessSettings, "privacy": PrivacySettings}
RUN_FIELD = {"robustness": "run_dir", "privacy": "run_dirs"}
SET_BY_STUDY = {"robustness": {"run_dir", "surrogate", "out", "overwrite"}, "privacy": {"run_dirs", "out", "overwrite"}}
STUDY_KEYS = ("methods", "comparisons")
HIGHER_IS_BETTER = {"robustness": True, "privacy": False}  # robust accuracy; attack PSNR/SSIM (leakage)


@dataclass(frozen=True)
class SuiteClaim:
    """One suite run on every finished run of `methods`, and the (method, baseline) pairs to compare."""

    suite: str
    methods: tuple[str, ...]
    comparisons: tuple[tuple[str, str], ...]
    settings: dict[str, Any]  # fields of the suite's Settings dataclass

    def for_run(self, run_dir: str | Path, out: str | Path | None = None) -> Any:
        run = [str(run_dir)] if self.suite == "privacy" else str(run_dir)
        return SUITES[self.suite](**{**self.settings, RUN_FIELD[self.suite]: run, "out": out})

    def key(self) -> str:
        """A digest of the suite's settings (not of the run, the output or the device): the cache folder's name."""
        settings = record(self.for_run(""))
        settings.pop(RUN_FIELD[self.suite])
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=float).encode()).hexdigest()[:12]

    def labels(self) -> list[str]:
        """The names a comparison may use: the methods, and for privacy each method under each noise level."""
        if self.suite != "privacy":
            return list(self.methods)
        return [*self.methods, *(noise_label(m, s) for m in self.methods for s in self.for_run("").noise_baseline)]


def noise_label(method: str, sigma: float) -> str:
    return method if not sigma else f"{method} + noise {sigma:g}"


def _eps(value: Any, where: str) -> float:
    """A radius from the spec: a number, or a string "N/D" (e.g. "8/255")."""
    try:
        if isinstance(value, str) and "/" in value:
            num, den = value.split("/", 1)
            return float(num) / float(den)
        return float(value)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{where}: [robustness] eps {value!r}: write a number or N/D, e.g. \"8/255\"") from None


def parse_claim(suite: str, body: dict, methods: list[str], where: str) -> SuiteClaim:
    """A spec's [robustness] or [privacy] table, validated by the suite's own checks (every error names the table)."""
    body = dict(body)
    chosen = tuple(body.pop("methods", methods))
    if bad := [m for m in chosen if m not in methods]:
        raise UserError(f"{where}: [{suite}] methods {bad} are not methods of the spec; known: {methods}")
    pairs = tuple(tuple(c) for c in body.pop("comparisons", ())) or tuple((m, chosen[0]) for m in chosen[1:])
    allowed = {f.name for f in fields(SUITES[suite])} - SET_BY_STUDY[suite]
    if bad := sorted(set(body) - allowed):
        raise UserError(f"{where}: [{suite}] has unknown settings {bad}; expected {sorted(allowed | set(STUDY_KEYS))}")
    if suite == "robustness" and "eps" in body:
        body["eps"] = sorted({_eps(e, where) for e in body["eps"]})
    if suite == "privacy" and "attack" in body:
        try:
            body["attack"] = AttackConfig(**body["attack"])
        except TypeError as e:
            raise UserError(f"{where}: [privacy.attack]: {e}") from None
    claim = SuiteClaim(suite, chosen, pairs, body)
    try:
        importlib.import_module(f"{__package__}.{suite}").validate(claim.for_run("."))
    except (TypeError, UserError) as e:
        raise UserError(f"{where}: [{suite}]: {e}") from None
    for pair in pairs:
        if len(pair) != 2 or not set(pair) <= set(claim.labels()):
            raise UserError(f"{where}: [{suite}] comparison {list(pair)} names an unknown method; known: {claim.labels()}")
    return claim


# -- measuring ------------------------------------------------------------------------------------------

def cache_folder(claim: SuiteClaim, run_dir: Path) -> Path:
    """RUN_DIR/study-SUITE-HASH/: where one run's report of this claim's suite is kept."""
    return Path(run_dir) / f"study-{claim.suite}-{claim.key()}"


def cached_report(claim: SuiteClaim, run_dir: Path, log=print) -> dict:
    """The suite's report on one run (robustness.json / privacy.json), computed once into `cache_folder`."""
    from ..runs import read_json

    folder = cache_folder(claim, run_dir)
    if not (folder / f"{claim.suite}.json").exists():
        log(f"study: {claim.suite} of {Path(run_dir).name}")
        importlib.import_module(f"{__package__}.{claim.suite}").run(claim.for_run(run_dir, out=folder))
    return read_json(folder / f"{claim.suite}.json", f"the study's cached {claim.suite} report")


def per_image(suite: str, report: dict, method: str) -> dict[str, dict[str, list[float]]]:
    """label -> metric -> per-image values of one run's report (what the comparisons pair image by image)."""
    if suite == "robustness":
        per = report["per_example"]
        values = {"clean accuracy": per["clean"]} | {f"robust accuracy {lb}": v for lb, v in per["worst_case"].items()}
        return {method: values}
    out: dict[str, dict[str, list[float]]] = {}
    for e in report["entries"]:
        for attack, r in e["attacks"].items():
            for metric in ("psnr", "ssim"):
                out.setdefault(noise_label(method, e["sigma"]), {})[f"{attack} {metric.upper()} k={e['block']}"] = \
                    r["per_image"][metric]
    return out


def finished_runs(spec, claim: SuiteClaim) -> list[tuple[str, int, Path]]:
    """(method, seed, run dir) of the claim's finished runs (a progress report covers those only)."""
    return [(m, s, spec.run_dir(m, s)) for m in claim.methods for s in spec.seeds_of(m)
            if (spec.run_dir(m, s) / "summary.json").exists()]


def measure(spec, claim: SuiteClaim, log=print) -> dict[str, dict[int, dict[str, list[float]]]]:
    """label -> seed -> metric -> per-image values, over the finished runs of the claim's methods."""
    table: dict[str, dict[int, dict[str, list[float]]]] = {}
    images: dict[str, Any] = {}
    for m, s, run_dir in finished_runs(spec, claim):
        report = cached_report(claim, run_dir, log)
        shared = report["per_example"]["index"] if claim.suite == "robustness" else report["settings"]["n_victims"]
        if images.setdefault("first", (run_dir, shared))[1] != shared:
            raise UserError(f"{run_dir} and {images['first'][0]} were measured on other test images; pairing "
                            "needs the same ones (same data and suite seed)")
        for label, values in per_image(claim.suite, report, m).items():
            table.setdefault(label, {})[s] = values
    return table


def comparisons(claim: SuiteClaim, table: dict, n_boot: int) -> list[Comparison]:
    """Every (method, baseline) pair of the claim, metric by metric, over the seeds both sides have."""
    rows = []
    for method, baseline in claim.comparisons:
        seeds = sorted(set(table.get(method, {})) & set(table.get(baseline, {})))
        if not seeds:
            continue  # not finished yet (progress report)
        for metric in table[method][seeds[0]]:
            rows.append(compare([Scores.per_image(table[method][s][metric]) for s in seeds],
                                [Scores.per_image(table[baseline][s][metric]) for s in seeds], metric, method, baseline,
                                higher_is_better=HIGHER_IS_BETTER[claim.suite], n_boot=n_boot))
    return rows


def sanity_flags(spec, claim: SuiteClaim) -> dict[str, int]:
    """Per robustness run: how many checks of its sanity report FLAGged (gradient masking or a too-weak budget)."""
    from ..runs import read_json

    out = {}
    for m in claim.methods:
        for s in spec.seeds_of(m):
            path = spec.run_dir(m, s) / f"study-robustness-{claim.key()}" / "robustness.json"
            report = read_json(path, "robustness report") if path.exists() else {}
            if "sanity" in report:
                out[f"{m}-seed{s}"] = sum(c["status"] == "FLAG" for c in report["sanity"])
    return out


def describe(claim: SuiteClaim) -> str:
    """The report's paragraph on what was measured, how it is paired, and which sign is better."""
    s = claim.for_run("")
    pairing = ("Differences are method - baseline on the same test images, over the seeds both have finished: "
               "t-interval over the per-seed paired differences plus the paired image-bootstrap variance "
               "(one seed per side: paired percentile bootstrap over the images), `stochvit.eval.stats.compare`.")
    if claim.suite == "robustness":
        return (f"`stochvit robustness` on each run: {s.n_examples} seeded test examples (seed {s.seed}, the same for every "
                f"run), {s.norm}, attacks {', '.join(s.attacks)}, EOT {s.eot}, {s.steps} steps, {s.restarts} restart(s), "
                f"{s.passes} evaluation passes. `robust accuracy EPS`: the worst case over those attacks, mean rule "
                f"(per example, the fraction of fresh passes it survives); **higher is better**. {pairing}"
                + ("" if s.sanity else " No sanity report (sanity = false): the budget is unchecked."))
    return (f"`stochvit privacy` on each run: {s.n_victims} seeded victim test images (seed {s.seed}), attacks "
            f"{', '.join(s.attacks)}, split after block(s) {s.split_blocks}; PSNR (dB) and SSIM of the attacker's "
            "reconstructions of the undefended features (`+ noise S`: the deterministic run's features with noise at "
            "S x their RMS). **Lower is better** (the attacker reconstructs less): `better` means the method leaks less "
            f"than its baseline, and a negative difference is a gain in privacy. {pairing}")
