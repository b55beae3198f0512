"""`stochvit study SPEC.toml`: train a study's missing runs, measure its claims, and write one report with intervals.

Settings -> run(settings) -> StudyResult -> report(result, out). The measurement lives in `stochvit.suites.study_runs` (training,
cached predictions) and `stochvit.eval.stats` (intervals and verdicts); this module turns them into tables and plots.
The report is a separate step because it is cheap: a progress report rebuilds it from the cached predictions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..eval.calibration import apply_temperature, fit_temperature
from ..eval.stats import Comparison, Scores, compare, comparison_table
from ..runs import read_json, read_metrics
from .settings import Result, record
from .settings import StudySettings as Settings
from .study_external import measure_external
from .study_runs import (
    StudySpec,
    cached_predictions,
    calibration_pairs,
    load_spec,
    measure_missing,
    run_status,
    shift_set,
    train_missing,
)
from .study_suites import comparisons, describe, measure, sanity_flags
from .study_verdicts import verdict_table

CONDITIONS = ("clean", "shift")
# the over-confident regime (issue 15): test ECE at least this, and the final training loss "well below" the
# validation NLL, read as below this fraction of it
OVERCONFIDENT_ECE, OVERCONFIDENT_LOSS_RATIO = 0.08, 0.7


@dataclass
class StudyResult(Result):
    """`out`: the study's folder (its runs, and report/ by default); the plan, regime and comparisons to report."""

    spec: StudySpec
    plan: list[dict]
    regime: dict
    comparisons: dict[str, list[Comparison]] = field(default_factory=dict)  # condition -> rows
    values: dict = field(default_factory=dict)  # condition -> method -> metric -> per-seed values
    temperatures: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    suites: dict = field(default_factory=dict)  # suite -> comparisons, per-image values (label/seed/metric), sanity flags
    external: dict[str, list[Comparison]] = field(default_factory=dict)  # [compare.NAME] -> rows
    settings: dict = field(default_factory=dict)  # the settings that made it, recorded in the report's settings.json


def _plan(spec: StudySpec) -> list[dict]:
    rows = []
    for m, s in spec.runs():
        path = spec.run_dir(m, s)
        status = run_status(spec, m, s)
        row = dict(method=m, seed=s, run=str(path), status=status)
        if status == "finished":
            summary = read_json(path / "summary.json", "run summary")
            row.update(train_seconds=summary["train_seconds"], epochs=summary["epochs"])
        rows.append(row)
    return rows


def _last_rows(path: Path) -> dict:
    """The last epoch's training loss and validation NLL (the over-confidence criterion)."""
    rows = read_metrics(path)
    last = rows[-1]
    val = next(r for r in reversed(rows) if "val_nll" in r)
    return dict(train_loss=last["train_loss"], val_nll=val["val_nll"], train_accuracy=last["train_accuracy"])


def _predictors(spec: StudySpec, log) -> tuple[dict, dict]:
    """Per method, per seed, per condition: deployed probabilities (N, C), and single-pass ones (K, N, C) if random."""
    from ..runs import data_for

    claim = spec.calibration
    first = spec.run_dir(*spec.runs()[0])
    data = data_for(read_json(first / "config.json", "run config"))
    shifted = shift_set(data.test, claim.shift_images)
    labels = dict(val=data.val.labels, clean=data.test.labels, shift=shifted.labels)
    probs: dict[str, list[dict]] = {}
    for m, s in spec.runs():
        if not (spec.run_dir(m, s) / "summary.json").exists():
            continue  # a progress report covers the finished runs only
        log(f"study {spec.name}: predictions of {m}-seed{s}")
        p = cached_predictions(spec.run_dir(m, s), data, shifted, claim.samples, claim.shift_images, spec.precision)
        probs.setdefault(m, []).append(dict(val=p["val"], clean=p["test"], shift=p["shift"]))
    return probs, labels


def _methods(spec: StudySpec, probs: dict, labels: dict) -> tuple[dict, dict]:
    """Deployed predictors per method name (K-sample average, ensembles, +TS twins, and '(1 pass)' of random ones)."""
    methods: dict[str, list[dict]] = {}
    temps: dict[str, list[float]] = {}
    for m, seeds in probs.items():
        methods[m] = [{c: p[c].mean(0) for c in ("val", *CONDITIONS)} for p in seeds]
        if seeds[0]["clean"].shape[0] > 1:
            methods[f"{m} (1 pass)"] = [{c: p[c] for c in ("val", *CONDITIONS)} for p in seeds]
    for e, ens in spec.ensembles.items():
        members = methods.get(ens.members, [])[: ens.size]
        if len(members) < ens.size:
            continue
        methods[e] = [{c: torch.stack([mem[c] for mem in members]).mean(0) for c in ("val", *CONDITIONS)}]
    if spec.calibration.temperature:
        for name in [m for m in [*spec.methods, *spec.ensembles] if m in methods]:
            scaled, ts = [], []
            for run in methods[name]:
                t = fit_temperature(run["val"][None], labels["val"])
                ts.append(t)
                scaled.append({c: apply_temperature(run[c][None], t)[0] for c in ("val", *CONDITIONS)})
            methods[f"{name} +TS"], temps[name] = scaled, ts
    return methods, temps


