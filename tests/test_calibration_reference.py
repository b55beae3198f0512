"""The hand-written calibration metrics (adaptive ECE, AURC, temperature scaling) against hand-computed cases,
closed forms and independent constructions (scipy's optimiser for the temperature).

torch-uncertainty, which has all three, is not a test dependency: its package import needs Lightning, and its
`[cpu]` extra installs 22 packages (Lightning, Hydra, bitsandbytes, aiohttp, ...). Its adaptive-ECE construction
(sort the confidences, split them into equal counts) is the definition rebuilt below.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp

from stochvit.eval.calibration import adaptive_ece, aurc, calibration_metrics, fit_temperature


def top_class(conf: list[float] | torch.Tensor, correct: list[int] | torch.Tensor, c: int = 3) -> tuple[torch.Tensor, ...]:
    """(N, c) probabilities whose top class 0 has confidence `conf`, and labels right exactly where `correct`."""
    conf = torch.as_tensor(conf, dtype=torch.float64)
    probs = torch.cat([conf[:, None], ((1 - conf) / (c - 1))[:, None].expand(-1, c - 1)], 1)
    labels = torch.where(torch.as_tensor(correct).bool(), 0, 1)
    return probs, labels


# -- adaptive ECE ---------------------------------------------------------------------------------

def test_adaptive_ece_by_hand():
    conf = [0.55, 0.6, 0.65, 0.7, 0.8, 0.85, 0.9, 0.95]
    correct = [1, 0, 0, 0, 1, 1, 1, 1]
    perm = [5, 2, 7, 0, 3, 6, 1, 4]  # the input order must not matter
    probs, labels = top_class([conf[i] for i in perm], [correct[i] for i in perm])
    # 2 bins of 4: |1/4 - 0.625| and |1 - 0.875|, each weighted 1/2
    assert adaptive_ece(probs, labels, n_bins=2) == pytest.approx((0.375 + 0.125) / 2, abs=1e-9)
    # 4 bins of 2: |0.5 - 0.575|, |0 - 0.675|, |1 - 0.825|, |1 - 0.925|, each weighted 1/4
    assert adaptive_ece(probs, labels, n_bins=4) == pytest.approx((0.075 + 0.675 + 0.175 + 0.075) / 4, abs=1e-9)
    # 1 bin: |accuracy - mean confidence|
    assert adaptive_ece(probs, labels, n_bins=1) == pytest.approx(abs(5 / 8 - sum(conf) / 8), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_ece_equals_the_equal_count_split(seed):
    """torch-uncertainty's construction: sorted confidences split into equal counts (N divisible by the bins)."""
    g = torch.Generator().manual_seed(seed)
    n, bins = 1500, 15
    probs = (torch.randn(n, 10, generator=g) * 2.5).softmax(1)
    labels = torch.where(torch.rand(n, generator=g) < 0.7, probs.argmax(1), torch.randint(0, 10, (n,), generator=g))
    conf, pred = probs.max(1)
    order = conf.argsort()
    chunks = zip(conf[order].double().tensor_split(bins), (pred == labels)[order].double().tensor_split(bins))
    expected = sum(abs(a.mean() - c.mean()).item() * len(c) for c, a in chunks) / n
    assert adaptive_ece(probs, labels) == pytest.approx(expected, abs=1e-6)
    assert calibration_metrics(probs, labels)["adaptive_ece"] == pytest.approx(expected, abs=1e-6)


# -- AURC -----------------------------------------------------------------------------------------

def harmonic(k: int) -> float:
    return sum(1 / i for i in range(1, k + 1))


def test_aurc_closed_forms():
    n, e = 200, 30
    conf = torch.linspace(0.99, 0.4, n, dtype=torch.float64)
    # all errors least confident: risk(k) = max(0, k - (n - e)) / k
    best = aurc(*top_class(conf, torch.arange(n) < n - e))
    assert best == pytest.approx(sum(max(0, k - (n - e)) / k for k in range(1, n + 1)) / n, abs=1e-12)
    # all errors most confident: risk(k) = min(k, e) / k, so AURC = e/n (1 + H_n - H_e)
    worst = aurc(*top_class(conf, torch.arange(n) >= e))
    assert worst == pytest.approx(e / n * (1 + harmonic(n) - harmonic(e)), abs=1e-12)
    # constant confidence: every coverage has the error rate, whatever the order of the errors
    for correct in (torch.arange(n) < n - e, torch.arange(n) >= e, torch.randperm(n) >= e):
        assert aurc(*top_class(torch.full((n,), 0.7), correct)) == pytest.approx(e / n, abs=1e-12)


