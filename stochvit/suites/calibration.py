"""`stochvit calibration`: calibration of trained runs, their temperature-scaled versions and deep ensembles,
on the clean test split and (with --shift) under corruption at 5 severities: stochvit's CIFAR-10-C style
corruptions of the test split (`stochvit.eval.corruptions`), or the published CIFAR-10-C / CIFAR-100-C files
(`--shift cifar10c:PATH`, `stochvit.eval.cifar_c`), whose images are the official test set's.

Every method is reduced to per-pass probabilities (K, N, C) on val, test and each corrupted test copy; the
metrics of `stochvit.eval.calibration` are then taken per pass (mean ± std) and of the K-sample average through
`stochvit.eval.metrics.mc_metrics`. Temperatures are fitted on clean validation data and kept under shift.

Intervals (`stochvit.eval.stats`, one run per method, an ensemble counting as one): each method's accuracy, NLL, Brier
and ECE of the K-sample average get a 95% percentile-bootstrap interval over the test images, and every method after
the first gets its difference from the first (the baseline) with a paired image-bootstrap 95% CI and a verdict.
Under shift the metric is the mean over the corruption x severity cells of the same images, resampled together.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import DataBundle, ImageSet
from ..errors import UserError
from ..eval.calibration import (
    LOWER_IS_BETTER,
    METRICS,
    apply_temperature,
    binned_ece,
    calibration_metrics,
    confidence_correct,
    fit_temperature,
    reliability,
)
from ..eval.cifar_c import CorruptionBenchmark, open_benchmark
from ..eval.corruptions import CORRUPTIONS, ORIGINAL_CORRUPTIONS, check, corrupt_set
from ..eval.metrics import mc_metrics
from ..eval.stats import Comparison, Scores, compare, comparison_table, interval
from ..layers import MCDropout, is_random, random_modules
from ..precision import resolve_device
from ..predict import dataset_probs, seeded
from ..runs import (
    Run,
    atomic_output_dir,
    check_compatible,
    check_output_dir,
    data_for,
    load_run,
    pyplot,
    read_json,
    read_metrics,
    write_json,
)
from .settings import CalibrationSettings as Settings
from .settings import Result

CI_METRICS = ("accuracy", "nll", "brier", "ece")  # of the K-sample average: intervals and paired comparisons
SHORT = dict(accuracy="acc", nll="NLL", brier="Brier", ece="ECE", adaptive_ece="aECE", mce="MCE", classwise_ece="cwECE",
             aurc="AURC", auroc="AUROC")


@dataclass
class Method:
    """One row group of the table: a run, an ensemble of runs, or a temperature-scaled version of either."""

    name: str
    runs: list[Run]
    val: torch.Tensor  # (K, N, C) per-pass probabilities
    test: torch.Tensor
    shift: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    temperature: dict[str, float] | None = None

    @property
    def samples(self) -> int:
        return int(self.test.shape[0])

    @property
    def kind(self) -> str:
        if len(self.runs) > 1:
            return "ensemble"
        model = self.runs[0].model
        if not is_random(model):
            return "deterministic"
        return "mc_dropout" if all(isinstance(m, MCDropout) for m in random_modules(model)) else "stochastic"

    def scaled(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-pass probabilities for single-pass metrics, K-sample average), with this method's temperatures."""
        if self.temperature is None:
            return probs, probs.mean(0)
        return (apply_temperature(probs, self.temperature["single_pass"]),
                apply_temperature(probs, self.temperature["mc_average"]).mean(0))

    def metrics(self, probs: torch.Tensor, labels: torch.Tensor) -> dict:
        single, average = self.scaled(probs)
        result = mc_metrics(single, labels, metric_fn=calibration_metrics)
        result["mc_average"] = calibration_metrics(average, labels)
        return result


# -- data and predictions ---------------------------------------------------------------------------------

def _data_key(config: dict, spec: str | None, data_dir: str | None) -> str:
    t = config["train"]
    if spec is None or spec == t["data"]:
        return json.dumps([t["data"], data_dir or t.get("data_dir"), t["split_seed"], t.get("train_limit"), t.get("img_size")])
    return json.dumps([spec, data_dir, t["split_seed"], config["model"]["kwargs"]["img_size"]])


def shared_data(runs: list[Run], spec: str | None, data_dir: str | None) -> DataBundle:
    """The one dataset every run is evaluated on; runs trained on different splits cannot share a table."""
    cache: dict[str, DataBundle] = {}
    first = None
    for run in runs:
        key = _data_key(run.config, spec, data_dir)
        if key not in cache:
            cache[key] = data_for(run.config, spec, data_dir)
        data = cache[key]
        check_compatible(run.config, data)
        if first is None:
            first = data
        elif not (torch.equal(first.test.labels, data.test.labels) and torch.equal(first.val.labels, data.val.labels)):
            raise UserError(f"run {run.path} was trained on another split of {data.name} than {runs[0].path}; "
                            "pass --data to evaluate all runs on the same data")
    return first


