"""StochasticLinear and `sampling`: token consistency, topology, sampled statistics, modes, gradients, validation.

Statistical tests draw thousands of samples under a fixed seed; each tolerance is a few standard errors of the
estimate (stated next to it), so a correct layer fails with negligible probability and a wrong one cannot pass.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

from stochvit import MCDropout, StochasticLinear, is_random, sampling

C = 16


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def diagonal_scales(layer: StochasticLinear, images: int, tokens: int = 1) -> torch.Tensor:
    """The scales a diagonal layer applies, recovered exactly by feeding ones: shape (images, tokens, C)."""
    return layer(torch.ones(images, tokens, layer.features))


def full_matrices(layer: StochasticLinear, images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feed C identity tokens followed by 5 random tokens; the identity rows of the output are the per-image matrix W.

    Returns (W, extra tokens x, their outputs y); token consistency means y == x @ W for the same W.
    """
    c = layer.features
    eye = torch.eye(c).expand(images, c, c)
    extra = torch.randn(images, 5, c)
    out = layer(torch.cat([eye, extra], dim=1))
    return out[:, :c], extra, out[:, c:]


# -- token consistency -----------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["uniform", "gaussian", "bernoulli"])
def test_diagonal_image_sharing_is_token_consistent(distribution):
    layer = StochasticLinear(C, distribution=distribution)
    x = torch.rand(6, 9, C) + 0.5  # nonzero, distinct tokens
    y = layer(x)
    ratio = y / x
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-6), "tokens of one image got different scales"
    # images get independent draws
    for i in range(1, 6):
        assert not torch.allclose(ratio[0, 0], ratio[i, 0])


def test_diagonal_batch_sharing_is_identical_across_images():
    s = diagonal_scales(StochasticLinear(C, sharing="batch"), images=5, tokens=4)
    assert torch.equal(s, s[:1, :1].expand_as(s))
    s2 = diagonal_scales(StochasticLinear(C, sharing="batch"), images=5, tokens=4)
    assert not torch.equal(s, s2), "a new draw at every call"


def test_diagonal_token_sharing_differs_across_tokens():
    s = diagonal_scales(StochasticLinear(C, sharing="token"), images=3, tokens=8)
    for b in range(3):
        for n in range(1, 8):
            assert not torch.allclose(s[b, 0], s[b, n])


@pytest.mark.parametrize("distribution", ["uniform", "gaussian", "orthogonal"])
def test_full_image_sharing_applies_one_matrix_per_image(distribution):
    layer = StochasticLinear(C, kind="full", distribution=distribution)
    w, x, y = full_matrices(layer, images=4)
    assert torch.allclose(y, x @ w, atol=1e-5), "extra tokens were not mapped by the image's matrix"
    for i in range(1, 4):
        assert (w[0] - w[i]).abs().max() > 0.1, "images must get independent matrices"


def test_full_batch_sharing_applies_one_matrix_to_the_batch():
    w, x, y = full_matrices(StochasticLinear(C, kind="full", sharing="batch"), images=4)
    assert torch.allclose(w, w[:1].expand_as(w))
    assert torch.allclose(y, x @ w[0], atol=1e-5)


def test_full_with_token_sharing_raises():
    with pytest.raises(ValueError, match="sharing"):
        StochasticLinear(C, kind="full", sharing="token")


def test_new_draw_every_call():
    layer = StochasticLinear(C)
    x = torch.ones(2, 3, C)
    assert not torch.equal(layer(x), layer(x))


# -- topology ----------------------------------------------------------------------------------