def test_aurc_of_a_perfect_ranking_approaches_geifman_optimum():
    """Geifman et al. (2019): with error rate r and a perfect ranking, AURC -> r + (1 - r) ln(1 - r)."""
    n, r = 20000, 0.25
    conf = torch.linspace(0.99, 0.4, n, dtype=torch.float64)
    value = aurc(*top_class(conf, torch.arange(n) < n * (1 - r)))
    assert value == pytest.approx(r + (1 - r) * math.log(1 - r), abs=1e-3)


def test_aurc_with_ties_is_the_mean_over_orders_of_the_ties():
    conf = [0.9, 0.7, 0.7, 0.7, 0.5, 0.5]
    correct = [1, 0, 1, 1, 0, 1]
    n = len(conf)
    orders = []  # every way to break the ties; each gives the plain cumulative-risk AURC
    for perm in itertools.permutations(range(n)):
        if all(conf[a] >= conf[b] for a, b in zip(perm, perm[1:])):
            errors = np.cumsum([1 - correct[i] for i in perm])
            orders.append(np.mean(errors / np.arange(1, n + 1)))
    assert len(orders) == 3 * 2 * 1 * 2  # 3! orders of the 0.7s times 2! of the 0.5s
    probs, labels = top_class(conf, correct)
    assert aurc(probs, labels) == pytest.approx(np.mean(orders), abs=1e-12)
    flipped = torch.arange(n - 1, -1, -1)
    assert aurc(probs[flipped], labels[flipped]) == pytest.approx(np.mean(orders), abs=1e-12)


# -- temperature scaling --------------------------------------------------------------------------

def sampled(n: int, t_true: float, passes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z), and (passes, n, C) probabilities softmax(t_true * (z + pass noise))."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 10, generator=g, dtype=torch.float64) * 2
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    noise = 0.3 * torch.randn(passes, n, 10, generator=g, dtype=torch.float64) if passes > 1 else torch.zeros(1, n, 10)
    return (t_true * (z + noise)).softmax(-1).float(), labels


def scipy_nll(pass_probs: torch.Tensor, labels: torch.Tensor, average: bool):
    """NLL(log T) in numpy: of the K-sample mean prediction (average) or averaged over single passes."""
    z = np.log(np.maximum(pass_probs.double().numpy(), np.finfo(np.float32).tiny))
    y = labels.numpy()
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        logp = log_softmax(z / math.exp(log_t), axis=-1)[:, rows, y]  # (K, N)
        return -(logsumexp(logp, axis=0) - math.log(len(z))).mean() if average else -logp.mean()

    return nll


@pytest.mark.parametrize("passes,average", [(1, True), (4, False), (4, True)])
def test_fitted_temperature_is_scipys_nll_minimiser(passes, average):
    pass_probs, labels = sampled(3000, 2.0, passes, seed=passes)
    nll = scipy_nll(pass_probs, labels, average)
    best = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20)), method="bounded", options=dict(xatol=1e-9))
    t = fit_temperature(pass_probs, labels, average=average)
    assert t == pytest.approx(math.exp(best.x), rel=1e-3)  # LBFGS in float32 stops within ~2e-4 of the optimum
    assert nll(math.log(t)) <= best.fun + 1e-7


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_temperature_recovers_the_truth_within_its_standard_error(t_true):
    """Well specified (labels from softmax(z), model softmax(t_true z)): the fit is the MLE of T = t_true, whose
    standard error is 1 / sqrt(observed information), the second derivative of the summed NLL at the fit."""
    probs, labels = sampled(20000, t_true, 1, seed=int(10 * t_true))
    t = fit_temperature(probs, labels)
    z = probs[0].double().log()
    temperature = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    total = torch.nn.functional.cross_entropy(z / temperature, labels, reduction="sum")
    (grad,) = torch.autograd.grad(total, temperature, create_graph=True)
    (info,) = torch.autograd.grad(grad, temperature)
    se = 1 / math.sqrt(info.item())
    assert abs(t - t_true) <= 3 * se, (t, t_true, se)
    assert se < 0.03 * t_true  # and the check is tight