def run_probs(runs: list[Run], dataset: ImageSet, samples: int, precision: str, batch_size: int = 256) -> torch.Tensor:
    """Per-pass probabilities (K, N, C); an ensemble averages its members pass by pass (deterministic ones repeat)."""
    members = [dataset_probs(r.model, dataset, samples, batch_size, precision)[0] for r in runs]
    k = max(len(m) for m in members)
    return torch.stack([m.expand(k, -1, -1) for m in members]).mean(0)


def _unique_names(runs: list[Run]) -> list[str]:
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        names = [f"{r.path.parent.name}/{r.name}" for r in runs]
    return names


# -- the suite --------------------------------------------------------------------------------------------

def _clean(obj):
    """JSON-safe copy: NaN (undefined AUROC) becomes null."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _regime(run: Run) -> dict:
    """Last-epoch train loss and val NLL: train loss well below val NLL marks the over-confident regime."""
    rows = read_metrics(run.path)
    if not rows:
        return {}
    last = rows[-1]
    return dict(epochs=len(rows), train_loss=last.get("train_loss"), val_nll=last.get("val_nll"), val_ece=last.get("val_ece"))


@dataclass
class CalibrationResult(Result):
    """`out`: the report folder; `report`: what its calibration.json holds (undefined values as None)."""

    report: dict


@dataclass
class ShiftPlan:
    """The shifted test images: the (corruption, severity) cells, the images they corrupt and severity 0's clean ones."""

    test: ImageSet  # the run's clean test split
    bench: CorruptionBenchmark | None  # the released files, or None for stochvit's corruptions of `test`
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    conditions: list[tuple[str, int]]  # empty: no shift
    idx: torch.Tensor | None  # the subset of the corrupted pool (None: all of it)
    labels: torch.Tensor
    clean_idx: torch.Tensor | None  # severity 0: the shift images' own clean copies, or (benchmark) the whole test split
    clean_labels: torch.Tensor

    def dataset(self, cond: tuple[str, int]) -> ImageSet:
        if self.bench is not None:
            return self.bench.cell(*cond, None if self.idx is None else self.idx.numpy())
        return corrupt_set(self.test if self.idx is None else self.test.subset(self.idx), *cond)


def validate(s: Settings) -> tuple[CorruptionBenchmark | None, tuple[str, ...]]:
    """Refuse settings the suite cannot run with; returns the released benchmark (or None) and the corruptions."""
    if s.samples < 1:
        raise UserError(f"samples={s.samples} must be >= 1")
    if s.n_boot < 100:
        raise UserError(f"n_boot={s.n_boot}: use at least 100 resamples")
    if s.shift_limit is not None and s.shift_limit < 10:
        raise UserError(f"shift_limit={s.shift_limit} must be at least 10 images")
    if any(len(e) < 2 for e in s.ensembles or []):
        raise UserError("an ensemble needs at least two run directories")
    severities = tuple(s.severities)
    bench = open_benchmark(s.shift) if isinstance(s.shift, str) else None
    if bench is not None:
        corruptions = bench.resolve(None if s.corruptions is None else tuple(s.corruptions))
    else:
        corruptions = ORIGINAL_CORRUPTIONS if s.corruptions is None else tuple(s.corruptions)
        corruptions = CORRUPTIONS if corruptions == ("all",) else corruptions
        for c in corruptions:
            for sev in severities:
                check(c, sev)
    if s.shift and not (corruptions and severities):
        raise UserError("shift needs at least one corruption and one severity")
    return bench, corruptions


def load_groups(s: Settings) -> tuple[list[Run], list[list[Run]], list[str]]:
    """Every run once; the methods' groups of runs (single runs, then ensembles) and their names."""
    ensembles = [list(e) for e in s.ensembles or []]
    where = resolve_device(s.device)  # where the models predict (None: cuda when available)
    loaded: dict[Path, Run] = {}
    for p in list(s.run_dirs) + [p for e in ensembles for p in e]:
        key = Path(p).resolve()
        if key not in loaded:
            loaded[key] = load_run(p)
            loaded[key].model.to(where)
    runs = [loaded[Path(p).resolve()] for p in s.run_dirs]
    groups = [[r] for r in runs] + [[loaded[Path(p).resolve()] for p in e] for e in ensembles]
    names = _unique_names(runs) + [f"ensemble-{len(e)}" + (f"#{i + 1}" if len(ensembles) > 1 else "")
                                   for i, e in enumerate(ensembles)]
    return list(loaded.values()), groups, names


def shift_plan(s: Settings, bench: CorruptionBenchmark | None, corruptions: tuple[str, ...], bundle: DataBundle) -> ShiftPlan:
    test, severities = bundle.test, tuple(s.severities)
    if bench is not None:
        bench.check(corruptions, severities, bundle.img_size, bundle.in_chans, bundle.num_classes)
    pool = bench.labels if bench is not None else test.labels  # the images that get corrupted
    idx = None
    if s.shift and s.shift_limit is not None and s.shift_limit < len(pool):
        from sklearn.model_selection import train_test_split

        keep = train_test_split(range(len(pool)), train_size=s.shift_limit, stratify=pool.numpy(), random_state=0)[0]
        idx = torch.as_tensor(sorted(keep))
    # severity 0: the shift images' own clean copies; a benchmark ships none, so the run's whole clean test split
    clean_idx = None if bench is not None else idx
    return ShiftPlan(test, bench, corruptions, severities,
                     [(c, sev) for c in corruptions for sev in severities] if s.shift else [],
                     idx, pool if idx is None else pool[idx], clean_idx,
                     test.labels if clean_idx is None else test.labels[clean_idx])


