"""Calibration suite: metrics against torchmetrics/sklearn and closed forms, temperature scaling, corruptions, CLI."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error
from torchmetrics.functional.classification.calibration_error import _ce_compute

from stochvit.cli import main
from stochvit.data import load_data
from stochvit.eval.calibration import (
    METRICS,
    apply_temperature,
    aurc,
    binned_ece,
    calibration_metrics,
    classwise_ece,
    confidence_correct,
    equal_mass_edges,
    fit_temperature,
    misclassification_auroc,
    reliability,
)
from stochvit.eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt, corrupt_set
from stochvit.eval.metrics import classification_metrics
from stochvit.eval.stats import VERDICTS, Comparison
from stochvit.suites.calibration import CI_METRICS, Settings, run
from stochvit.train import TrainConfig, train


def random_probs(n: int = 2000, c: int = 10, scale: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(n, c, generator=g) * scale).softmax(1)
    labels = torch.randint(0, c, (n,), generator=g)
    hit = torch.rand(n, generator=g) < 0.6  # make accuracy well above chance, like a trained model
    labels[hit] = probs[hit].argmax(1)
    return probs, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_mce_adaptive_agree_with_torchmetrics(seed):
    probs, labels = random_probs(seed=seed)
    conf, correct = confidence_correct(probs, labels)
    tm_ece = multiclass_calibration_error(probs, labels, num_classes=10, n_bins=15, norm="l1").item()
    tm_mce = multiclass_calibration_error(probs, labels, num_classes=10, n_bins=15, norm="max").item()
    m = calibration_metrics(probs, labels)
    assert m["ece"] == pytest.approx(tm_ece, abs=1e-6)
    assert m["mce"] == pytest.approx(tm_mce, abs=1e-6)
    # our binning (used by the diagrams and adaptive ECE) reproduces torchmetrics' on equal-width bins ...
    assert binned_ece(conf, correct, 15) == pytest.approx(tm_ece, abs=1e-6)
    r = reliability(conf, correct, 15)
    assert (r["accuracy"] - r["confidence"]).abs()[r["count"] > 0].max().item() == pytest.approx(tm_mce, abs=1e-6)
    # ... and on equal-mass edges, where torchmetrics' binning routine takes explicit boundaries
    edges = equal_mass_edges(conf, 15)
    assert m["adaptive_ece"] == pytest.approx(_ce_compute(conf, correct, edges, norm="l1").item(), abs=1e-6)
    counts = reliability(conf, correct, edges)["count"]
    assert counts.max() - counts.min() <= 1  # equal mass
    assert m["adaptive_ece"] != pytest.approx(m["ece"], abs=1e-4)  # a different estimator, not a renamed one


def test_classwise_ece_auroc_aurc_against_independent_definitions():
    probs, labels = random_probs(n=600, seed=3)
    per_class = [binned_ece(probs[:, c], (labels == c).float(), 15) for c in range(10)]
    assert classwise_ece(probs, labels) == pytest.approx(sum(per_class) / 10, abs=1e-6)
    assert classwise_ece(probs, labels) == pytest.approx(
        torch.stack([binary_calibration_error(probs[:, c].contiguous(), (labels == c).long(), n_bins=15) for c in range(10)])
        .mean().item(), abs=1e-6)
    conf, correct = confidence_correct(probs, labels)
    assert misclassification_auroc(probs, labels) == pytest.approx(roc_auc_score(correct.numpy(), conf.numpy()), abs=1e-6)
    # AURC by its definition, coverage by coverage
    order = conf.argsort(descending=True)
    wrong = 1 - correct[order]
    brute = sum(wrong[: k + 1].mean().item() for k in range(len(wrong))) / len(wrong)
    assert aurc(probs, labels) == pytest.approx(brute, abs=1e-6)
    # perfect ranking (all wrong answers least confident) reaches the optimum; reversing it is worst
    n, err = 100, 20
    c = torch.linspace(0.99, 0.4, n)  # class 0 is always predicted
    p = torch.stack([c, (1 - c) / 2, (1 - c) / 2], 1)
    y = torch.zeros(n, dtype=torch.long)
    y[-err:] = 1
    optimal = sum(max(0, k - (n - err)) / k for k in range(1, n + 1)) / n
    assert aurc(p, y) == pytest.approx(optimal, abs=1e-9)
    assert misclassification_auroc(p, y) == pytest.approx(1.0)
    y_rev = torch.zeros(n, dtype=torch.long)
    y_rev[:err] = 1
    assert aurc(p, y_rev) > aurc(p, y) and misclassification_auroc(p, y_rev) == pytest.approx(0.0)
    assert math.isnan(misclassification_auroc(p, p.argmax(1)))  # nothing wrong: undefined


@pytest.mark.parametrize("c", [2, 10])
def test_nll_brier_closed_forms(c):
    n = 50
    labels = torch.arange(n) % c
    uniform = torch.full((n, c), 1 / c)
    m = calibration_metrics(uniform, labels)
    assert m["nll"] == pytest.approx(math.log(c), rel=1e-6)
    assert m["brier"] == pytest.approx(1 - 1 / c, rel=1e-6)
    q = 0.7  # probability q on the true class, the rest spread evenly
    probs = torch.full((n, c), (1 - q) / (c - 1))
    probs[torch.arange(n), labels] = q
    m = classification_metrics(probs, labels)
    assert m["nll"] == pytest.approx(-math.log(q), rel=1e-6)
    assert m["brier"] == pytest.approx((1 - q) ** 2 * c / (c - 1), rel=1e-5)
    assert m["accuracy"] == 1.0 and m["ece"] == pytest.approx(1 - q, abs=1e-6)
    onehot = torch.nn.functional.one_hot(labels, c).float()
    m = calibration_metrics(onehot, labels)
    assert m["nll"] == pytest.approx(0.0, abs=1e-6) and m["brier"] == 0 and m["ece"] == 0 and m["aurc"] == 0
    assert set(m) == set(METRICS)


def test_temperature_scaling_recovers_known_temperature():
    g = torch.Generator().manual_seed(0)
    n, c, t_true = 6000, 10, 2.5
    logits = torch.randn(n, c, generator=g) * 2
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)  # calibrated at T = 1 on `logits`
    overconfident = (logits * t_true).softmax(1)
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(t_true, rel=0.08)
    before = classification_metrics(overconfident, labels)
    after = classification_metrics(apply_temperature(overconfident, t), labels)
    assert after["nll"] < before["nll"] - 0.05
    assert after["ece"] < before["ece"] / 2
    assert after["accuracy"] == before["accuracy"]  # scaling never changes the argmax
    # K identical passes: the single-pass and the K-average fits agree
    passes = overconfident.expand(3, -1, -1)
    assert fit_temperature(passes, labels, average=False) == pytest.approx(t, rel=1e-3)
    assert fit_temperature(passes, labels, average=True) == pytest.approx(t, rel=1e-3)
    # an under-confident model is sharpened (T < 1)
    assert fit_temperature((logits / 2).softmax(1), labels) == pytest.approx(0.5, rel=0.08)


def _natural_like_images(n: int = 24, size: int = 32) -> torch.Tensor:
    """Colour images with detail at every scale (a 1/f-like sum of upsampled noise), as natural images have."""
    g = torch.Generator().manual_seed(0)
    out = torch.zeros(n, 3, size, size)
    for s in (4, 8, 16, 32):
        noise = torch.rand(n, 3, s, s, generator=g)
        out += torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False) * (size / s) ** 0.5
    out -= out.amin((1, 2, 3), keepdim=True)
    return out / out.amax((1, 2, 3), keepdim=True)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_keep_shape_range_and_grow_with_severity(name):
    """Every built-in kind (all 16): the distance to the clean image grows with severity."""
    digits = load_data("digits").test.tensors()[0][:64]
    for images, strict in ((_natural_like_images(), True), (digits, name != "pixelate")):
        dist = []
        for s in SEVERITIES:
            out = corrupt(images, name, s)
            assert out.shape == images.shape and out.dtype == torch.float32
            assert out.min() >= 0 and out.max() <= 1
            assert torch.equal(out, corrupt(images, name, s))  # seeded: the same corrupted set every time
            dist.append((out - images).abs().mean().item())
        assert dist[0] > 0
        steps = [b - a for a, b in zip(dist, dist[1:])]
        # 8x8 pixelation has only sizes 7, 7, 6, 6, 5: equal steps there, strictly growing elsewhere
        assert all(d > 0 for d in steps) if strict else all(d >= 0 for d in steps) and dist[-1] > dist[0], (name, dist)


def test_corrupt_set_is_uint8_copy():
    test = load_data("digits").test
    noisy = corrupt_set(test, "gaussian_noise", 3)
    assert noisy.images.dtype == torch.uint8 and noisy.images.shape == test.images.shape
    assert torch.equal(noisy.labels, test.labels) and not torch.equal(noisy.images, test.images)


@pytest.mark.slow
def test_calibration_command_end_to_end(digits_runs, tmp_path, capsys):
    det, sto = str(digits_runs["deterministic"]), str(digits_runs["stochastic"])
    out = tmp_path / "report"
    rc = main(["calibration", det, sto, "--ensemble", det, sto, "--samples", "3", "--shift",
               "--corruptions", "gaussian_noise,contrast", "--severities", "1,5", "--out", str(out)])
    assert rc == 0
    for f in ("calibration.json", "calibration.md", "reliability.png", "confidence_hist.png", "shift.png",
              "shift_by_corruption.png", "metrics.png"):
        assert (out / f).stat().st_size > 0, f
    assert not list(tmp_path.glob(".*partial"))
    report = json.loads((out / "calibration.json").read_text())
    assert list(report["methods"]) == ["det", "det +TS", "stoch", "stoch +TS", "ensemble-2", "ensemble-2 +TS"]
    m = report["methods"]
    assert m["det"]["samples"] == 1 and m["stoch"]["samples"] == 3 and m["ensemble-2"]["kind"] == "ensemble"
    for name in ("det", "stoch", "ensemble-2"):
        # temperatures minimise validation NLL, so they can only lower it
        assert m[f"{name} +TS"]["val_nll"] <= m[name]["val_nll"] + 1e-5
        # a temperature never moves a single pass's argmax (the K-average's can move)
        assert m[f"{name} +TS"]["test"]["single_pass"]["accuracy"] == m[name]["test"]["single_pass"]["accuracy"]
        assert set(m[name]["test"]["single_pass"]) == set(METRICS)
        sm = m[name]["shift_mean"]
        assert list(sm) == ["0", "1", "5"]
        assert sm["5"]["mc_average"]["accuracy"] < sm["0"]["mc_average"]["accuracy"]
    assert m["stoch"]["test"]["single_pass"]["nll"]["std"] > 0  # the passes differ (accuracy may not, at 0.99)
    assert m["det"]["test"]["mc_average"]["accuracy"] == pytest.approx(
        json.loads((digits_runs["deterministic"] / "summary.json").read_text())["test"]["mc_average"]["accuracy"])
    table = (out / "calibration.md").read_text()
    assert "| stoch | K=3 average |" in table and "Under shift" in table
    assert report["baseline"] == "det" and list(report["comparisons"]) == ["clean", "shift"]
    assert "## Differences from the baseline `det`" in table and "| ece | ensemble-2 +TS | det |" in table
    printed = capsys.readouterr().out
    assert "stoch +TS (K=3 average)" in printed and "shift ECE" in printed

    assert main(["calibration", det, "--shift", "--corruptions", "frost", "--out", str(tmp_path / "bad")]) == 2
    assert main(["calibration", det, "--ensemble", det, "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_demo_reuses_finished_runs_and_prints_the_table(digits_runs, tmp_path, capsys):
    for name, key in (("deterministic", "deterministic"), ("stochastic", "stochastic")):
        shutil.copytree(digits_runs[key], tmp_path / "demo" / name)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--samples", "2", "--no-shift"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing finished run") == 2
    assert "stochastic (K=2 average)" in printed and "Stochastic (K=2 average) vs deterministic" in printed
    assert (tmp_path / "demo" / "calibration" / "calibration.json").exists()


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two copies of one deterministic run (identical predictions) and a stochastic run: 2 epochs each, seconds."""
    tmp = tmp_path_factory.mktemp("tiny")
    det = train(TrainConfig(epochs=2, eval_samples=2, stochastic=None), out=tmp / "a" / "det", quiet=True)
    shutil.copytree(det, tmp / "b" / "det")
    sto = train(TrainConfig(epochs=2, eval_samples=2), out=tmp / "c" / "stoch", quiet=True)
    return [det, tmp / "b" / "det", sto]