def run(settings: Settings, log=print) -> StudyResult:
    """Train (unless settings.train is False), predict, run the suites, and compare; every finished step is reused."""
    if settings.n_boot < 100:
        raise UserError(f"n_boot={settings.n_boot}: use at least 100 resamples")
    spec = load_spec(settings.spec)
    if settings.jobs is not None:
        if settings.jobs < 1:
            raise UserError(f"jobs={settings.jobs}: must be at least 1")
        spec.jobs = settings.jobs
    if spec.calibration is None and not spec.suites and not spec.external:
        raise UserError(f"study spec {settings.spec} has no claim to measure (add a [calibration], [robustness], "
                        "[privacy] or [compare.NAME] table)")
    t0 = time.perf_counter()
    if settings.train:
        train_missing(spec, log=log)
    plan = _plan(spec)
    if not any(r["status"] == "finished" for r in plan if r["method"] == next(iter(spec.methods))):
        raise UserError(f"no finished run of the baseline {next(iter(spec.methods))!r} yet; run the study with training on")
    result = StudyResult(out=spec.out, spec=spec, plan=plan, regime=_regime(spec),
                         settings=record(settings) | dict(spec=str(Path(settings.spec).resolve())))
    result.seconds = dict(train=time.perf_counter() - t0)
    if spec.calibration is not None:
        _calibration(result, settings.n_boot, log)
    for name, claim in spec.suites.items():
        t1 = time.perf_counter()
        measure_missing(spec, claim, log)  # with jobs > 1: the runs without a cached report, side by side
        table = measure(spec, claim, log)
        result.suites[name] = dict(comparisons=comparisons(claim, table, settings.n_boot), values=table,
                                   sanity_flags=sanity_flags(spec, claim) if name == "robustness" else {})
        result.seconds[name] = time.perf_counter() - t1
    for name, ext in spec.external.items():
        t1 = time.perf_counter()
        result.external[name] = measure_external(ext, settings.n_boot, log)
        result.seconds[f"compare/{name}"] = time.perf_counter() - t1
    return result


def verdict_rows(result: StudyResult) -> dict[str, list[Comparison]]:
    """Every comparison of the report under the name a verdict takes it `from`."""
    return ({f"calibration/{c}": rows for c, rows in result.comparisons.items()}
            | {name: s["comparisons"] for name, s in result.suites.items()}
            | {f"compare/{name}": rows for name, rows in result.external.items()})


def _calibration(result: StudyResult, n_boot: int, log) -> None:
    """The calibration claim: predictions (cached per run), +TS twins and ensembles, and their comparisons."""
    spec = result.spec
    t1 = time.perf_counter()
    probs, labels = _predictors(spec, log)
    methods, result.temperatures = _methods(spec, probs, labels)
    t2 = time.perf_counter()
    for cond in CONDITIONS:
        result.values[cond] = {name: {metric: [Scores.from_probs(metric, r[cond], labels[cond]).value() for r in runs]
                                      for metric in spec.calibration.metrics} for name, runs in methods.items()}
        rows = []
        for method, baseline in calibration_pairs(spec, list(methods)):
            if method not in methods or baseline not in methods:
                continue  # not finished yet (progress report)
            for metric in spec.calibration.metrics:
                rows.append(compare([Scores.from_probs(metric, r[cond], labels[cond]) for r in methods[method]],
                                    [Scores.from_probs(metric, r[cond], labels[cond]) for r in methods[baseline]],
                                    metric, method, baseline, n_boot=n_boot))
        result.comparisons[cond] = rows
    result.seconds.update(predict=t2 - t1, compare=time.perf_counter() - t2)