def predict_methods(s: Settings, groups: list[list[Run]], names: list[str], bundle: DataBundle,
                    shift: ShiftPlan) -> list[Method]:
    """Each run's predictions once per split and corruption, combined into methods (ensembles average their runs)."""
    methods: list[Method] = []
    bar = tqdm(total=len(groups) * (2 + len(shift.conditions)), desc="predict", unit="set", disable=s.quiet, mininterval=1)
    cache: dict[tuple[Path, str], torch.Tensor] = {}

    def probs(group: list[Run], tag: str, dataset: ImageSet) -> torch.Tensor:
        parts = []
        for r in group:
            key = (r.path.resolve(), tag)
            if key not in cache:
                with seeded(s.seed + len(cache)):  # each prediction set its own seeded draws, in a fixed order
                    cache[key] = run_probs([r], dataset, s.samples, s.precision, s.batch_size)
            parts.append(cache[key])
        k = max(len(p) for p in parts)
        bar.update(1)
        return torch.stack([p.expand(k, -1, -1) for p in parts]).mean(0)

    for name, group in zip(names, groups):
        methods.append(Method(name, group, probs(group, "val", bundle.val), probs(group, "test", bundle.test)))
    for cond in shift.conditions:  # one corrupted set in memory at a time
        dataset = shift.dataset(cond)
        for m in methods:
            m.shift[cond] = probs(m.runs, f"{cond[0]}-{cond[1]}", dataset)
    bar.close()
    return methods


def with_temperature_scaling(methods: list[Method], val_labels: torch.Tensor) -> list[Method]:
    """Each method followed by its "+TS" twin, temperatures fitted on validation NLL (the predictions are reused)."""
    scaled = []
    for m in methods:
        t_single = fit_temperature(m.val, val_labels, average=False)
        t_avg = fit_temperature(m.val, val_labels, average=True) if m.samples > 1 else t_single
        scaled.append(Method(f"{m.name} +TS", m.runs, m.val, m.test, m.shift, dict(single_pass=t_single, mc_average=t_avg)))
    order = {m.name: i for i, m in enumerate(methods + scaled)}
    return sorted(methods + scaled, key=lambda m: order[m.name.removesuffix(" +TS")] + (0.5 if m.temperature else 0))


def method_entry(m: Method, bundle: DataBundle, shift: ShiftPlan) -> dict:
    """One method's part of calibration.json: metrics on val, test and (under shift) every cell and severity."""
    entry = dict(runs=[str(r.path) for r in m.runs], kind=m.kind, samples=m.samples, temperature=m.temperature,
                 regime={r.name: _regime(r) for r in m.runs},
                 val_nll=m.metrics(m.val, bundle.val.labels)["mc_average"]["nll"], test=m.metrics(m.test, bundle.test.labels))
    if shift.conditions:
        per = {c: {sev: m.metrics(m.shift[(c, sev)], shift.labels) for sev in shift.severities} for c in shift.corruptions}
        entry["shift"] = per
        clean = m.metrics(m.test if shift.clean_idx is None else m.test[:, shift.clean_idx], shift.clean_labels)
        entry["shift_mean"] = {0: _summary(clean)} | {
            sev: {part: {k: _nanmean([_summary(per[c][sev])[part][k] for c in shift.corruptions]) for k in METRICS}
                  for part in ("single_pass", "mc_average")} for sev in shift.severities}
    return entry


def build_report(s: Settings, methods: list[Method], bundle: DataBundle, shift: ShiftPlan) -> dict:
    """calibration.json: every method's metrics and 95% intervals, and the paired comparisons with the first."""
    results = {m.name: method_entry(m, bundle, shift) for m in tqdm(methods, desc="metrics", unit="method", disable=s.quiet)}
    conditions = shift.conditions
    cells = {m.name: _cells(m, bundle.test.labels, shift.labels, shift.clean_idx, shift.clean_labels, conditions)
             for m in methods}
    for name, c in cells.items():
        results[name]["intervals"] = method_intervals(c, shift.corruptions if conditions else (), shift.severities, s.n_boot)
        if conditions:  # the value the shift intervals and comparisons are about: the mean over every cell
            results[name]["shift_overall"] = {k: cell_scores(k, *_shift(c)).value() for k in CI_METRICS}
    return dict(data=bundle.name, split="test", images=len(bundle.test), test_source=bundle.test_source(),
                shift_source=_shift_source(shift.bench, bundle, len(shift.labels)) if conditions else None,
                shift_images=len(shift.labels) if conditions else 0,
                samples=s.samples, ece_bins=15, corruptions=list(shift.corruptions) if conditions else [],
                severities=list(shift.severities) if conditions else [], methods=results,
                baseline=methods[0].name, n_boot=s.n_boot,
                comparisons={cond: [c.as_dict() for c in rows] for cond, rows in compare_methods(cells, s.n_boot).items()},
                command=" ".join(["stochvit", *sys.argv[1:]]))


