"""Digits class-split transfer benchmark (issue 7, the CPU-sized stand-in for the CIFAR-10 5+5 protocol).

Pretrain a deterministic and a stochastic ViT on digits classes 0-4, then transfer each to classes 5-9 with
10% and 100% of their training labels: every meaningful stochastic mode (keep/off/add) x (finetune/linear-probe),
plus from-scratch training on the same labels (deterministic and stochastic) as the floor.

    nice -n 10 python benchmarks/transfer.py            # runs what is missing, then writes the tables
    # the CIFAR-10 protocol (shared JPEG set; hours on a CPU):
    nice -n 10 python benchmarks/transfer.py --parent imagefolder:/work/shared/data/cifar10-jpeg --name cifar10 \
        --model vit_tiny_patch4_32 --lr 1e-3 --batch-size 128 --pretrain-epochs 10 --epochs 10
    # the CPU-short CIFAR-10 budget actually run (see benchmarks/results/transfer-cifar10.md), one core per source kind:
    for k in det stoch; do OMP_NUM_THREADS=1 python benchmarks/transfer.py --parent imagefolder:../shared/data/cifar10-jpeg \
        --name cifar10 --model vit_tiny_patch4_32 --lr 1e-3 --batch-size 128 --pretrain-limit 4000 --pretrain-epochs 4 \
        --fractions 0.1 --epochs 1 --eval-samples 2 --sources $k & done; wait

Runs go to benchmarks/runs/transfer-NAME/ (finished ones are reused, interrupted ones resumed). Tables go to
benchmarks/results/transfer[-NAME].json/.md/.png (text after the "<!-- reading -->" marker is kept); NAME=digits
writes transfer.md. `--plot-only` redraws the .png from the .json alone. The report also compares the stochastic
source with the deterministic one at the same trained model (paired 95% intervals over the shared test images, and
over seeds where several: stochvit.suites.compare_runs), in the JSON, the .md and transfer[-NAME]-differences.png.
Deterministic source: keep == off (there is nothing to turn off), so only `keep` is run and reported for both;
stochastic source: `add` is refused (already stochastic), so keep and off are run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from stochvit.card import device_description
from stochvit.data import load_data
from stochvit.eval.stats import Comparison
from stochvit.eval.transfer import transfer
from stochvit.runs import read_json, write_json
from stochvit.suites.compare_runs import Predictions, RunPredictions, compare_runs, comparisons_markdown, plot_comparisons
from stochvit.train import TrainConfig, train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MARKER = "<!-- reading -->"

# (source, --stochastic, --mode)
COMBOS = [(src, stoch, mode) for src, stochs in (("det", ("keep", "add")), ("stoch", ("keep", "off")))
          for stoch in stochs for mode in ("finetune", "linear-probe")]
# the report's comparisons: the stochastic source (method) against the deterministic one (baseline) with the same
# trained model, deterministic (stochastic source with its layers off) or stochastic (deterministic source plus layers)
SOURCE_PAIRS = (("off", "keep"), ("keep", "add"))  # (--stochastic of the stochastic source, of the deterministic one)


def _finish(path: Path, start, *args, **kwargs) -> float:
    """Run `start(*args, **kwargs)` unless `path` already finished; resume it if interrupted. Returns seconds spent."""
    t0 = time.perf_counter()
    if (path / "summary.json").exists():
        return 0.0
    if (path / "config.json").exists():
        train(resume=path, quiet=True)
    else:
        start(*args, **kwargs)
    print(f"{path.parent.name}/{path.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return time.perf_counter() - t0


def _source_kind(pretrain_dir: Path) -> str:
    """"det" or "stoch" from a pretraining folder's name (pretrain-KIND or pretrain-KIND-seedS)."""
    return pretrain_dir.name.removeprefix("pretrain-").split("-seed")[0]


def _pretrain_dir(root: Path, kind: str, seed: int) -> Path:
    return root / (f"pretrain-{kind}" + (f"-seed{seed}" if seed else ""))


