"""Intervals in the reports that compare runs: stochvit.suites.compare_runs and the transfer / federated benchmarks'
report functions, on synthetic predictions (no training) and on one tiny real run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from stochvit.errors import UserError
from stochvit.eval.stats import Scores, compare
from stochvit.suites.compare_runs import RunPredictions, compare_runs, value_interval

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
N, C = 200, 5
LABELS = torch.arange(N) % C


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _probs(correct: float, seed: int) -> torch.Tensor:
    """(N, C) probabilities right (0.9 on the label) on a `correct` share of the images, chosen by `seed`."""
    g = torch.Generator().manual_seed(seed)
    right = torch.rand(N, generator=g) < correct
    target = torch.where(right, LABELS, (LABELS + 1) % C)
    return torch.full((N, C), 0.1 / (C - 1)).scatter(1, target[:, None], 0.9)


def _predictions(table: dict[str, torch.Tensor]):
    return lambda path: (table[str(path)], LABELS)


def test_compare_runs_is_stats_compare_and_refuses_other_test_images():
    table = {"a": _probs(0.9, 1), "b": _probs(0.6, 2)}
    rows = compare_runs(["a"], ["b"], "a", "b", _predictions(table), metrics=("accuracy", "nll"), n_boot=500)
    ref = compare([Scores.from_probs("accuracy", table["a"], LABELS)], [Scores.from_probs("accuracy", table["b"], LABELS)],
                  "accuracy", n_boot=500)
    assert (rows[0].difference, rows[0].low, rows[0].high) == (ref.difference, ref.low, ref.high)
    assert rows[0].verdict == "better" and rows[1].verdict == "better"  # 0.9 vs 0.6 correct: NLL lower too
    assert "paired percentile bootstrap over 200 test images" in rows[0].interval
    with pytest.raises(UserError, match="other test images"):
        compare_runs(["a"], ["b"], "a", "b", lambda p: (table[p], LABELS if p == "a" else LABELS.flip(0)))
    value, low, high = value_interval(["a"], _predictions(table))
    assert value == Scores.from_probs("accuracy", table["a"], LABELS).value() and low < value < high < low + 0.1


def _transfer_rows(seeds_stoch: list[int], seeds_det: list[int]) -> list[dict]:
    rows = []
    for source, stochastic, seeds in (("stoch", "off", seeds_stoch), ("det", "keep", seeds_det)):
        for s in seeds:
            rows.append(dict(kind="transfer", labels=50, mode="finetune", source=source, stochastic=stochastic,
                             target="det", seed=s, run=f"{source}-{stochastic}-{s}"))
    rows.append(dict(kind="scratch", labels=50, mode="scratch", source="none", stochastic="-", target="det", seed=0,
                     run="scratch-0"))
    return rows


def test_transfer_report_compares_the_sources_over_paired_seeds(tmp_path):
    transfer = _benchmark("transfer")
    table = {f"stoch-off-{s}": _probs(0.95, s) for s in range(4)} | {f"det-keep-{s}": _probs(0.55, 10 + s) for s in range(3)}
    table["scratch-0"] = _probs(0.3, 99)
    rows = _transfer_rows([0, 1, 2, 3], [0, 1, 2])
    found, section = transfer.report(rows, "t", "synthetic", _predictions(table), results=tmp_path)
    acc = next(c for c in found if c.metric == "accuracy")
    assert (acc.method, acc.baseline, acc.seeds) == ("50/finetune: stoch-off", "det-keep", (3, 3))  # seed 3 has no pair
    assert "t-interval over 3 per-seed paired differences" in acc.interval
    assert acc.low < 0.4 < acc.high and acc.verdict == "better"  # 0.95 - 0.55 correct
    assert "| accuracy | 50/finetune: stoch-off | det-keep |" in section and "**better" in section
    assert {p.name for p in tmp_path.iterdir()} == {"t-differences.png"}
    # equal predictions on both sides: a zero difference, no verdict either way
    same = {k: _probs(0.7, 5) for k in table}
    found, _ = transfer.report(rows, "u", "synthetic", _predictions(same), results=tmp_path)
    assert all(c.difference == 0 and c.verdict == "no difference detected" for c in found)


def test_federated_report_compares_models_and_partitions_over_paired_seeds(tmp_path):
    federated = _benchmark("federated")
    accuracy = {("iid", "deterministic"): 0.9, ("iid", "stochastic"): 0.9, ("dirichlet:0.1", "deterministic"): 0.4,
                ("dirichlet:0.1", "stochastic"): 0.45}
    seeds = {"deterministic": [0, 1, 2], "stochastic": [0, 1, 2, 3]}  # seed 3 has no deterministic pair
    table, results = {}, []
    for (p, m), correct in accuracy.items():
        for s in seeds[m]:
            run = f"{p.replace(':', '')}-{m}-seed{s}"
            table[run] = _probs(correct, s if p == "iid" else 10 * s + len(m))  # iid: the same predictions for both models
            results.append(dict(partition=p, model=m, seed=s, run=run, label_skew=0.5, wall_seconds=1.0, test_accuracy=0.5,
                                test_ece=0.1, test_nll=1.0, test_accuracy_mc=0.5, test_ece_mc=0.1, samples=1,
                                rounds=[dict(round=1, val_accuracy=0.5, val_ece=0.1, val_nll=1.0, seconds=1.0)]))
    rows, text = federated.report(results, tmp_path, _predictions(table))
    pairs = {(c.method, c.baseline) for c in rows}
    assert pairs == {("iid stochastic", "iid deterministic"), ("dirichlet:0.1 stochastic", "dirichlet:0.1 deterministic"),
                     ("dirichlet:0.1 deterministic", "iid deterministic"), ("dirichlet:0.1 stochastic", "iid stochastic")}
    by = {(c.method, c.metric): c for c in rows}
    same = by[("iid stochastic", "accuracy")]
    assert same.difference == 0 and same.seeds == (3, 3)  # identical predictions, paired on seeds 0-2 only
    skew = by[("dirichlet:0.1 deterministic", "accuracy")]
    assert skew.verdict == "worse" and "t-interval over 3 per-seed paired differences" in skew.interval  # 0.4 vs 0.9
    assert by[("dirichlet:0.1 stochastic", "accuracy")].seeds == (4, 4)  # both stochastic sides have seed 3
    assert "| seed |" in text and "## Comparisons: differences with 95% intervals" in text
    assert (tmp_path / "differences.png").exists()
    json.dumps([c.as_dict() for c in rows])  # what results.json stores


def test_run_predictions_of_a_deterministic_run_match_its_summary(tmp_path):
    from stochvit.train import TrainConfig, train

    run = train(TrainConfig(epochs=1, train_limit=200, eval_samples=2, stochastic=None), out=tmp_path / "det", quiet=True)
    probs, labels = RunPredictions(samples=2)(run)
    summary = json.loads((run / "summary.json").read_text())
    assert probs.shape == (len(labels), 10)
    assert (probs.argmax(1) == labels).double().mean().item() == pytest.approx(summary["test"]["mc_average"]["accuracy"])
    # cached beside the run: a new reader gets the very same tensors without the weights
    assert RunPredictions(samples=2).cache_file(run).exists() and not RunPredictions(samples=3).cache_file(run).exists()
    (run / "model.safetensors").unlink()
    again, labels_again = RunPredictions(samples=2)(run)
    assert torch.equal(again, probs) and torch.equal(labels_again, labels)


def test_runs_with_other_label_counts_share_one_decoded_test_split(tmp_path, monkeypatch):
    """The test split depends on the data and split settings, not on how many training images a run kept: two runs
    with other train limits decode it once; another precision gets its own cache file."""
    import stochvit.runs
    from stochvit.train import TrainConfig, train

    runs = [train(TrainConfig(epochs=1, train_limit=n, eval_samples=1, stochastic=None), out=tmp_path / f"n{n}", quiet=True)
            for n in (150, 300)]
    keys = [RunPredictions.test_split_key(json.loads((r / "config.json").read_text())["data"]) for r in runs]
    assert keys[0] == keys[1]
    calls = []
    real = stochvit.runs.data_for
    monkeypatch.setattr(stochvit.runs, "data_for", lambda *a, **k: calls.append(a) or real(*a, **k))
    predictions = RunPredictions(samples=1)
    labels = [predictions(r)[1] for r in runs]
    assert len(calls) == 1 and torch.equal(labels[0], labels[1])
    assert RunPredictions(samples=1, precision="fp32").cache_file(runs[0]).name == "test-probs-K1-seed0-fp32.safetensors"
    other = json.loads((runs[0] / "config.json").read_text())["data"] | {"split": {"seed": 1}}
    assert RunPredictions.test_split_key(other) != keys[0]