def run(s: Settings) -> CalibrationResult:
    """Evaluate runs (and ensembles of runs) with and without temperature scaling; write the report into `s.out`
    (default FIRST_RUN_DIR/calibration) all at once (what `stochvit calibration` does).

    `s.shift`: True for the built-in corruptions (`corruptions` defaults to the original 8; ("all",) for every kind),
    or "cifar10c:PATH" / "cifar100c:PATH" for the released files (default: their 15 standard kinds).
    """
    bench, corruptions = validate(s)
    every_run, groups, names = load_groups(s)
    bundle = shared_data(every_run, s.data, s.data_dir)
    shift = shift_plan(s, bench, corruptions, bundle)
    runs = [g[0] for g in groups[:len(s.run_dirs)]]
    out = Path(s.out) if s.out else runs[0].path / "calibration"
    settings = dict(runs=[str(r.path) for r in runs], ensembles=[[str(r.path) for r in g] for g in groups[len(runs):]],
                    data=bundle.name, samples=s.samples, shift=s.shift, corruptions=list(corruptions),
                    severities=list(shift.severities), shift_limit=s.shift_limit, precision=s.precision, n_boot=s.n_boot,
                    seed=s.seed, batch_size=s.batch_size)
    check_output_dir(out, settings, "calibration.json", s.overwrite)
    methods = with_temperature_scaling(predict_methods(s, groups, names, bundle, shift), bundle.val.labels)
    report = build_report(s, methods, bundle, shift)
    with atomic_output_dir(out, settings, "calibration.json", s.overwrite) as tmp:
        _write_outputs(tmp, report, methods, bundle.test.labels)
    if not s.quiet:
        print(format_console(report))
        print(f"wrote {out}/calibration.json, calibration.md and plots")
    return CalibrationResult(out, json.loads(json.dumps(_clean(report), default=float)))  # as calibration.json holds it


def _shift_source(bench, bundle: DataBundle, images: int) -> dict:
    """What the shifted images are, in words, for the report: a published benchmark or stochvit's imitation."""
    if bench is None:
        return dict(kind="builtin", images=f"{images} images of the clean test split ({bundle.test_source()})",
                    corruptions="stochvit's CIFAR-10-C style corruptions (stochvit.eval.corruptions): an imitation of "
                                "the benchmark's kinds, not the benchmark; numbers do not compare with published ones",
                    clean="severity 0: the same images, uncorrupted")
    return dict(kind=bench.spec.split(":", 1)[0], path=str(bench.root),
                images=f"{images} of the {bench.per_severity} images per cell of {bench.title} (the official test set)",
                corruptions=f"the released {bench.title} files: numbers compare directly with published ones",
                clean=f"severity 0: the run's own clean test split ({bundle.test_source()}), other images than "
                      f"{bench.title} corrupts")


# -- intervals and paired comparisons (stochvit.eval.stats) ---------------------------------------------------------

def cell_scores(metric: str, cells: list[torch.Tensor], labels: torch.Tensor) -> Scores:
    """The mean of a metric over cells: (N, C) probabilities of the same N images (one per corruption x severity)."""
    parts = [Scores.from_probs(metric, p, labels) for p in cells]
    if len(parts) == 1:
        return parts[0]
    return Scores(lambda w: torch.stack([s(w) for s in parts]).mean(0), parts[0].n)


def _cells(m: Method, test_labels: torch.Tensor, shift_labels: torch.Tensor, clean_idx: torch.Tensor | None,
           clean_labels: torch.Tensor, conditions: list[tuple[str, int]]) -> dict:
    """A method's K-sample-average probabilities: {"clean": ([probs], labels)} and, under shift, severity 0's clean
    images ("shift_clean") and every (corruption, severity) cell, each with the labels they share."""
    out = {"clean": ([m.scaled(m.test)[1]], test_labels)}
    if conditions:
        out["shift_clean"] = ([m.scaled(m.test if clean_idx is None else m.test[:, clean_idx])[1]], clean_labels)
        out["cells"] = {cond: m.scaled(m.shift[cond])[1] for cond in conditions}
        out["shift_labels"] = shift_labels
    return out


def _shift(cells: dict, keep=lambda cond: True) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [p for cond, p in cells["cells"].items() if keep(cond)], cells["shift_labels"]


def method_intervals(cells: dict, corruptions: tuple[str, ...], severities: tuple[int, ...], n_boot: int) -> dict:
    """[low, high] 95% intervals of one method's values: clean test, shift (mean over cells), per severity (mean over
    corruptions; 0 = the shift subset clean) and the ECE of every corruption x severity."""
    def bounds(probs: list[torch.Tensor], labels: torch.Tensor, metric: str) -> list[float]:
        return list(interval(cell_scores(metric, probs, labels), n_boot=n_boot))

    out = {"test": {k: bounds(*cells["clean"], k) for k in CI_METRICS}}
    if corruptions:
        out["shift"] = {k: bounds(*_shift(cells), k) for k in CI_METRICS}
        out["shift_mean"] = {0: {k: bounds(*cells["shift_clean"], k) for k in CI_METRICS}} | {
            s: {k: bounds(*_shift(cells, lambda cond, s=s: cond[1] == s), k) for k in CI_METRICS} for s in severities}
        out["shift_ece"] = {c: {s: bounds(*_shift(cells, lambda cond, c=c, s=s: cond == (c, s)), "ece") for s in severities}
                            for c in corruptions}
    return out