def _regime(spec: StudySpec) -> dict:
    """The baseline's over-confidence: test ECE and the gap between final training loss and validation NLL."""
    base = next(iter(spec.methods))
    rows = []
    for s in spec.seeds_of(base):
        path = spec.run_dir(base, s)
        if not (path / "summary.json").exists():
            continue
        summary = read_json(path / "summary.json", "run summary")
        rows.append(dict(seed=s, test_ece=summary["test"]["single_pass"]["ece"]["mean"],
                         test_accuracy=summary["test_accuracy"], **_last_rows(path)))
    ece = sum(r["test_ece"] for r in rows) / len(rows)
    loss = sum(r["train_loss"] for r in rows) / len(rows)
    nll = sum(r["val_nll"] for r in rows) / len(rows)
    return dict(baseline=base, seeds=rows, test_ece=ece, train_loss=loss, val_nll=nll,
                over_confident=bool(ece >= OVERCONFIDENT_ECE and loss < OVERCONFIDENT_LOSS_RATIO * nll))


# -- report ---------------------------------------------------------------------------------------------

def report(result: StudyResult, out: str | Path | None = None) -> Path:
    """study.json, study.md and the forest plots (one per calibration condition, one per suite) into `out` (default:
    the spec's out/report), written all at once (`runs.atomic_output_dir`). A previous report of the study is replaced:
    it is rebuilt from the runs and their cached predictions and suite reports, so nothing is lost; a folder holding
    anything else is refused."""
    from ..runs import atomic_output_dir, write_json

    out = Path(out) if out else result.out / "report"
    data = dict(name=result.spec.name, plan=result.plan, regime=result.regime, temperatures=result.temperatures,
                values=result.values, seconds=result.seconds,
                comparisons={c: [r.as_dict() for r in rows] for c, rows in result.comparisons.items()},
                suites={name: dict(comparisons=[r.as_dict() for r in s["comparisons"]], sanity_flags=s["sanity_flags"],
                                   seed_values=_seed_means(s["values"]))
                        for name, s in result.suites.items()},
                external={name: [r.as_dict() for r in rows] for name, rows in result.external.items()})
    with atomic_output_dir(out, result.settings, "study.json", overwrite=True) as tmp:
        write_json(tmp / "study.json", data)
        for cond, rows in result.comparisons.items():
            forest_plot(tmp / f"comparisons-{cond}.png", rows, f"{result.spec.name}: {cond} test, method - baseline, 95% CI")
        plots = {name: (name, s["comparisons"]) for name, s in result.suites.items()}
        plots |= {f"compare-{name}": (name, rows) for name, rows in result.external.items()}
        for file, (name, rows) in plots.items():
            if rows:
                forest_plot(tmp / f"{file}.png", rows, f"{result.spec.name}: {name}, method - baseline, 95% CI")
        if result.spec.verdicts:
            (tmp / "verdicts.md").write_text(verdict_table(result.spec.verdicts, verdict_rows(result)))
        (tmp / "study.md").write_text(format_markdown(result))
    return out


def _seed_means(values: dict) -> dict:
    """label -> metric -> seed -> the run's mean over the test images (study.json; the per-image values stay cached)."""
    return {label: {metric: {s: sum(v[metric]) / len(v[metric]) for s, v in seeds.items()}
                    for metric in next(iter(seeds.values()))} for label, seeds in values.items()}


def format_markdown(result: StudyResult) -> str:
    spec, reg = result.spec, result.regime
    train_s = sum(r.get("train_seconds", 0.0) for r in result.plan)
    done = sum(r["status"] == "finished" for r in result.plan)
    lines = [f"# Study `{spec.name}`", "",
             f"{len(spec.methods)} methods x {len(spec.seeds)} seeds ({', '.join(map(str, spec.seeds))}"
             f"{', fewer where a method names its own' if spec.method_seeds else ''}), "
             f"{len(result.plan)} runs, {train_s / 3600:.2f} machine-hours of training so far (sum of the runs' train_seconds).",
             "", *([f"**Progress report: {done} of {len(result.plan)} runs finished.** Methods and seeds still training "
                    "are left out of every table below; rerun the study to continue.", ""] if done < len(result.plan) else []),
             *(["## Verdicts", "", verdict_table(spec.verdicts, verdict_rows(result))] if spec.verdicts else []),
             "## Regime", "",
             f"Baseline `{reg['baseline']}` (mean of {len(reg['seeds'])} seeds): test ECE {reg['test_ece']:.4f} "
             f"(criterion >= {OVERCONFIDENT_ECE}), final training loss "
             f"{reg['train_loss']:.3f} vs validation NLL {reg['val_nll']:.3f} "
             f"(criterion: below {OVERCONFIDENT_LOSS_RATIO} x NLL): "
             f"**{'over-confident' if reg['over_confident'] else 'NOT over-confident'}**.", ""]
    if spec.calibration is not None:
        lines += _calibration_markdown(result)
    for name in result.suites:
        lines += _suite_markdown(result, name)
    for name, rows in result.external.items():
        ext = spec.external[name]
        lines += [f"## {name.capitalize()} (runs trained outside the study)", "",
                  f"{ext.about} Runs under `{ext.folder}`, K={ext.samples}-pass averages; each comparison pairs the "
                  "seeds both sides have finished (t-interval over per-seed differences plus the image-bootstrap "
                  "variance; one seed: paired bootstrap over the images).", "",
                  *([comparison_table(rows, digits=3), f"![{name}](compare-{name}.png)"] if rows
                    else ["No comparison has finished runs on both sides yet."]), ""]
    lines += ["## Runs", "", "| method | seed | status | train s |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['seed']} | {r['status']} | {r.get('train_seconds', math.nan):.0f} |" for r in result.plan]
    return "\n".join(lines) + "\n"