def test_orthogonal_preserves_pairwise_distances_and_norms_exactly():
    layer = StochasticLinear(C, kind="full", distribution="orthogonal")
    x = torch.randn(8, 12, C, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64
    assert not torch.allclose(x, y)
    assert torch.allclose(torch.cdist(y, y), torch.cdist(x, x), atol=1e-5)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    w, _, _ = full_matrices(StochasticLinear(C, kind="full", distribution="orthogonal"), images=8)
    assert torch.allclose(w.transpose(1, 2) @ w, torch.eye(C).expand(8, C, C), atol=1e-5)


@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_random_full_preserves_squared_distances_in_expectation(distribution):
    """E||(a-b)W||^2 = ||a-b||^2 when entries are zero-mean with variance 1/C.

    Per draw, the ratio r = ||dW||^2/||d||^2 = (1/C) sum_j z_j^2 with z_j of unit variance and kurtosis <= 3, so
    Var r <= 2/C. Averaging M independent draws (one per image), the standard error is <= sqrt(2/(C M)) = 0.0079
    for C=16, M=2000; the tolerance is 5 standard errors.
    """
    m, tokens = 2000, 6
    layer = StochasticLinear(C, kind="full", distribution=distribution)
    base = torch.randn(tokens, C, dtype=torch.float64)
    y = layer(base.expand(m, tokens, C).contiguous())
    d_in = torch.cdist(base, base) ** 2
    ratio = (torch.cdist(y, y) ** 2).mean(0)[~torch.eye(tokens, dtype=torch.bool)] / d_in[~torch.eye(tokens, dtype=torch.bool)]
    tol = 5 * math.sqrt(2 / (C * m))
    assert (ratio - 1).abs().max() < tol, ratio
    norms = (y.norm(dim=-1) ** 2).mean(0) / base.norm(dim=-1) ** 2
    assert (norms - 1).abs().max() < tol
    # ... but not exactly per draw (unlike orthogonal)
    per_draw = y[0].norm(dim=-1) ** 2 / base.norm(dim=-1) ** 2
    assert (per_draw - 1).abs().max() > 1e-3


# -- sampled statistics ------------------------------------------------------------------------


def test_uniform_scales_match_the_configured_range():
    low, high = 0.2, 1.7
    s = diagonal_scales(StochasticLinear(C, low=low, high=high), images=2000).flatten().double()
    assert s.min() >= low and s.max() <= high
    assert stats.kstest(s.numpy(), stats.uniform(loc=low, scale=high - low).cdf).pvalue > 1e-3
    n = len(s)
    mean, var = (low + high) / 2, (high - low) ** 2 / 12
    assert abs(s.mean() - mean) < 5 * math.sqrt(var / n)  # 5 standard errors
    assert abs(s.var() - var) < 5 * var * math.sqrt(0.8 / n)  # Var of a uniform's sample variance: var^2 (9/5 - 1) / n


def test_gaussian_scales_match_mean_and_variance():
    low, high = 0.5, 1.5
    s = diagonal_scales(StochasticLinear(C, distribution="gaussian", low=low, high=high), images=2000).flatten().double()
    mean, var = 1.0, 1 / 12
    assert stats.kstest(s.numpy(), stats.norm(loc=mean, scale=math.sqrt(var)).cdf).pvalue > 1e-3
    n = len(s)
    assert abs(s.mean() - mean) < 5 * math.sqrt(var / n)
    assert abs(s.var() - var) < 5 * var * math.sqrt(2 / n)


@pytest.mark.parametrize("low,high", [(0.5, 1.5), (0.0, 1.0), (0.2, 3.0)])
def test_bernoulli_scales_take_two_values_with_matched_moments(low, high):
    layer = StochasticLinear(C, distribution="bernoulli", low=low, high=high)
    s = diagonal_scales(layer, images=4000).flatten().double()
    m, var = (low + high) / 2, (high - low) ** 2 / 12
    p = m**2 / (m**2 + var)
    values = torch.unique(s)
    assert len(values) == 2 and values[0] == 0 and torch.isclose(values[1], torch.tensor(m / p, dtype=torch.float64))
    n = len(s)
    # the kept fraction is Binomial(n, p)/n
    assert abs((s > 0).double().mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert abs(s.mean() - m) < 5 * math.sqrt(var / n)
    mu4 = (1 - p) * m**4 + p * (m / p - m) ** 4  # central fourth moment: Var(sample variance) ~ (mu4 - var^2) / n
    assert abs(s.var() - var) < 5 * math.sqrt((mu4 - var**2) / n)


@pytest.mark.parametrize("distribution", ["uniform", "gaussian", "orthogonal"])
def test_full_entries_are_zero_mean_with_variance_one_over_c(distribution):
    w, _, _ = full_matrices(StochasticLinear(C, kind="full", distribution=distribution), images=1000)
    e = w.flatten().double()
    n = len(e)
    # entries within one matrix are weakly dependent (orthogonal rows); 5 SE of the iid case plus slack for that
    assert abs(e.mean()) < 5 * math.sqrt(1 / (C * n))
    assert abs(e.var() * C - 1) < 0.02
    if distribution == "uniform":
        a = math.sqrt(3 / C)
        assert e.abs().max() <= a + 1e-6
        assert stats.kstest(e.numpy()[:20000], stats.uniform(loc=-a, scale=2 * a).cdf).pvalue > 1e-3
    if distribution == "gaussian":
        assert stats.kstest(e.numpy()[:20000], stats.norm(scale=1 / math.sqrt(C)).cdf).pvalue > 1e-3


def test_orthogonal_is_haar_distributed():
    """For Haar-random Q in O(C): E tr Q = 0 and E (tr Q)^2 = 1 (Diaconis-Shahshahani), and E q_ii = 0.

    A QR factorisation without the sign fix gives q_11 < 0 always, which these moments catch.
    """
    w, _, _ = full_matrices(StochasticLinear(C, kind="full", distribution="orthogonal"), images=4000)
    tr = torch.diagonal(w, dim1=-2, dim2=-1).sum(-1).double()
    n = len(tr)
    assert abs(tr.mean()) < 5 * math.sqrt(1 / n)
    assert abs((tr**2).mean() - 1) < 5 * math.sqrt(2 / n)  # tr Q is close to N(0, 1): Var (tr Q)^2 ~ 2
    q11 = w[:, 0, 0].double()
    assert abs(q11.mean()) < 5 * math.sqrt(1 / (C * n))
    # each entry of a Haar Q has mean 0 and variance exactly 1/C (E q^4 = 3/(C(C+2)), so Var q^2 < 3/C^2)
    q_off = w[:, 1, 2].double()
    assert abs(q_off.mean()) < 5 * math.sqrt(1 / (C * n))
    assert abs((q_off**2).mean() - 1 / C) < 5 * math.sqrt(3 / n) / C
    eye = torch.eye(C, dtype=w.dtype)
    assert (w.mT @ w - eye).abs().max() < 1e-5 and (w @ w.mT - eye).abs().max() < 1e-5  # orthogonal, each draw


@pytest.mark.parametrize("sharing", ["image", "batch"])
def test_orthogonal_forward_equals_x_times_the_sampled_q_and_its_gradient(sharing):
    """The forward never forms Q (geqrf + ormqr); from the same RNG state it equals x @ Q for `sample`'s Q,
    in value and gradient."""
    layer = StochasticLinear(C, kind="full", distribution="orthogonal", sharing=sharing)
    x = torch.randn(6, 7, C, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    q = layer.sample(layer.draw_shape(x), x.device).reshape(-1, C, C)
    x2 = x.detach().clone().requires_grad_(True)
    want = (x2 @ q if sharing == "batch" else torch.bmm(x2, q))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)


# -- inference and modes -----------------------------------------------------------------------


def test_sampling_happens_in_eval():
    layer = StochasticLinear(C).eval()
    model = nn.Sequential(nn.Linear(C, C), layer, nn.Linear(C, 3)).eval()
    x = torch.randn(4, 5, C)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))
    assert is_random(model)