def _row(path: Path) -> dict:
    """One finished run as a table row; what it is comes from its own config.json."""
    config, s = read_json(path / "config.json", "config"), read_json(path / "summary.json", "summary")
    t, info = s["test"], config.get("transfer")
    if path.name.startswith("pretrain-"):
        kind, source, stoch, mode = "pretrain", _source_kind(path), "-", "-"
    elif info:
        kind, source = "transfer", _source_kind(Path(info["source"]["path"]))
        stoch, mode = info["stochastic"]["mode"], info["mode"]
    else:
        kind, source, stoch, mode = "scratch", "none", "-", "scratch"
    return dict(kind=kind, source=source, stochastic=stoch, mode=mode, target="stoch" if config["stochastic"] else "det",
                labels=config["data"]["sizes"]["train"], seed=config["train"]["seed"],
                accuracy=t["single_pass"]["accuracy"]["mean"], accuracy_std=t["single_pass"]["accuracy"]["std"],
                accuracy_k=t["mc_average"]["accuracy"], ece=t["single_pass"]["ece"]["mean"], ece_k=t["mc_average"]["ece"],
                nll_k=t["mc_average"]["nll"], samples=t["samples"], epochs=s["epochs"], seconds=s["train_seconds"], run=str(path))


def collect(root: Path) -> list[dict]:
    """Every finished run under `root`, whichever invocation made it."""
    order = {"pretrain": 0, "scratch": 1, "transfer": 2}
    rows = [_row(p) for p in [*root.glob("pretrain-*"), *root.glob("labels*/*")] if (p / "summary.json").exists()]
    return sorted(rows, key=lambda r: (order[r["kind"]] > 0, r["labels"], order[r["kind"]], r["source"], r["stochastic"],
                                       r["mode"], r["seed"]))


def run_all(a: argparse.Namespace, root: Path) -> None:
    pretrain, task = f"{a.parent}:classes=0-4", f"{a.parent}:classes=5-9"
    recipe = dict(model=a.model, lr=a.lr, batch_size=a.batch_size, eval_samples=a.eval_samples)
    kinds = {name: stochastic for name, stochastic in (("det", None), ("stoch", True)) if name in a.sources}
    n_train = len(load_data(task).train)
    for seed in a.seeds:  # one pretraining per source kind and seed; the seed's transfers start from it
        for name, stochastic in kinds.items():
            path = _pretrain_dir(root, name, seed)
            _finish(path, train, TrainConfig(data=pretrain, stochastic=stochastic, epochs=a.pretrain_epochs, seed=seed,
                                             train_limit=a.pretrain_limit, **recipe), out=path, quiet=True)
    for fraction in a.fractions:  # every seed of the first label count before the next (a cut run keeps whole columns)
        for seed in a.seeds:
            sources = {name: _pretrain_dir(root, name, seed) for name in kinds}
            limit = None if fraction >= 1 else round(fraction * n_train)
            folder = root / (f"labels{limit or n_train}" + (f"-seed{seed}" if seed else ""))
            epochs = a.epochs if fraction >= 1 else round(a.epochs / fraction / 2)  # similar step counts (see docstring)
            for name, stochastic in kinds.items():
                cfg = TrainConfig(data=task, train_limit=limit, stochastic=stochastic, epochs=epochs, seed=seed, **recipe)
                _finish(folder / f"scratch-{name}", train, cfg, out=folder / f"scratch-{name}", quiet=True)
            for src, stoch, mode in [c for c in COMBOS if c[0] in kinds]:
                path = folder / f"{src}-{stoch}-{mode}"
                _finish(path, transfer, str(sources[src]), path, quiet=True, data=task, mode=mode, stochastic=stoch,
                        train_limit=limit, epochs=epochs, batch_size=a.batch_size, seed=seed, eval_samples=a.eval_samples)