def compare_methods(cells: dict[str, dict], n_boot: int) -> dict[str, list[Comparison]]:
    """Every method after the first minus the first, per condition ("clean"; "shift" = mean over the cells)."""
    names = list(cells)
    base = names[0]
    conds = ["clean"] + (["shift"] if "cells" in cells[base] else [])
    out = {}
    for cond in conds:
        get = (lambda c: c["clean"]) if cond == "clean" else _shift
        out[cond] = [compare([cell_scores(k, *get(cells[name]))], [cell_scores(k, *get(cells[base]))], k, name, base,
                             n_boot=n_boot) for name in names[1:] for k in CI_METRICS]
    return out


def _comparison(d: dict) -> Comparison:
    return Comparison(**{f.name: tuple(d[f.name]) if f.name == "seeds" else d[f.name] for f in fields(Comparison)})


def _nanmean(values: list[float]) -> float:
    v = torch.tensor(values, dtype=torch.float64)
    return v.nanmean().item()


def _summary(result: dict) -> dict:
    return dict(single_pass={k: v["mean"] for k, v in result["single_pass"].items()}, mc_average=dict(result["mc_average"]))


def _write_outputs(tmp: Path, report: dict, methods: list[Method], labels: torch.Tensor) -> None:
    write_json(tmp / "calibration.json", _clean(report))
    (tmp / "calibration.md").write_text(format_markdown(report))
    plot_reliability(tmp / "reliability.png", methods, labels, report)
    plot_metrics(tmp / "metrics.png", report)
    plot_confidence_histograms(tmp / "confidence_hist.png", methods, labels)
    if report["corruptions"]:
        plot_shift(tmp / "shift.png", tmp / "shift_by_corruption.png", report)


def _int_keys(obj):
    """calibration.json read back with its severity keys as ints again (JSON made them strings; the plots index by int)."""
    if isinstance(obj, dict):
        return {int(k) if k.isdigit() else k: _int_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_int_keys(v) for v in obj]
    return obj


def replot(out: Path) -> list[Path]:
    """Redraw the plots that calibration.json holds the numbers of (shift curves; metrics.png when it has intervals),
    without predicting again. The reliability and confidence plots need the per-image probabilities: rerun the suite."""
    out = Path(out)
    report = _int_keys(read_json(out / "calibration.json", "the calibration report to redraw"))
    drawn = []
    if all("intervals" in m for m in report["methods"].values()):
        plot_metrics(out / "metrics.png", report)
        drawn.append(out / "metrics.png")
    if report["corruptions"]:
        plot_shift(out / "shift.png", out / "shift_by_corruption.png", report)
        drawn += [out / "shift.png", out / "shift_by_corruption.png"]
    return drawn


# -- plots (matplotlib, Agg) -------------------------------------------------------------------------------------

def _grid(n: int, cols: int = 4) -> tuple[int, int]:
    cols = min(cols, n)
    return math.ceil(n / cols), cols


def plot_reliability(path: Path, methods: list[Method], labels: torch.Tensor, report: dict | None = None) -> None:
    fig = reliability_figure(methods, labels, report)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    pyplot().close(fig)


def reliability_figure(methods: list[Method], labels: torch.Tensor, report: dict | None = None):
    """Reliability diagram (accuracy per confidence bin, gap to the diagonal) over a confidence histogram, per method."""
    plt = pyplot()
    rows, cols = _grid(len(methods))
    fig = plt.figure(figsize=(3.3 * cols, 4.4 * rows))
    outer = fig.add_gridspec(rows, cols, hspace=0.45, wspace=0.3)
    for i, m in enumerate(methods):
        inner = outer[i // cols, i % cols].subgridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
        top, bottom = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
        conf, correct = confidence_correct(m.scaled(m.test)[1], labels)
        r = reliability(conf, correct)
        edges = r["edges"].double()
        centers, width = ((edges[1:] + edges[:-1]) / 2).numpy(), (edges[1:] - edges[:-1]).numpy()
        filled = (r["count"] > 0).numpy()
        top.bar(centers[filled], r["accuracy"].numpy()[filled], width=width[filled], color="tab:blue", edgecolor="k",
                linewidth=0.4, label="accuracy")
        top.bar(centers[filled], (r["confidence"] - r["accuracy"]).numpy()[filled], bottom=r["accuracy"].numpy()[filled],
                width=width[filled], fill=False, hatch="////", edgecolor="tab:red", linewidth=0.6,
                label="gap to mean confidence")
        top.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="calibrated")
        top.set(xlim=(0, 1), ylim=(0, 1), xticklabels=[], ylabel="accuracy")
        ci = (report or {}).get("methods", {}).get(m.name, {}).get("intervals", {}).get("test", {}).get("ece")
        top.set_title(f"{m.name}\nECE {binned_ece(conf, correct):.3f}{_ci(ci)}", fontsize=9)
        if i == 0:
            top.legend(fontsize=7, loc="upper left")
        bottom.bar(centers, (r["count"] / r["count"].sum()).numpy(), width=width, color="tab:gray", edgecolor="k", linewidth=0.4)
        bottom.axvline(conf.mean().item(), color="tab:red", linewidth=1, label="mean confidence")
        bottom.axvline(correct.mean().item(), color="tab:blue", linewidth=1, linestyle=":", label="accuracy")
        bottom.set(xlim=(0, 1), xlabel="confidence", ylabel="fraction")
        if i == 0:
            bottom.legend(fontsize=6, loc="upper right", handlelength=1.5)
    fig.suptitle("Reliability diagrams (K-sample average, clean test); below: share of images per confidence bin",
                 fontsize=11, y=1.0 + 0.25 / fig.get_figheight())
    return fig