@pytest.mark.parametrize("kind,distribution", [("diagonal", "uniform"), ("diagonal", "gaussian"), ("diagonal", "bernoulli"),
                                               ("full", "orthogonal"), ("full", "uniform")])
def test_off_mode_is_the_identity(kind, distribution):
    model = nn.Sequential(StochasticLinear(C, kind=kind, distribution=distribution))
    x = torch.randn(3, 4, C)
    with sampling(model, "off"):
        assert torch.equal(model(x), x)
        assert not is_random(model)


@pytest.mark.parametrize("distribution", ["uniform", "gaussian", "bernoulli"])
def test_mean_mode_scales_by_the_mean_exactly(distribution):
    model = nn.Sequential(StochasticLinear(C, distribution=distribution, low=0.3, high=2.1))
    x = torch.randn(3, 4, C)
    with sampling(model, "mean"):
        assert torch.equal(model(x), x * 1.2)
        assert torch.equal(model(x), model(x))


def test_mean_mode_on_full_raises():
    model = nn.Sequential(StochasticLinear(C), StochasticLinear(C, kind="full"))
    with pytest.raises(ValueError, match="full"):
        with sampling(model, "mean"):
            pass
    assert [m.mode for m in model] == ["on", "on"], "a refused mode must change nothing"
    layer = StochasticLinear(C, kind="full")
    layer.mode = "mean"
    with pytest.raises(ValueError, match="full"):
        layer(torch.randn(2, 3, C))


