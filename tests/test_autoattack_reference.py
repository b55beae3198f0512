"""stochvit's APGD-CE, APGD-DLR and AutoAttack-rand composite against AutoAttack's reference code (`pyautoattack`).

Both sides attack the same small network (an MLP trained for a second on the 8x8 digits, inputs in [0, 1], logits
out) on the same 200 held-out images, each from its own random start. Robust accuracy is scored per image as the
fraction of 50 fresh passes that classify the returned image correctly (the same draws for both sides), and the
difference stochvit - reference gets a paired 95% bootstrap interval over the images (`stochvit.eval.stats.compare`).

- Deterministic model: the same robust accuracy. The interval must contain 0 and the difference stay within
  TOLERANCE (2.5 points, 5 of 200 images): both attacks start from a random point of the ball, so an example at
  the edge of the attack's reach falls on some starts and not on others; between two seeds of the reference
  alone the robust accuracy moves by up to 2 points here (l2 DLR).
- Stochastic model (token-consistent U(0, 2) scale in the hidden layer, EOT 20): stochvit must not be weaker: its
  interval may not lie above 0. It may be stronger, by design: for an example the attack never fooled, the
  reference returns the clean image (and decides "fooled" from the last of its EOT passes), while stochvit returns
  the iterate the EOT passes get wrong most often. A 10-step PGD is detected as weaker by the same interval, so
  the check has the power to fail.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from stochvit.eval import attacks as A
from stochvit.eval.stats import Comparison, Scores, compare
from stochvit.layers import StochasticLinear

pytest.importorskip("pyautoattack", reason="pyautoattack (AutoAttack's reference code, in the dev extra) is not installed")
from pyautoattack import AutoAttack  # noqa: E402
from pyautoattack.autopgd_base import APGDAttack  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:there are .* points with zero gradient")  # the reference's DLR check

N, PASSES, EOT, STEPS = 200, 50, 20, 100
TOLERANCE = 0.025
EPS = {"linf": 0.08, "l2": 0.4}  # budgets where robust accuracy is far from 0 and 1
REF_NORM = {"linf": "Linf", "l2": "L2"}


def _digits() -> tuple[torch.Tensor, ...]:
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    y = torch.tensor(d.target)[order]
    x = x[order]
    return x[:1400], y[:1400], x[-N:], y[-N:]


def _trained(stochastic: bool) -> nn.Module:
    xtr, ytr, _, _ = _digits()
    torch.manual_seed(0)
    noise = [StochasticLinear(64, low=0.0, high=2.0)] if stochastic else []
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), *noise, nn.GELU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):  # full batch, about a second
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    return _digits()[2:]


@pytest.fixture(scope="module")
def deterministic() -> nn.Module:
    return _trained(False)


@pytest.fixture(scope="module")
def stochastic() -> nn.Module:
    return _trained(True)


def robust(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image, the fraction of PASSES fresh passes that get it right (the same draws for every caller)."""
    torch.manual_seed(123)
    return A.correct_fraction(model, x_adv, y, PASSES)


def versus(model: nn.Module, ours: torch.Tensor, reference: torch.Tensor, y: torch.Tensor) -> Comparison:
    return compare([Scores.per_image(robust(model, ours, y))], [Scores.per_image(robust(model, reference, y))],
                   "robust_accuracy", "stochvit", "pyautoattack")


def reference_apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, loss: str, eot: int) -> torch.Tensor:
    attack = APGDAttack(model, n_iter=STEPS, norm=REF_NORM[norm], eps=EPS[norm], loss=loss, eot_iter=eot, seed=0,
                        device="cpu")
    return attack.perturb(x, y)


def reference_rand(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eot: int = EOT) -> torch.Tensor:
    aa = AutoAttack(model, norm="Linf", eps=EPS["linf"], version="rand", seed=0, device="cpu")
    aa.verbose = False
    aa.apgd.eot_iter = eot
    return aa.run_standard_evaluation(x, y, batch_size=len(x))[0]


def test_composite_has_the_reference_rand_settings():
    aa = AutoAttack(nn.Linear(2, 3), norm="Linf", eps=0.1, version="rand")
    ours = inspect.signature(A.autoattack_rand).parameters
    apgd = inspect.signature(A.apgd).parameters
    assert aa.attacks_to_run == ["apgd-ce", "apgd-dlr"]
    assert (aa.apgd.n_iter, aa.apgd.eot_iter, aa.apgd.n_restarts) == (ours["steps"].default, ours["eot"].default, 1)
    assert apgd["restarts"].default == aa.apgd.n_restarts and apgd["rho"].default == aa.apgd.thr_decr


@pytest.mark.parametrize("norm,loss", [("linf", "ce"), ("linf", "dlr"), ("l2", "ce"), ("l2", "dlr")])
def test_apgd_matches_reference_on_deterministic_model(deterministic, images, norm, loss):
    x, y = images
    ref = reference_apgd(deterministic, x, y, norm, loss, eot=1)
    torch.manual_seed(1)
    ours = A.apgd(deterministic, x, y, EPS[norm], norm, STEPS, loss)
    c = versus(deterministic, ours, ref, y)
    assert 0.1 < c.baseline_value < 0.9, c  # a budget where the attack matters but does not win everywhere
    assert c.low <= 0 <= c.high and abs(c.difference) <= TOLERANCE, c


def test_composite_matches_reference_on_deterministic_model(deterministic, images):
    x, y = images
    ref = reference_rand(deterministic, x, y, eot=1)  # EOT is moot on a deterministic model: 20 equal gradients
    torch.manual_seed(1)
    ours = A.autoattack_rand(deterministic, x, y, EPS["linf"], "linf", STEPS, EOT)
    c = versus(deterministic, ours, ref, y)
    assert c.low <= 0 <= c.high and abs(c.difference) <= TOLERANCE, c


def test_not_weaker_than_reference_on_stochastic_model(stochastic, images):
    x, y = images
    clean = robust(stochastic, x, y)
    assert 0 < (clean == 1).float().mean() < clean.mean() < 1  # really random: passes disagree on some images
    outs, refs = {}, {}
    for loss in ("ce", "dlr"):
        refs[loss] = reference_apgd(stochastic, x, y, "linf", loss, eot=EOT)
        torch.manual_seed(1)
        outs[loss] = A.apgd(stochastic, x, y, EPS["linf"], "linf", STEPS, loss, EOT)
        c = versus(stochastic, outs[loss], refs[loss], y)
        assert c.low <= 0, c
        assert c.baseline_value < clean.mean() - 0.2, c  # the reference attack works on this model
    ref = reference_rand(stochastic, x, y)
    torch.manual_seed(1)
    ours = A.worst_case(stochastic, [outs["ce"], outs["dlr"]], y, EOT)  # = autoattack_rand, reusing the two runs
    assert versus(stochastic, ours, ref, y).low <= 0
    # the same interval catches a weaker attack
    torch.manual_seed(1)
    weak = A.pgd(stochastic, x, y, EPS["linf"], "linf", steps=10)
    assert versus(stochastic, weak, refs["ce"], y).low > 0
