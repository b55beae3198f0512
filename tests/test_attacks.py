"""Properties of the hand-written attacks: constraints, exactness on a linear model, strength orderings, EOT, masking."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stochvit.errors import UserError
from stochvit.eval import attacks as A
from stochvit.models import Normalized, create_model
from stochvit.runs import data_for, load_run

TOL = 1e-5  # float32 rounding of x + delta


def _size(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


@pytest.fixture(scope="module")
def random_vit() -> nn.Module:
    torch.manual_seed(0)
    return Normalized(create_model("vit_digits_patch2_8", stochastic=True), [0.3], [0.3]).eval()


@pytest.fixture(scope="module")
def test_images(digits_runs) -> tuple[torch.Tensor, torch.Tensor]:
    run = load_run(digits_runs["deterministic"])
    return data_for(run.config).test.tensors()


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_every_attack_stays_in_ball_and_box(random_vit, norm, eps):
    torch.manual_seed(1)
    x = torch.rand(6, 1, 8, 8)
    x[:, :, 0], x[:, :, -1] = 0.0, 1.0  # pixels on the box faces: the box constraint binds
    y = torch.randint(0, 10, (6,))
    m = random_vit
    outs = dict(
        fgsm=A.fgsm(m, x, y, eps, norm), fgsm_rs=A.fgsm(m, x, y, eps, norm, eot=2, rand_init=True),
        pgd=A.pgd(m, x, y, eps, norm, steps=3, restarts=2, eot=2), apgd_ce=A.apgd(m, x, y, eps, norm, steps=4, eot=2),
        apgd_dlr=A.apgd(m, x, y, eps, norm, steps=4, loss="dlr"), square=A.square(m, x, y, eps, norm, queries=25, eot=2),
        transfer=A.transfer(m, x, y, eps, norm, steps=2), aa_rand=A.autoattack_rand(m, x, y, eps, norm, steps=2, eot=2),
    )
    if norm == "linf":
        m.train()
        for method in A.TRAINING_METHODS:
            outs[method] = A.adversarial_step(dict(method=method, eps=eps, steps=2))(m, x, y, "fp32")
        m.eval()
    for name, x_adv in outs.items():
        assert x_adv.shape == x.shape and not x_adv.requires_grad, name
        assert (_size(x_adv, x, norm) <= eps + TOL).all(), name
        assert x_adv.min() >= 0 and x_adv.max() <= 1, name
        assert (x_adv != x).any(), f"{name} did not move"


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_reaches_analytic_worst_case_margin_of_linear_classifier(norm):
    """Two-class linear model: the worst margin over the ball is m(x) - eps * ||w_y - w_other||_dual (box inactive)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    x = 0.3 + 0.4 * torch.rand(16, 1, 8, 8)  # at least 0.3 from the box faces: only the ball binds
    y = torch.randint(0, 2, (16,))
    eps = 0.05 if norm == "linf" else 0.2
    w = model[1].weight.detach()
    diff = w[y] - w[1 - y]
    dual = diff.abs().sum(1) if norm == "linf" else diff.norm(dim=1)
    with torch.no_grad():
        analytic = A.margin(model(x), y) - eps * dual
        # l-inf from a random start; l2 from x itself (from a random start the l2 iterates only approach the optimum)
        x_adv = A.pgd(model, x, y, eps, norm, steps=20, rand_init=norm == "linf")
        reached = A.margin(model(x_adv), y)
    torch.testing.assert_close(reached, analytic, atol=1e-4, rtol=1e-4)
    assert (reached >= analytic - 1e-4).all()  # never below the analytic bound: a sanity check of the constraint


def test_apgd_at_least_as_strong_as_pgd_with_equal_budget(digits_runs, test_images):
    model = load_run(digits_runs["deterministic"]).model
    x, y = test_images
    torch.manual_seed(0)
    eps, steps = 0.06, 10
    accuracy = {}
    for name, attack in (("pgd", lambda: A.pgd(model, x, y, eps, steps=steps)),
                         ("apgd-ce", lambda: A.apgd(model, x, y, eps, steps=steps)),
                         ("apgd-dlr", lambda: A.apgd(model, x, y, eps, steps=steps, loss="dlr"))):
        accuracy[name] = A.correct_fraction(model, attack(), y, 1).mean().item()
    clean = A.correct_fraction(model, x, y, 1).mean().item()
    assert accuracy["pgd"] < clean - 0.1, (clean, accuracy)  # the budget is one where attacks matter
    slack = 2 / len(y)  # one seed each: allow two examples of random-start noise
    assert accuracy["apgd-ce"] <= accuracy["pgd"] + slack, accuracy
    assert min(accuracy["apgd-ce"], accuracy["apgd-dlr"]) <= accuracy["pgd"] + slack / 2, accuracy