def plot_metrics(path: Path, report: dict) -> None:
    """Accuracy, NLL, Brier and ECE of every method's K-sample average, clean (and shift), with 95% error bars."""
    plt = pyplot()
    names = list(report["methods"])
    conds = [("test", "clean test")] + ([("shift", "shift (mean over cells)")] if report["corruptions"] else [])
    fig, axes = plt.subplots(1, len(CI_METRICS), figsize=(3.2 * len(CI_METRICS), 1.2 + 0.32 * len(names) * len(conds)),
                             squeeze=False)
    height = 0.5 / len(conds)
    for ax, key in zip(axes[0], CI_METRICS):
        for j, (cond, label) in enumerate(conds):
            vals, lo, hi = [], [], []
            for name in names:
                e = report["methods"][name]
                v = e["test"]["mc_average"][key] if cond == "test" else e["shift_overall"][key]
                b = e["intervals"][cond][key]
                vals.append(v)
                lo.append(max(v - b[0], 0.0))
                hi.append(max(b[1] - v, 0.0))
            y = [i + (j - (len(conds) - 1) / 2) * height for i in range(len(names))]
            ax.errorbar(vals, y, xerr=[lo, hi], fmt="o", markersize=4, capsize=2, color=f"C{j}", label=label, linewidth=1)
        ax.set_yticks(range(len(names)), names if key == CI_METRICS[0] else [""] * len(names), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{SHORT[key]} ({'higher' if key == 'accuracy' else 'lower'} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.locator_params(axis="x", nbins=5)
        ax.grid(axis="x", alpha=0.3)
    bottom = 0.0
    if len(conds) > 1:
        bottom = 0.5 / fig.get_figheight()
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=len(conds), fontsize=7, frameon=False)
    fig.suptitle(f"{report['data']}: K-sample average, 95% bootstrap intervals over the test images", fontsize=9)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_confidence_histograms(path: Path, methods: list[Method], labels: torch.Tensor) -> None:
    """Confidence of correct vs wrong predictions: a good model separates them (the AUROC column)."""
    plt = pyplot()
    rows, cols = _grid(len(methods))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
    bins = torch.linspace(0, 1, 21).numpy()
    for ax, m in zip(axes.flat, methods):
        conf, correct = confidence_correct(m.scaled(m.test)[1], labels)
        ok = correct.bool()
        ax.hist(conf[ok].numpy(), bins=bins, density=True, alpha=0.6, color="tab:green", label=f"correct ({int(ok.sum())})")
        ax.hist(conf[~ok].numpy(), bins=bins, density=True, histtype="step", linewidth=1.5, color="tab:red",
                label=f"wrong ({int((~ok).sum())})")  # an outline: where the two overlap, both stay visible
        ax.set_title(m.name, fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_ylabel("density (area 1 each)")
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_shift(path: Path, by_corruption: Path, report: dict) -> None:
    """Accuracy and ECE against severity (mean over corruptions), and ECE per corruption."""
    plt = pyplot()
    sev = [0] + report["severities"]
    names = list(report["methods"])
    base = [n for n in names if not n.endswith(" +TS")]
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(base)}

    def style(name: str) -> dict:
        return dict(color=colors[name.removesuffix(" +TS")], linestyle="--" if name.endswith(" +TS") else "-", marker="o",
                    markersize=3, label=name)

    def band(ax, name: str, bounds: list[list[float]]) -> None:
        """The 95% interval of each point as a shaded band around the curve."""
        ax.fill_between(sev, [b[0] for b in bounds], [b[1] for b in bounds], color=colors[name.removesuffix(" +TS")],
                        alpha=0.08 if name.endswith(" +TS") else 0.15, linewidth=0)

    has_ci = all("intervals" in m for m in report["methods"].values())  # reports before the intervals have none
    bands = "bands: 95% bootstrap intervals" if has_ci else "no intervals in this report (rerun the suite for them)"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in names:
        sm, ci = report["methods"][name]["shift_mean"], report["methods"][name].get("intervals", {}).get("shift_mean")
        for ax, key in zip(axes, ("accuracy", "ece", "nll")):
            ax.plot(sev, [sm[s]["mc_average"][key] for s in sev], **style(name))
            if ci:
                band(ax, name, [ci[s][key] for s in sev])
    for ax, key in zip(axes, ("accuracy", "ece", "nll")):
        ax.set(xlabel="severity (0 = clean)", ylabel=SHORT[key], title=f"{SHORT[key]} vs severity (mean over corruptions)")
        ax.set_xticks(sev)
        curve = {n: [report["methods"][n]["shift_mean"][s]["mc_average"][key] for s in sev] for n in names}
        hidden = [n for n in names if n.endswith(" +TS") and curve[n] == curve[n.removesuffix(" +TS")]]
        if hidden:  # a temperature rarely moves an argmax: say why a legend entry has no visible line
            which = "every +TS line" if len(hidden) == sum(n.endswith(" +TS") for n in names) else ", ".join(hidden)
            ax.set_title(f"{ax.get_title()}\n" + textwrap.fill(f"{which}: same values as without TS, line hidden", 60,
                                                                break_on_hyphens=False))
        ax.title.set_fontsize(9)
    fig.suptitle(f"K-sample average; {bands}{' over the test images' if has_ci else ''}", fontsize=9)
    _legend_right(fig, axes[0])
    fig.savefig(path, dpi=90)
    plt.close(fig)

    corruptions = report["corruptions"]
    rows, cols = _grid(len(corruptions))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, c in zip(axes.flat, corruptions):
        for name in names:
            e = report["methods"][name]
            ax.plot(sev, [e["shift_mean"][0]["mc_average"]["ece"]] + [e["shift"][c][s]["mc_average"]["ece"] for s in sev[1:]],
                    **style(name))
            if "intervals" in e:
                band(ax, name, [e["intervals"]["shift_mean"][0]["ece"]] + [e["intervals"]["shift_ece"][c][s] for s in sev[1:]])
        ax.set(title=c, xlabel="severity", ylabel="ECE", xticks=sev)
    for ax in list(axes.flat)[len(corruptions):]:
        ax.axis("off")
    fig.suptitle(f"ECE per corruption (K-sample average); {bands}", fontsize=9)
    _legend_right(fig, axes.flat[0])
    fig.savefig(by_corruption, dpi=90)
    plt.close(fig)


def _legend_right(fig, ax) -> None:
    """One legend for the figure, right of the panels: inside a panel, a dozen methods hide its curves."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    width = 0.055 * max(len(label) for label in labels) + 0.6  # inches: a 7-pt character ~0.055 in, plus the line
    fig.tight_layout(rect=(0, 0, 1 - width / fig.get_figwidth(), 1))


# -- tables ---------------------------------------------------------------------------------------------------

def _rows(report: dict):
    """(method, prediction label, metrics dict, std dict or None) rows: single pass, then the K-sample average."""
    for name, e in report["methods"].items():
        t = e["test"]
        single = "1 pass per member" if e["kind"] == "ensemble" else "single pass"
        if e["samples"] > 1:
            sp = t["single_pass"]
            yield name, single, {k: v["mean"] for k, v in sp.items()}, {k: v["std"] for k, v in sp.items()}
            yield name, f"K={e['samples']} average", t["mc_average"], None
        else:
            yield name, single, t["mc_average"], None


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _temperature(e: dict, prediction: str) -> str:
    t = e["temperature"]
    if not t:
        return "1"
    return f"{t['mc_average' if prediction.endswith('average') else 'single_pass']:.3f}"


def format_markdown(report: dict) -> str:
    lines = [f"# Calibration on {report['data']} ({report['split']} split, {report['images']} images)", "",
             f"Test images: {report['test_source']}." if report.get("test_source") else "", "",
             f"K = {report['samples']} stochastic passes; ECE, MCE, classwise ECE: {report['ece_bins']} equal-width bins; "
             "adaptive ECE: equal-mass bins. Single-pass values are mean ± std over the K passes. T: temperature fitted on "
             "clean validation NLL (1 = none). Lower is better for all but acc and AUROC.", "",
             "| method | prediction | T | " + " | ".join(SHORT[k] for k in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for name, pred, vals, std in _rows(report):
        cells = [_fmt(vals[k]) + (f" ± {_fmt(std[k])}" if std else "") for k in METRICS]
        lines.append(f"| {name} | {pred} | {_temperature(report['methods'][name], pred)} | " + " | ".join(cells) + " |")
    lines += _interval_markdown(report)
    lines += ["", "## Training regime (last epoch)", "", "| run | epochs | train loss | val NLL | val ECE |",
              "|---|---|---|---|---|"]
    seen = set()
    for e in report["methods"].values():
        for run, r in e["regime"].items():
            if run not in seen and r:
                seen.add(run)
                lines.append(f"| {run} | {r['epochs']} | {_fmt(r['train_loss'])} | {_fmt(r['val_nll'])} | {_fmt(r['val_ece'])} |")
    if report["corruptions"]:
        sev = report["severities"]
        lines += ["", f"## Under shift: mean over {len(report['corruptions'])} corruptions ({', '.join(report['corruptions'])}), "
                  f"{report['shift_images']} test images, K-sample average", ""]
        src = report.get("shift_source")
        if src:
            lines += [f"Corrupted images: {src['images']}; corruptions: {src['corruptions']}; {src['clean']}.", ""]
        for key in ("accuracy", "ece", "nll"):
            lines += [f"**{SHORT[key]}** by severity (0 = clean)", "",
                      "| method | " + " | ".join(map(str, [0] + sev)) + " | mean 1-5 |", "|---|" + "---|" * (len(sev) + 2)]
            for name, e in report["methods"].items():
                vals = [e["shift_mean"][s]["mc_average"][key] for s in [0] + sev]
                ci = e.get("intervals", {})
                bounds = [ci.get("shift_mean", {}).get(s, {}).get(key) for s in [0] + sev] + [ci.get("shift", {}).get(key)]
                cells = [_fmt(v) + _ci(b) for v, b in zip(vals + [sum(vals[1:]) / len(sev)], bounds)]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
        if report.get("comparisons"):
            lines += ["Cells: value [95% interval], percentile bootstrap over the shift subset's images.", ""]
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def _ci(bounds: list[float] | None, digits: int = 3) -> str:
    return "" if bounds is None else f" [{_fmt(bounds[0], digits)}, {_fmt(bounds[1], digits)}]"


def _interval_markdown(report: dict) -> list[str]:
    """Each method's value with its 95% interval, then every method minus the baseline with paired CIs and verdicts."""
    if not report.get("comparisons"):
        return []
    n, conds = report["n_boot"], [("test", "clean test", report["images"])]
    if report["corruptions"]:
        conds.append(("shift", f"shift (mean over {len(report['corruptions'])} corruptions x severities "
                               f"{', '.join(map(str, report['severities']))})", report["shift_images"]))
    lines = ["", "## 95% intervals (K-sample average)", "",
             f"One run per method (an ensemble counts as one), so the intervals cover test-set sampling only: a percentile "
             f"bootstrap over the test images ({n} resamples). Under shift every resample draws images, each with all its "
             "corrupted copies. ECE is biased upwards on finite samples, so its resampled values, and the interval, tend "
             "to lie above the point value; the paired differences below largely cancel that bias.", ""]
    for key, title, images in conds:
        lines += [f"**{title}**, {images} images", "", "| method | " + " | ".join(SHORT[k] for k in CI_METRICS) + " |",
                  "|---|" + "---|" * len(CI_METRICS)]
        for name, e in report["methods"].items():
            src = e[key]["mc_average"] if key == "test" else e["shift_overall"]
            lines.append(f"| {name} | " + " | ".join(_fmt(src[k]) + _ci(e["intervals"][key][k]) for k in CI_METRICS) + " |")
        lines.append("")
    lines += [f"## Differences from the baseline `{report['baseline']}`", "",
              "method - baseline on the same images; 95% CI from a paired bootstrap over the test images "
              f"(both sides see the same resampled images, {n} resamples); verdicts from `stochvit.eval.stats` "
              "(never from a point estimate).", ""]
    for cond, rows in report["comparisons"].items():
        lines += [f"**{'clean test' if cond == 'clean' else 'shift'}**", "",
                  comparison_table([_comparison(d) for d in rows]), ""]
    return lines


def format_console(report: dict) -> str:
    """The side-by-side table printed at the end: one line per method and prediction, mean values only."""
    keys = ("accuracy", "nll", "brier", "ece", "adaptive_ece", "mce", "aurc", "auroc")
    width = max(len(f"{n} ({p})") for n, p, _, _ in _rows(report)) + 2
    head = f"{'method (prediction)':<{width}}{'T':>6}" + "".join(f"{SHORT[k]:>8}" for k in keys)
    if report["corruptions"]:
        head += f"{'shift acc':>11}{'shift ECE':>11}"
    lines = [f"calibration on {report['data']} test ({report['images']} images), K={report['samples']}", head, "-" * len(head)]
    for name, pred, vals, _ in _rows(report):
        e = report["methods"][name]
        line = f"{f'{name} ({pred})':<{width}}{_temperature(e, pred):>6}" + "".join(f"{_fmt(vals[k]):>8}" for k in keys)
        if report["corruptions"]:
            part = "mc_average" if pred.endswith("average") or e["samples"] == 1 else "single_pass"
            sm = [e["shift_mean"][s][part] for s in report["severities"]]
            line += f"{_fmt(sum(v['accuracy'] for v in sm) / len(sm)):>11}{_fmt(sum(v['ece'] for v in sm) / len(sm)):>11}"
        lines.append(line)
    if report["corruptions"]:
        lines.append(f"shift: mean over {len(report['corruptions'])} corruptions x severities {report['severities']}")
    best = {k: min if k in LOWER_IS_BETTER else max for k in keys}
    picks = []
    for k in ("ece", "nll"):
        rows = [(vals[k], f"{n} ({p})") for n, p, vals, _ in _rows(report) if math.isfinite(vals[k])]
        if rows:
            picks.append(f"best {SHORT[k]}: {best[k](rows)[1]}")
    lines.append("; ".join(picks))
    return "\n".join(lines)