def _table(rows: list[dict]) -> str:
    """Mean over seeds (min-max of the K-sample accuracy when there are several)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["labels"], r["kind"], r["source"], r["stochastic"], r["target"], r["mode"]), []).append(r)
    lines = ["| labels | pretraining | --stochastic | trained model | mode | seeds | test acc (1 pass) | acc (K avg) [min-max] "
             "| ECE (1 pass) | ECE (K avg) | NLL (K avg) | train s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (labels, kind, source, stoch, target, mode), rs in groups.items():
        def mean(key: str, rs: list[dict] = rs) -> float:
            return sum(r[key] for r in rs) / len(rs)
        spread = f" [{min(r['accuracy_k'] for r in rs):.3f}-{max(r['accuracy_k'] for r in rs):.3f}]" if len(rs) > 1 else ""
        lines.append(f"| {labels} | {'(pretraining run)' if kind == 'pretrain' else source} | {stoch} | {target} | {mode} "
                     f"| {len(rs)} | {mean('accuracy'):.3f} | {mean('accuracy_k'):.3f}{spread} | {mean('ece'):.3f} "
                     f"| {mean('ece_k'):.3f} | {mean('nll_k'):.3f} | {mean('seconds'):.0f} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, name: str, n_test: int | None = None) -> None:
    """Accuracy bars with their value and, given the test-set size, a 95% Wilson interval over the test images (scipy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import binomtest

    fractions = sorted({r["labels"] for r in rows if r["kind"] != "pretrain"})
    fig, axes = plt.subplots(1, len(fractions), figsize=(6 * len(fractions), 4.3), squeeze=False)
    for ax, labels in zip(axes[0], fractions):
        bars: dict[str, list[dict]] = {}  # mean over seeds
        for r in rows:
            if r["labels"] == labels and r["kind"] != "pretrain":
                key = f"{r['source']}/{r['stochastic']}/{r['mode']}" if r["kind"] == "transfer" else f"scratch {r['target']}"
                bars.setdefault(key, []).append(r)
        acc = [sum(r["accuracy_k"] for r in rs) / len(rs) for rs in bars.values()]
        err = None
        if n_test:
            cis = [binomtest(round(a * n_test), n_test).proportion_ci(method="wilson") for a in acc]
            err = [[a - c.low for a, c in zip(acc, cis)], [c.high - a for a, c in zip(acc, cis)]]
        ax.barh(list(bars), acc, xerr=err, capsize=2, error_kw=dict(elinewidth=0.8),
                color=["gray" if rs[0]["kind"] == "scratch" else "tab:blue" if rs[0]["source"] == "det" else "tab:orange"
                       for rs in bars.values()])
        for y, a in enumerate(acc):  # the value: differences of a point or two are invisible in the bars
            ax.text((err[1][y] + a if err else a) + 0.01, y, f"{a:.3f}", va="center", fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_title(f"{name} classes 5-9, {labels} training labels")
        ax.set_xlabel("test accuracy (K-sample average)")
    note = (f"bars: 95% Wilson intervals over the {n_test} test images" if n_test else "no intervals (test-set size not saved)")
    fig.suptitle(f"{note}; blue: deterministic source, orange: stochastic source, grey: from scratch", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def comparisons(rows: list[dict], predictions: Predictions) -> list[Comparison]:
    """Stochastic minus deterministic source (`SOURCE_PAIRS`) at each label count and mode, on the seeds both have."""
    runs: dict[tuple, dict[int, str]] = {}
    for r in rows:
        if r["kind"] == "transfer":
            runs.setdefault((r["labels"], r["mode"], r["source"], r["stochastic"]), {})[r["seed"]] = r["run"]
    out = []
    for labels, mode in dict.fromkeys(key[:2] for key in runs):
        for stoch, det in SOURCE_PAIRS:
            m, b = runs.get((labels, mode, "stoch", stoch), {}), runs.get((labels, mode, "det", det), {})
            if seeds := sorted(set(m) & set(b)):
                out += compare_runs([m[s] for s in seeds], [b[s] for s in seeds], f"{labels}/{mode}: stoch-{stoch}",
                                    f"det-{det}", predictions)
    return out


def report(rows: list[dict], stem: str, name: str, predictions: Predictions,
           results: Path = RESULTS) -> tuple[list[Comparison], str]:
    """The comparisons, their forest plot ({stem}-differences.png) and their Markdown section."""
    found = comparisons(rows, predictions)
    if not found:
        return found, ""
    results.mkdir(parents=True, exist_ok=True)
    plot_comparisons(results / f"{stem}-differences.png", found,
                     f"{name}: stochastic minus deterministic source, same trained model, 95% CI")
    section = comparisons_markdown(found, "Stochastic vs deterministic source")
    return found, section + f"\n![differences]({stem}-differences.png)\n\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parent", default="digits", help="dataset spec split by class: 0-4 pretraining, 5-9 transfer")
    p.add_argument("--name", default="digits", help="names the run folder and the results files")
    p.add_argument("--model", default="vit_digits_patch2_8", help="the committed tables' model (the digits recipe's is "
                   "vit_digits_convstem_8)")
    p.add_argument("--lr", type=float, default=3e-3, help="pretraining and from-scratch lr (transfer: stochvit transfer's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pretrain-epochs", type=int, default=60, help="digits recipe (60 epochs, lr 3e-3)")
    p.add_argument("--epochs", type=int, default=20, help="transfer epochs at 100%% labels; at fraction f: epochs/f/2")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--eval-samples", type=int, default=10, help="K passes of the final evaluation of every run")
    p.add_argument("--pretrain-limit", type=int, default=None, help="pretraining images (default: all of classes 0-4)")
    p.add_argument("--sources", nargs="+", choices=("det", "stoch"), default=["det", "stoch"],
                   help="pretraining kinds this invocation runs (with their from-scratch floor and transfers); two "
                        "invocations with one kind each can run side by side, one core each")
    p.add_argument("--report-only", action="store_true", help="only write the tables from the runs finished so far")
    p.add_argument("--plot-only", action="store_true", help="only redraw the plot from the saved results JSON (no runs needed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the whole chain: seed S pretrains each "
                   "source kind with S (pretrain-KIND-seedS; seed 0: pretrain-KIND) and transfers from it with S")
    a = p.parse_args()
    torch.set_num_threads(1)  # the machine is shared: one thread avoids OpenMP thrashing
    t0 = time.perf_counter()
    root = HERE / "runs" / f"transfer-{a.name}"
    stem = "transfer" if a.name == "digits" else f"transfer-{a.name}"
    if a.plot_only:
        saved = read_json(RESULTS / f"{stem}.json", "the results to redraw (run without --plot-only first)")
        _plot(saved["rows"], RESULTS / f"{stem}.png", a.name, saved.get("n_test"))
        return
    if not a.report_only:
        run_all(a, root)
    rows = collect(root)
    if not rows:
        raise SystemExit(f"no finished runs under {root}: nothing to report (run without --report-only first)")
    wall = time.perf_counter() - t0
    RESULTS.mkdir(exist_ok=True)
    n_test = read_json(Path(rows[-1]["run"]) / "config.json", "config")["data"]["sizes"]["test"]
    found, section = report(rows, stem, a.name, RunPredictions(a.eval_samples))
    write_json(RESULTS / f"{stem}.json", dict(settings=vars(a), wall_seconds=wall, n_test=n_test, rows=rows,
                                              comparisons=[c.as_dict() for c in found]))
    _plot(rows, RESULTS / f"{stem}.png", a.name, n_test)
    md = RESULTS / f"{stem}.md"
    kept = md.read_text().split(MARKER, 1)[1] if md.exists() and MARKER in md.read_text() else "\n\n(reading to be written)\n"
    total = sum(r["seconds"] for r in rows)
    header = (
        f"# Transfer benchmark: {a.name} classes 0-4 -> 5-9\n\n"
        f"Command: `nice -n 10 python benchmarks/transfer.py {' '.join(sys.argv[1:])}`\n\n"
        f"Machine: {device_description(torch.device('cpu'))}, shared with other jobs. Wall time of this invocation {wall:.0f} s "
        f"(runs reused from earlier invocations cost 0); summed training time of all runs {total:.0f} s.\n\n"
        f"Test set: the {n_test} test images of classes 5-9 (the parent split's), so one image is {100 / n_test:.2f} points "
        "of accuracy. "
        f"ECE: 15 bins. K = {a.eval_samples} passes for stochastic models. Seed S pretrains each source kind and transfers "
        "from it with S; rows average the seeds listed.\n\n"
    )
    if a.report_only and md.exists():  # the header names the commands that trained the runs: keep it
        old = md.read_text().split(MARKER, 1)[0]
        header = old[: old.index("\n|") + 1] if "\n|" in old else header
    md.write_text(header + _table(rows) + f"\n\n![accuracy]({stem}.png)\n\n" + section + MARKER + kept)
    print(json.dumps(dict(wall_seconds=round(wall)), indent=None))
    print(_table(rows))


if __name__ == "__main__":
    main()