def test_eot_reduces_gradient_variance_on_stochastic_model(digits_runs, test_images):
    model = load_run(digits_runs["stochastic"]).model
    x, y = test_images[0][:16], test_images[1][:16]
    torch.manual_seed(0)

    def spread(eot: int) -> float:
        grads = torch.stack([A.eot_loss_grad(model, x, y, A.ce_loss, eot)[1] for _ in range(8)])
        return grads.var(0).sum().item()

    single, averaged = spread(1), spread(16)
    assert single > 0  # the layer really is random
    assert averaged < single / 4, (single, averaged)  # ~1/16 expected; 1/4 leaves room for sampling noise
    # a deterministic model ignores eot: identical gradients
    det = load_run(digits_runs["deterministic"]).model
    g1, g2 = A.eot_loss_grad(det, x, y, A.ce_loss, 4)[1], A.eot_loss_grad(det, x, y, A.ce_loss, 4)[1]
    assert torch.equal(g1, g2)


class Quantized(nn.Module):
    """Input quantisation to 16 levels: gradients are zero almost everywhere (masked), outputs are informative."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 16) / 16)


def test_square_lowers_accuracy_when_gradients_are_masked(digits_runs, test_images):
    model = Quantized(load_run(digits_runs["deterministic"]).model)
    x, y = test_images[0][:60], test_images[1][:60]
    torch.manual_seed(0)
    eps = 0.15
    clean = A.correct_fraction(model, x, y, 1).mean().item()
    grad_acc = A.correct_fraction(model, A.pgd(model, x, y, eps, steps=10), y, 1).mean().item()
    square_acc = A.correct_fraction(model, A.square(model, x, y, eps, queries=150), y, 1).mean().item()
    assert clean > 0.8
    assert square_acc < clean - 0.3, (clean, square_acc)
    assert square_acc < grad_acc - 0.2, (grad_acc, square_acc)  # PGD is fooled by the masking, Square is not


def test_losses_and_projection():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.0]])
    y = torch.tensor([0, 0])
    torch.testing.assert_close(A.margin(logits, y), torch.tensor([2.0, -2.0]))
    torch.testing.assert_close(A.dlr_loss(logits, y), torch.tensor([-2.0 / 3.0, 2.0 / 2.0]))
    torch.testing.assert_close(A.dlr_loss(logits * 7 + 3, y), A.dlr_loss(logits, y))  # scale and shift invariant
    x = torch.full((1, 1, 2, 2), 0.5)
    far = x + torch.tensor([3.0, 4.0, 0.0, 0.0]).view(1, 1, 2, 2)
    torch.testing.assert_close(A.project(far, x, 1.0, "l2"), (x + torch.tensor([0.6, 0.8, 0, 0]).view(1, 1, 2, 2)).clamp(0, 1))
    assert A._apgd_checkpoints(100)[:3] == [22, 41, 57]


@pytest.mark.parametrize("adv,named", [
    (dict(method="cw", eps=0.1, steps=3), """adv["method"]='cw'"""),
    (dict(method="pgd", eps=0.0, steps=3), 'adv["eps"]=0.0'),
    (dict(method="pgd", eps="8/255", steps=3), """adv["eps"]='8/255'"""),
    (dict(method="pgd", eps=0.1, steps=0), 'adv["steps"]=0'),
    (dict(method="pgd", eps=0.1, steps=2.5), 'adv["steps"]=2.5'),  # not truncated to 2 silently
])
def test_adversarial_step_rejects_bad_settings_naming_them_as_python_writes_them(adv, named):
    with pytest.raises(ValueError) as e:
        A.adversarial_step(adv)
    assert isinstance(e.value, UserError) and str(e.value).startswith(f"adversarial training: {named}: must be "), e.value
