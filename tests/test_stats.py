"""stochvit.eval.stats: metric values against torchmetrics, interval coverage by simulation, pairing, verdicts."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from stochvit.eval.metrics import classification_metrics
from stochvit.eval.stats import Scores, bootstrap_weights, compare, compare_probs, comparison_table, interval


def _probs(n=400, c=5, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * sharp
    labels = torch.randint(0, c, (n,), generator=g)
    return logits.softmax(1), labels


def test_unit_weights_give_the_plain_metrics():
    probs, labels = _probs()
    want = classification_metrics(probs, labels)
    for metric in ("accuracy", "nll", "brier", "ece"):
        assert Scores.from_probs(metric, probs, labels).value() == pytest.approx(want[metric], abs=1e-5), metric


def test_weighted_ece_equals_ece_of_the_resampled_set():
    probs, labels = _probs(n=300, seed=1)
    w = bootstrap_weights(300, 3, seed=4)
    got = Scores.from_probs("ece", probs, labels)(w)
    for b in range(3):
        idx = torch.repeat_interleave(torch.arange(300), w[b].long())
        assert got[b].item() == pytest.approx(classification_metrics(probs[idx], labels[idx])["ece"], abs=1e-5)


def test_single_pass_scores_average_over_passes():
    probs, labels = _probs(seed=2)
    other, _ = _probs(seed=3)
    passes = torch.stack([probs, other])
    want = (classification_metrics(probs, labels)["nll"] + classification_metrics(other, labels)["nll"]) / 2
    assert Scores.from_probs("nll", passes, labels).value() == pytest.approx(want, abs=1e-5)


def _correlated_runs(rng, n, q_a, q_b, seed_sd=0.0, n_seeds=1, noise=0.5):
    """Per-image 0/1 correctness of two methods sharing image difficulty z; each seed shifts its threshold."""
    z = rng.standard_normal(n)
    runs = []
    for q in (q_a, q_b):
        runs.append([(z + noise * rng.standard_normal(n) < q + seed_sd * rng.standard_normal()).astype(float)
                     for _ in range(n_seeds)])
    return runs


def _true_accuracy(q, seed_sd=0.0, noise=0.5):
    return norm.cdf(q / np.sqrt(1 + noise**2 + seed_sd**2))


def test_paired_bootstrap_covers_the_true_difference():
    rng = np.random.default_rng(0)
    q_a, q_b = 0.5, 0.35
    truth = _true_accuracy(q_a) - _true_accuracy(q_b)
    hits = 0
    reps = 200
    for r in range(reps):
        (a,), (b,) = _correlated_runs(rng, 400, q_a, q_b)
        c = compare([Scores.per_image(a)], [Scores.per_image(b)], "accuracy", n_boot=500, seed=r)
        hits += c.low <= truth <= c.high
    assert 0.91 <= hits / reps <= 0.99  # nominal 0.95; the binomial sd of the estimate is 0.015


def test_seed_interval_covers_the_true_difference_and_errs_wide():
    rng = np.random.default_rng(1)
    q_a, q_b, seed_sd = 0.5, 0.4, 0.08
    truth = _true_accuracy(q_a, seed_sd) - _true_accuracy(q_b, seed_sd)
    hits, reps = 0, 150
    for r in range(reps):
        a, b = _correlated_runs(rng, 300, q_a, q_b, seed_sd=seed_sd, n_seeds=3)
        c = compare([Scores.per_image(x) for x in a], [Scores.per_image(x) for x in b], "accuracy", n_boot=300, seed=r)
        hits += c.low <= truth <= c.high
        assert "t-interval over 3 per-seed" in c.interval
    assert 0.93 <= hits / reps <= 1.0


def test_paired_interval_is_narrower_than_unpaired_on_correlated_data():
    rng = np.random.default_rng(2)
    (a,), (b,) = _correlated_runs(rng, 2000, 0.5, 0.45, noise=0.3)
    paired = compare([Scores.per_image(a)], [Scores.per_image(b)], "accuracy", n_boot=1000)
    unpaired = compare([Scores.per_image(a)], [Scores.per_image(b)], "accuracy", n_boot=1000, paired=False)
    assert paired.half_width < 0.6 * unpaired.half_width
    assert paired.difference == unpaired.difference


def test_verdicts_follow_the_interval_and_the_direction():
    probs, labels = _probs(n=2000, seed=5, sharp=1.0)
    sharp = (probs.log() * 6).softmax(1)  # the same predictions, much more confident: worse NLL and ECE
    rows = {c.metric: c for c in compare_probs([sharp], [probs], labels, n_boot=500)}
    assert rows["nll"].verdict == "worse" and rows["ece"].verdict == "worse"
    assert rows["accuracy"].difference == 0 and rows["accuracy"].verdict == "no difference detected"
    assert "1 seed" in rows["accuracy"].verdict_text()
    better = compare_probs([probs], [sharp], labels, metrics=["nll"], n_boot=500)[0]
    assert better.verdict == "better" and better.high < 0
    table = comparison_table(list(rows.values()))
    assert table.count("\n") == 6 and "**worse" in table


def test_ensemble_against_seeds_uses_the_seed_spread_of_the_many():
    rng = np.random.default_rng(3)
    a, b = _correlated_runs(rng, 300, 0.5, 0.5, seed_sd=0.05, n_seeds=3)
    c = compare([Scores.per_image(a[0])], [Scores.per_image(x) for x in b], "accuracy", n_boot=200)
    assert c.seeds == (1, 3) and "seed spread of the 3" in c.interval and c.low < c.high


def test_bad_inputs_raise_value_errors():
    probs, labels = _probs(n=50)
    with pytest.raises(ValueError):
        Scores.from_probs("mce", probs, labels)
    with pytest.raises(ValueError):
        compare([], [Scores.per_image(np.ones(3))], "accuracy")
    with pytest.raises(ValueError):
        compare([Scores.per_image(np.ones(3))], [Scores.per_image(np.ones(4))], "accuracy")
    with pytest.raises(ValueError):
        compare([Scores.per_image(np.ones(3))], [Scores.per_image(np.ones(3))], "loss")
    with pytest.raises(ValueError):
        Scores.per_image(np.array([1.0, np.nan]))


def test_single_method_interval_covers_a_bernoulli_mean():
    rng = np.random.default_rng(4)
    p, n, reps = 0.3, 300, 300
    hits = 0
    for r in range(reps):
        x = (rng.random(n) < p).astype(float)
        low, high = interval(Scores.per_image(x), n_boot=400, seed=r)
        assert low <= x.mean() <= high
        hits += low <= p <= high
    assert 0.91 <= hits / reps <= 0.99  # nominal 0.95; the binomial sd of the estimate is 0.013
    # its width is the normal approximation's, 2 * 1.96 * sqrt(p (1 - p) / n)
    low, high = interval(Scores.per_image((rng.random(4000) < p).astype(float)), n_boot=2000)
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / 4000), rel=0.1)
    with pytest.raises(ValueError):
        interval(Scores.per_image(np.ones(3)), level=1.0)