def test_calibration_compares_every_method_with_the_first_with_intervals(tiny_runs, tmp_path):
    out = run(Settings(tiny_runs, samples=2, shift=True, corruptions=("contrast", "gaussian_noise"), severities=(2, 5),
                       shift_limit=120, out=tmp_path / "rep", quiet=True, n_boot=300)).out
    report = json.loads((out / "calibration.json").read_text())
    names = list(report["methods"])
    assert names == ["a/det", "a/det +TS", "b/det", "b/det +TS", "c/stoch", "c/stoch +TS"]
    assert report["baseline"] == "a/det" and report["n_boot"] == 300
    assert list(report["comparisons"]) == ["clean", "shift"]
    for rows in report["comparisons"].values():
        # every method after the first, on each of the four metrics of the K-sample average
        assert [(r["method"], r["metric"]) for r in rows] == [(n, k) for n in names[1:] for k in CI_METRICS]
        for r in rows:
            assert r["baseline"] == "a/det" and r["low"] <= r["difference"] <= r["high"]
            assert r["verdict"] in VERDICTS and r["seeds"] == [1, 1] and "paired percentile bootstrap" in r["interval"]
            assert r["difference"] == pytest.approx(r["method_value"] - r["baseline_value"])
        # a method against itself (a copy of the same deterministic run): no difference, and an interval of width 0
        for r in (r for r in rows if r["method"] == "b/det"):
            assert r["difference"] == 0 and r["low"] == 0 and r["high"] == 0, r
            assert r["verdict"] == "no difference detected"
    clean = {(r["method"], r["metric"]): r for r in report["comparisons"]["clean"]}
    for name in names:
        e = report["methods"][name]
        ci = e["intervals"]
        for k in CI_METRICS:
            row = clean[(name, k)] if name != "a/det" else clean[("b/det", k)]
            compared = row["method_value"] if name != "a/det" else row["baseline_value"]
            assert compared == pytest.approx(e["test"]["mc_average"][k], abs=1e-5)  # the table's values are compared
            # each interval contains its point estimate: clean, shift (mean over cells), each severity's mean
            points = [(ci["test"][k], e["test"]["mc_average"][k]), (ci["shift"][k], e["shift_overall"][k])]
            points += [(ci["shift_mean"][s][k], e["shift_mean"][s]["mc_average"][k]) for s in ("0", "2", "5")]
            for (lo, hi), v in points:
                assert lo < hi or k == "accuracy" and lo == hi, (name, k)
                # ECE is biased upwards on resamples, so a near-0 ECE can fall below its percentile interval
                assert (lo - 1e-9 <= v or k == "ece") and v <= hi + 1e-9, (name, k, lo, v, hi)
        assert e["shift_overall"]["accuracy"] == pytest.approx(
            sum(e["shift_mean"][s]["mc_average"]["accuracy"] for s in ("2", "5")) / 2, abs=1e-6)
        for c in ("contrast", "gaussian_noise"):
            for s in ("2", "5"):
                lo, hi = ci["shift_ece"][c][s]
                assert 0 <= lo < hi and e["shift"][c][s]["mc_average"]["ece"] <= hi + 1e-9
    assert report["methods"]["a/det"]["intervals"] == report["methods"]["b/det"]["intervals"]
    table = (out / "calibration.md").read_text()
    assert "## 95% intervals (K-sample average)" in table and "## Differences from the baseline `a/det`" in table
    assert "| accuracy | b/det | a/det |" in table and "**no difference detected (smallest detectable 0), 1 seed**" in table
    assert table.count("| metric | method | baseline |") == 2
    assert (out / "metrics.png").stat().st_size > 0 and (out / "shift.png").stat().st_size > 0
    assert Comparison.__dataclass_fields__.keys() <= set(report["comparisons"]["clean"][0])
    assert main(["calibration", str(tiny_runs[0]), "--n-boot", "10", "--out", str(tmp_path / "bad")]) == 2
