"""The robustness suite's eps cascade: exact on a model with a known optimum, never above the uncascaded numbers,
and the sanity checks keep their meaning under it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stochvit.models import Normalized, create_model
from stochvit.suites.robustness import Settings, _falls_with_eps, attack_examples, eps_label

EPS = [0.02, 0.05, 0.1, 0.2]


def _linear_problem(n: int = 160, d: int = 16) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict[float, torch.Tensor]]:
    """Two-class linear model and the exact robust indicator per example and l-inf eps (the box binds for some pixels):
    the margin's minimum over ball and box is reached coordinate by coordinate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 2)).eval()
    x = torch.rand(n, 1, 4, d // 4)
    with torch.no_grad():
        model[1].bias.copy_(-0.5 * model[1].weight.sum(1))  # the boundary through the cube's centre: margins spread
        y = model(x).argmax(1)
        y[: n // 8] = 1 - y[: n // 8]  # a few misclassified clean: never attacked, never robust
        w, b = model[1].weight, model[1].bias
        diff, bias = w[y] - w[1 - y], b[y] - b[1 - y]
        flat = x.flatten(1)
        exact = {}
        for eps in EPS:
            delta = torch.where(diff > 0, torch.clamp(-flat, min=-eps), torch.clamp(1 - flat, max=eps))
            exact[eps] = (((flat + delta) * diff).sum(1) + bias > 0).float()
    return model, x, y, exact


def test_cascade_reaches_the_exact_optimum_of_a_linear_model_attacking_fewer_examples():
    model, x, y, exact = _linear_problem()
    out = {}
    for cascade in (True, False):
        s = Settings(eps=EPS, attacks=["fgsm", "pgd", "eot-pgd", "apgd-ce"], steps=20, passes=1, sanity=True, n_boot=50,
                     batch_size=64, eps_cascade=cascade)
        torch.manual_seed(1)
        out[cascade], _, _ = attack_examples(model, x, y, s)
    for cascade, r in out.items():
        for name in ("fgsm", "pgd", "eot-pgd", "apgd-ce", "worst_case"):
            for eps in EPS:
                lab = eps_label(eps, "linf")
                got = torch.tensor(r["per_example"][name][lab])
                # an adversarial image is a real point of the ball: never below the optimum; these attacks reach it
                assert torch.equal(got, exact[eps]), (cascade, name, eps)
    for name in ("fgsm", "pgd", "eot-pgd", "apgd-ce"):
        attacked = [out[True]["attacks"][name][eps_label(e, "linf")]["attacked"] for e in EPS]
        full = [out[False]["attacks"][name][eps_label(e, "linf")]["attacked"] for e in EPS]
        assert attacked[0] == full[0] == int((torch.tensor(out[True]["per_example"]["clean"]) > 0).sum())
        # the cascade attacks only the examples still robust at the next smaller eps
        assert attacked[1:] == [int(exact[e].sum()) for e in EPS[:-1]] and sum(attacked) < sum(full)
    assert out[True]["more_iterations"]["attacked"] == int(exact[EPS[1]].sum())  # mid eps 0.1 builds on 0.05
    assert out[True]["large_eps"]["attacked"] == int(exact[EPS[-1]].sum()) < out[False]["large_eps"]["attacked"]
    assert out[True]["large_eps"]["mean"] == out[False]["large_eps"]["mean"] == 0.0
    assert {c["check"]: c["status"] for c in out[True]["sanity"]} == {c["check"]: c["status"] for c in out[False]["sanity"]}
    assert "Epsilon cascade" in out[True]["rule"] and "Epsilon cascade" not in out[False]["rule"]


def test_cascade_on_a_stochastic_model_is_monotone_and_not_above_the_uncascaded_run():
    torch.manual_seed(0)
    model = Normalized(create_model("vit_digits_patch2_8", stochastic=True), [0.3], [0.3]).eval()
    x = torch.rand(48, 1, 8, 8)
    with torch.no_grad():
        y = model(x.repeat(8, 1, 1, 1)).softmax(1).view(8, 48, -1).mean(0).argmax(1)  # labels the model mostly gets right
    eps = [0.01, 0.03, 0.1]
    runs = {}
    for cascade in (True, False):
        s = Settings(eps=eps, attacks=["pgd", "eot-pgd", "square"], steps=4, eot=2, queries=20, passes=6, sanity=False,
                     n_boot=50, eps_cascade=cascade)
        torch.manual_seed(2)
        runs[cascade], _, _ = attack_examples(model, x, y, s)
    r = runs[True]
    for name in ("pgd", "eot-pgd", "square", "worst_case"):
        f = torch.tensor([r["per_example"][name][eps_label(e, "linf")] for e in eps])
        assert (f[1:] <= f[:-1]).all(), name  # per example, never more robust at a larger eps
        assert (f <= torch.tensor(r["per_example"]["clean"])).all()
    for name in ("pgd", "eot-pgd", "square"):
        for e in eps:
            cell = r["attacks"][name][eps_label(e, "linf")]
            assert cell["mean"] <= cell["mean_before_cascade"] + 1e-9
    # the same attacks without the cascade: the cascaded worst case is not higher beyond sampling noise (48 examples)
    for e in eps:
        lab = eps_label(e, "linf")
        a, b = r["worst_case"][lab]["mean"], runs[False]["worst_case"][lab]["mean"]
        assert a <= b + 2 * (max(b * (1 - b), 0.05) / 48) ** 0.5, (lab, a, b)


def test_rise_check_still_flags_an_attack_weaker_at_a_larger_eps_under_the_cascade():
    """The cascaded worst case cannot rise, so check 1 reads each epsilon's attacks alone (mean_before_cascade)."""
    model, x, y, _ = _linear_problem(n=40)
    s = Settings(eps=[0.02, 0.05], attacks=["pgd"], steps=5, passes=1)
    clean = torch.ones(len(y))
    result = dict(worst_case={"0.02": dict(mean=0.4, mean_before_cascade=0.4), "0.05": dict(mean=0.4, mean_before_cascade=0.8)})
    check = _falls_with_eps(result, model, x, y, clean, s, 0.5, {})
    assert check["status"] == "FLAG" and "rises between" in check["detail"], check
    result["worst_case"]["0.05"]["mean_before_cascade"] = 0.35
    assert _falls_with_eps(result, model, x, y, clean, s, 0.5, {})["status"] == "PASS"


@pytest.mark.parametrize("cascade", [True, False])
def test_cascade_setting_reaches_the_report(cascade):
    model, x, y, _ = _linear_problem(n=24)
    s = Settings(eps=[0.1, 0.02], attacks=["pgd"], steps=3, passes=1, sanity=False, n_boot=20, eps_cascade=cascade)
    r, shown, _ = attack_examples(model, x, y, s)
    assert r["settings"]["eps_cascade"] is cascade and r["settings"]["eps"] == [0.02, 0.1]  # smallest first
    assert list(r["attacks"]["pgd"]) == ["0.02", "0.1"] and sorted(shown) == [0.02, 0.1]
    assert ("mean_before_cascade" in r["attacks"]["pgd"]["0.1"]) is cascade