def _calibration_markdown(result: StudyResult) -> list[str]:
    claim = result.spec.calibration
    lines = ["## Calibration", "",
             f"Deployed predictor: the K={claim.samples}-sample average for random models, `(1 pass)` a single pass. "
             f"`+TS`: temperature fitted on validation NLL per run. Shift: {claim.shift_images} test images, each under "
             "one of 8 corruptions x 5 severities (balanced, seeded). Intervals: see `stochvit.eval.stats`.", ""]
    for cond, rows in result.comparisons.items():
        lines += [f"### {cond} test", "", comparison_table(rows), f"![{cond}](comparisons-{cond}.png)", ""]
    lines += ["## Values (mean over seeds)", "", "| method | " + " | ".join(f"{c} {m}" for c in CONDITIONS for m in claim.metrics)
              + " |", "|---" * (1 + len(CONDITIONS) * len(claim.metrics)) + "|"]
    for name in result.values["clean"]:
        cells = [f"{sum(v) / len(v):.4f}" for c in CONDITIONS for v in result.values[c][name].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _suite_markdown(result: StudyResult, name: str) -> list[str]:
    claim, s = result.spec.suites[name], result.suites[name]
    lines = [f"## {name.capitalize()}", "", describe(claim), ""]
    if not s["comparisons"]:
        return [*lines, "No comparison has finished runs on both sides yet.", ""]
    lines += [comparison_table(s["comparisons"]), f"![{name}]({name}.png)", ""]
    if flags := s["sanity_flags"]:
        flagged = {run: n for run, n in flags.items() if n}
        lines += [f"Sanity reports ({len(flags)} runs; each in RUN/study-robustness-{claim.key()}/robustness.md): "
                  + (f"**FLAGs in {', '.join(f'{r} ({n})' for r, n in flagged.items())}: their robust accuracies may be "
                     "over-estimates**." if flagged else "no check FLAGged."), ""]
    return lines


def forest_plot(path: Path, rows: list[Comparison], title: str) -> None:
    """Each difference with its 95% interval, one panel per metric, coloured by verdict (also the transfer and
    federated reports' plot, `stochvit.suites.compare_runs`)."""
    from ..runs import pyplot

    plt = pyplot()
    metrics = list(dict.fromkeys(r.metric for r in rows))
    cols = min(4, len(metrics))  # more panels wrap into rows (a suite has one per epsilon, or per block and attack)
    panel = 0.45 * len(rows) / len(metrics) + 1.2
    height = panel * math.ceil(len(metrics) / cols) + 0.6
    label = 0.075 * max(len(f"{r.method} vs {r.baseline}") for r in rows)  # inches of the row labels (9-point text)
    fig, axes = plt.subplots(math.ceil(len(metrics) / cols), cols, figsize=(3.2 * cols + label, height), sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    colours = {"better": "tab:green", "worse": "tab:red", "no difference detected": "tab:gray"}
    for ax, metric in zip(axes.flat, metrics):
        sel = [r for r in rows if r.metric == metric]
        for i, r in enumerate(sel):
            ax.errorbar(r.difference, i, xerr=[[r.difference - r.low], [r.high - r.difference]], fmt="o",
                        color=colours[r.verdict], capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(sel)), [f"{r.method} vs {r.baseline}" for r in sel])
        better = "higher" if sel[0].higher_is_better else "lower"
        ax.set_title(f"{metric}\n({better} is better)", fontsize=10)
        ax.yaxis.set_inverted(True)  # idempotent: invert_yaxis toggles the axis all shared panels have
        ax.locator_params(axis="x", nbins=5)  # default ticks ran into each other ("-0.075-0.050")
        ax.tick_params(axis="x", labelsize=8)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=v) for v, c in colours.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, min(0.3, 0.3 / height), 1, 1))  # 0.3 inch for the legend, however few the rows
    fig.savefig(path, dpi=90, bbox_inches="tight")  # long method labels are never clipped
    plt.close(fig)
