"""Paired comparisons of finished runs on their shared test images, for the reports that compare runs (the transfer and
federated benchmarks): `stochvit.eval.stats` intervals and verdicts, a Markdown table and a forest plot.

A run's evidence is its K-pass-average probabilities on its own test split (a deterministic run repeats one pass),
computed once with a fixed seed and kept in the run directory (`test-probs-K{K}-seed{S}.safetensors`, float32, ~100 KB
for 2,500 images), so a report is rebuilt from committed run directories without their weights. Both sides of a
comparison must be scored on the same test images.
One run per side: a paired bootstrap over test images; several seeds: the t-interval over per-seed differences
plus the image-bootstrap variance (see `stochvit.eval.stats`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import UserError
from ..eval.stats import Comparison, Scores, compare, comparison_table, interval

METRICS = ("accuracy", "nll", "ece")  # of the K-sample average
Predictions = Callable[[str | Path], tuple[torch.Tensor, torch.Tensor]]  # run dir -> (probs (N, C), labels (N,))


class RunPredictions:
    """run directory -> (K-average probabilities (N, C), labels (N,)) on the run's test split, computed once and
    cached in the run directory (read back without loading the model)."""

    def __init__(self, samples: int = 10, seed: int = 0, precision: str = "auto") -> None:
        self.samples, self.seed, self.precision = samples, seed, precision
        self._cache: dict[Path, tuple[torch.Tensor, torch.Tensor]] = {}
        self._test_sets: dict[str, object] = {}  # data settings -> test split: runs of one dataset decode it once

    def cache_file(self, path: str | Path) -> Path:
        """RUN/test-probs-K{K}-seed{S}.safetensors (the default precision, "auto"), else ...-{precision}.safetensors."""
        tail = "" if self.precision == "auto" else f"-{self.precision}"
        return Path(path) / f"test-probs-K{self.samples}-seed{self.seed}{tail}.safetensors"

    @staticmethod
    def test_split_key(data: dict) -> str:
        """What fixes a run's test images: its data config less what only the training subset changes (train_limit,
        the training sizes and channel statistics), so that runs with other label counts share one decoded test set."""
        split = {k: v for k, v in data.get("split", {}).items() if k != "train_limit"}
        rest = {k: v for k, v in data.items() if k not in ("sizes", "mean", "std", "split")}
        return json.dumps(rest | {"split": split, "test": data.get("sizes", {}).get("test")}, sort_keys=True, default=str)

    def __call__(self, path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file, save

        from ..predict import dataset_probs
        from ..runs import atomic_write_bytes, data_for, load_run

        path = Path(path).resolve()
        if path not in self._cache:
            file = self.cache_file(path)
            if file.exists():
                saved = load_file(str(file))
                self._cache[path] = saved["probs"], saved["labels"]
                return self._cache[path]
            run = load_run(path)
            key = self.test_split_key(run.config["data"])
            if key not in self._test_sets:
                self._test_sets[key] = data_for(run.config).test
            torch.manual_seed(self.seed)  # the same passes whenever the report is rebuilt
            probs, labels = dataset_probs(run.model, self._test_sets[key], self.samples, precision=self.precision)
            mean = probs.float().mean(0).contiguous()
            atomic_write_bytes(file, save({"probs": mean, "labels": labels.contiguous()}))
            self._cache[path] = mean, labels
        return self._cache[path]


def compare_runs(method: Sequence[str | Path], baseline: Sequence[str | Path], method_name: str, baseline_name: str,
                 predictions: Predictions, metrics: Sequence[str] = METRICS, n_boot: int = 1000) -> list[Comparison]:
    """method - baseline for each metric; `method` and `baseline` list one run per seed, in the same seed order when
    both have several (their per-seed differences are paired)."""
    sides = [[predictions(p) for p in runs] for runs in (method, baseline)]
    labels = sides[0][0][1] if sides[0] else None
    for (_, y), path in zip([*sides[0], *sides[1]], [*method, *baseline]):
        if not torch.equal(y, labels):
            raise UserError(f"run {path} was scored on other test images than {method[0]}: a paired comparison needs "
                            "the same test split")
    return [compare([Scores.from_probs(k, p, y) for p, y in sides[0]], [Scores.from_probs(k, p, y) for p, y in sides[1]],
                    k, method_name, baseline_name, n_boot=n_boot) for k in metrics]


def value_interval(runs: Sequence[str | Path], predictions: Predictions, metric: str = "accuracy",
                   n_boot: int = 1000) -> tuple[float, float, float]:
    """The seed-averaged metric and its 95% interval over test images (test-image sampling only): a bar and its
    error bar, both from the same predictions."""
    parts = [Scores.from_probs(metric, *predictions(p)) for p in runs]
    mean = Scores(lambda w: torch.stack([s(w) for s in parts]).mean(0), parts[0].n)
    low, high = interval(mean, n_boot=n_boot)
    value = mean.value()
    return value, min(low, value), max(high, value)


def comparisons_markdown(rows: Sequence[Comparison], what: str) -> str:
    """A titled table of the comparisons, saying what the intervals cover."""
    how = sorted({c.interval for c in rows})
    return (f"## {what}: differences with 95% intervals\n\nInterval: {'; '.join(how)}. A verdict is **better** or "
            "**worse** only when the interval excludes 0; otherwise the half-width is the smallest difference this "
            "experiment could have detected.\n\n" + comparison_table(rows, digits=3))


def plot_comparisons(path: Path, rows: Sequence[Comparison], title: str) -> None:
    """The forest plot of the study report: each difference with its interval, one panel per metric."""
    from .study import forest_plot

    forest_plot(path, list(rows), title)