def test_sampling_restores_previous_modes_even_on_error():
    model = nn.Sequential(StochasticLinear(C), StochasticLinear(C), MCDropout(0.2))
    model[1].mode = "off"
    with sampling(model, "mean"):
        assert [m.mode for m in model] == ["mean", "mean", "mean"]
    assert [m.mode for m in model] == ["on", "off", "on"]
    with pytest.raises(RuntimeError):
        with sampling(model, "off"):
            raise RuntimeError("boom")
    assert [m.mode for m in model] == ["on", "off", "on"]
    with pytest.raises(ValueError, match="mode"):
        with sampling(model, "sometimes"):
            pass


def test_mc_dropout_is_random_in_eval_and_off_in_mean_mode():
    d = MCDropout(0.5).eval()
    x = torch.ones(1000)
    assert not torch.equal(d(x), d(x))
    with sampling(d, "mean"):
        assert torch.equal(d(x), x)
    assert not is_random(nn.Sequential(MCDropout(0.0)))


# -- gradients and validation ------------------------------------------------------------------


def test_gradient_flows_to_the_input_through_the_sampled_scale():
    layer = StochasticLinear(C)
    x = (torch.rand(3, 4, C) + 0.5).requires_grad_()
    y = layer(x)
    y.sum().backward()
    assert torch.allclose(x.grad, (y / x).detach())  # d(x*s)/dx = s


def test_gradient_flows_through_full_matrix():
    layer = StochasticLinear(C, kind="full", distribution="orthogonal")
    x = torch.randn(3, 4, C, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    # orthogonal: |grad| per token equals |g| per token since grad = g W^T
    assert torch.allclose(x.grad.norm(dim=-1), g.norm(dim=-1), atol=1e-5)


def test_gradients_reach_model_weights():
    model = nn.Sequential(nn.Linear(C, C), StochasticLinear(C), nn.GELU(), nn.Linear(C, 3))
    x = torch.randn(4, 5, C)
    model(x).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _autograd_nodes(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def test_mlp_scales_in_place_only_where_autograd_does_not_record():
    """fc1's output is a view of its matmul: scaling it in place while autograd records makes the backward rebuild the
    base (CopySlices), activation-sized copies per MLP. Training keeps the plain multiply; inference stays in place."""
    from stochvit import StochasticMlp

    mlp = StochasticMlp(C, 4 * C)
    x = torch.randn(2, 5, C)
    nodes = _autograd_nodes(mlp(x).sum())
    assert "MulBackward0" in nodes and not nodes & {"CopySlices", "AsStridedBackward0"}, nodes
    with torch.no_grad():  # in place: the scaled tensor is fc1's own output, no second activation-sized buffer
        h = mlp.fc1(x)
        torch.manual_seed(0)
        assert mlp.stochastic(h, inplace=True).data_ptr() == h.data_ptr()
    torch.manual_seed(0)
    out = mlp.stochastic(mlp.fc1(x), inplace=True)  # autograd records: a new tensor, same values as the in-place draw
    assert torch.equal(out, h)
    grads = []  # and the same gradients as scaling in place under autograd did (so older runs' numerics hold)
    for scale_in_place in (False, True):
        mlp.zero_grad()
        torch.manual_seed(1)
        h = mlp.fc1(x)
        h = h.mul_(mlp.stochastic.draw(h)) if scale_in_place else mlp.stochastic(h, inplace=True)
        mlp.fc2(mlp.act(h)).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in mlp.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(low=2.0, high=1.0), "low"),
        (dict(kind="sparse"), "kind"),
        (dict(distribution="laplace"), "distribution"),
        (dict(kind="full", distribution="bernoulli"), "distribution"),
        (dict(kind="diagonal", distribution="orthogonal"), "distribution"),
        (dict(sharing="pixel"), "sharing"),
        (dict(distribution="bernoulli", low=-1.0, high=0.5), "bernoulli"),
        (dict(distribution="bernoulli", low=-1.0, high=1.0), "bernoulli"),
        (dict(low=float("nan")), "low"),
    ],
)
def test_invalid_settings_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        StochasticLinear(C, **kwargs)


def test_wrong_feature_count_raises():
    with pytest.raises(ValueError, match="features"):
        StochasticLinear(C)(torch.randn(2, 3, C + 1))
    with pytest.raises(ValueError, match="features"):
        StochasticLinear(0)
