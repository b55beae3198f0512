"""Adversarial attacks in [0, 1] pixel space, adaptive to randomized models.

Every attack takes a model mapping [0, 1] images to logits (normalisation lives inside `Normalized`),
clean images `x` and labels `y`, and returns adversarial images inside the eps-ball around `x`
(l-inf or l2) and inside the [0, 1] box. Against a randomized model the attacks are adaptive:

* EOT (expectation over transformation, Athalye et al. 2018): the loss and its input gradient are
  averaged over `eot` stochastic passes, so the attack follows the gradient of the expected loss
  instead of one noisy sample of it. A deterministic model gets one pass whatever `eot` says.
* APGD-CE / APGD-DLR (Croce & Hein 2020) with EOT, and `autoattack_rand`, the worst case per example
  of both, as in AutoAttack's "rand" version (EOT 20).
* Square (Andriushchenko et al. 2020): score-based, needs no gradient at all (a check for gradient
  masking); its margin loss is averaged over `eot` passes.
* Transfer: PGD on a surrogate model, evaluated on the target (a check too: it must not beat white-box).

Iterative attacks keep, per example, the iterate that the model gets wrong most often over the EOT
passes (ties: the higher loss), so the returned image is the attack's best, not its last.

Written by hand: torchattacks cannot be installed beside Flower (its pinned requirements conflict
with flwr's). AutoAttack's reference code (on PyPI as `pyautoattack`, in the dev extra) has APGD and
Square but no PGD, FGSM or transfer, and against a randomized model it averages only the gradient over
the EOT passes: its step-size control and the point it returns follow the last pass, and an example no
pass fooled comes back as the clean image. The algorithms follow the papers and the reference code;
tests/test_autoattack_reference.py compares APGD-CE, APGD-DLR and the rand composite with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..defaults import NORMS
from ..errors import UserError
from ..layers import is_random
from ..predict import passes_can_batch, sample_probs

Norm = Literal["linf", "l2"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TRAINING_METHODS = ("pgd", "fgsm-rs")


# -- losses (per example, to be maximised) -------------------------------------------------------
def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{i != y} z_i: negative exactly when the example is misclassified."""
    z = logits.float()
    zy = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
    return zy - other


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020): -margin / (z_pi1 - z_pi3), invariant to logit scale and shift."""
    z = logits.float()
    if z.shape[1] < 3:
        raise ValueError("the DLR loss needs at least 3 classes")
    top = z.sort(1, descending=True).values
    return -margin(z, y) / (top[:, 0] - top[:, 2] + 1e-12)


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "dlr": dlr_loss}


# -- geometry -------------------------------------------------------------------------------------
def _flat_norm(v: torch.Tensor) -> torch.Tensor:
    """Per-example l2 norm, shaped to broadcast against `v`."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    """Nearest point of the eps-ball around `x`, then clipped to [0, 1] (clipping never leaves the ball)."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def random_start(x: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    """A uniform random point of the eps-ball (l-inf: the cube; l2: the ball), clipped to [0, 1]."""
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        d = x[0].numel()
        g = torch.randn_like(x)
        radius = eps * torch.rand(len(x), device=x.device).pow(1.0 / d).view(-1, *([1] * (x.dim() - 1)))
        delta = g / _flat_norm(g).clamp_min(1e-12) * radius
    return (x + delta).clamp(0.0, 1.0)


def _ascent(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: sign for l-inf, normalised gradient for l2."""
    if norm == "linf":
        return grad.sign()
    return grad / _flat_norm(grad).clamp_min(1e-12)


def _check(eps: float, norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {NORMS}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps={eps} must be a finite number >= 0")


# -- expectation over transformation --------------------------------------------------------------
def eot_loss_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: LossFn, eot: int = 1, max_batch: int = 1024,
                  grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Loss averaged over `eot` stochastic passes, its input gradient, and the fraction of passes classified correctly.

    Passes run together (images repeated along the batch) in chunks of at most `max_batch` images. Only the
    input gets a gradient: parameters are left untouched, so this is safe inside a training step.
    """
    passes = eot if is_random(model) else 1
    b = len(x)
    per_chunk = max(1, max_batch // max(b, 1)) if passes_can_batch(model) else 1
    x = x.detach()
    loss_sum = torch.zeros(b, device=x.device)
    correct = torch.zeros(b, device=x.device)
    g_sum = torch.zeros_like(x) if grad else None
    done = 0
    while done < passes:
        n = min(per_chunk, passes - done)
        xr = x.repeat(n, *([1] * (x.dim() - 1)))
        yr = y.repeat(n)
        with torch.enable_grad() if grad else torch.no_grad():
            if grad:
                xr.requires_grad_(True)
            logits = model(xr).float()
            values = loss(logits, yr)
            if grad:
                (g,) = torch.autograd.grad(values.sum(), xr)
                g_sum += g.view(n, *x.shape).sum(0)
        loss_sum += values.detach().view(n, b).sum(0)
        correct += (logits.detach().argmax(1) == yr).float().view(n, b).sum(0)
        done += n
    return loss_sum / passes, (g_sum / passes if grad else None), correct / passes


class _Best:
    """Per-example best iterate: fewest correct passes first, then the highest loss."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.clone()
        self.correct = torch.full((len(x),), float("inf"), device=x.device)
        self.loss = torch.full((len(x),), float("-inf"), device=x.device)

    def update(self, x: torch.Tensor, loss: torch.Tensor, correct: torch.Tensor) -> None:
        better = (correct < self.correct) | ((correct == self.correct) & (loss > self.loss))
        self.x[better] = x[better].detach()
        self.correct = torch.where(better, correct, self.correct)
        self.loss = torch.where(better, loss, self.loss)


# -- gradient attacks -----------------------------------------------------------------------------
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: Norm = "linf", eot: int = 1,
         rand_init: bool = False, alpha: float | None = None) -> torch.Tensor:
    """Fast gradient (sign) method: one step of size `alpha` (default eps; 1.25 eps with a random start, Wong et al. 2020)."""
    _check(eps, norm)
    start = random_start(x, eps, norm) if rand_init else x.detach()
    alpha = alpha if alpha is not None else (1.25 * eps if rand_init else eps)
    _, g, _ = eot_loss_grad(model, start, y, ce_loss, eot)
    return project(start + alpha * _ascent(g, norm), x, eps, norm).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: Norm = "linf", steps: int = 10,
        alpha: float | None = None, restarts: int = 1, rand_init: bool = True, eot: int = 1, loss: str = "ce") -> torch.Tensor:
    """Projected gradient ascent (Madry et al. 2018) with random start and restarts; `eot` > 1 gives EOT-PGD.

    Step size defaults to 2.5 eps / steps. Returns, per example, the best iterate over all steps and restarts.
    """
    _check(eps, norm)
    if steps < 1 or restarts < 1:
        raise ValueError("steps and restarts must be >= 1")
    loss_fn = LOSSES[loss]
    alpha = alpha if alpha is not None else 2.5 * eps / steps
    best = _Best(x)
    for _ in range(restarts):
        x_adv = random_start(x, eps, norm) if rand_init else x.detach().clone()
        for _ in range(steps):
            value, g, correct = eot_loss_grad(model, x_adv, y, loss_fn, eot)
            best.update(x_adv, value, correct)
            x_adv = project(x_adv + alpha * _ascent(g, norm), x, eps, norm)
        value, _, correct = eot_loss_grad(model, x_adv, y, loss_fn, eot, grad=False)
        best.update(x_adv, value, correct)
    return best.x


def _apgd_checkpoints(steps: int) -> list[int]:
    """Iterations where APGD may halve its step: after 22% of the budget, then after intervals shrinking by 3% to 6%."""
    k, shrink, shortest = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    points, at = [], k
    while at <= steps:
        points.append(at)
        k = max(k - shrink, shortest)
        at += k
    return points


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: Norm = "linf", steps: int = 100,
         loss: str = "ce", eot: int = 1, restarts: int = 1, rho: float = 0.75) -> torch.Tensor:
    """Auto-PGD (Croce & Hein 2020): step size 2 eps halved adaptively at checkpoints, momentum 0.75, EOT gradients.

    At each checkpoint the step of an example is halved (and it restarts from its best point) when fewer than
    `rho` of the steps since the last checkpoint increased its loss, or when its step was not halved last
    time and its best loss has not improved since.
    """
    _check(eps, norm)
    if steps < 1 or restarts < 1:
        raise ValueError("steps and restarts must be >= 1")
    loss_fn = LOSSES[loss]
    checkpoints = _apgd_checkpoints(steps)
    shape = (-1,) + (1,) * (x.dim() - 1)
    ret = _Best(x)
    for _ in range(restarts):
        x_adv = random_start(x, eps, norm)
        value, g, correct = eot_loss_grad(model, x_adv, y, loss_fn, eot)
        ret.update(x_adv, value, correct)
        x_best, g_best, loss_best = x_adv.clone(), g.clone(), value.clone()
        step = torch.full((len(x),), 2.0 * eps, device=x.device)
        x_prev = x_adv.clone()
        last_check, increases = 0, torch.zeros(len(x), device=x.device)
        loss_at_check, halved_last = loss_best.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        prev_value = value
        for i in range(1, steps + 1):
            z = project(x_adv + step.view(shape) * _ascent(g, norm), x, eps, norm)
            momentum = 0.75 if i > 1 else 1.0
            x_new = project(x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_prev), x, eps, norm)
            x_prev, x_adv = x_adv, x_new
            value, g, correct = eot_loss_grad(model, x_adv, y, loss_fn, eot)
            ret.update(x_adv, value, correct)
            increases += (value > prev_value).float()
            prev_value = value
            improved = value > loss_best
            x_best[improved], g_best[improved], loss_best = x_adv[improved], g[improved], torch.where(improved, value, loss_best)
            if i in checkpoints:
                few_increases = increases <= rho * (i - last_check)
                stalled = ~halved_last & (loss_at_check >= loss_best)
                halve = few_increases | stalled
                step = torch.where(halve, step / 2, step)
                x_adv[halve], g[halve] = x_best[halve], g_best[halve]
                x_prev[halve] = x_best[halve]
                halved_last, loss_at_check = halve, loss_best.clone()
                last_check, increases = i, torch.zeros_like(increases)
    return ret.x


def transfer(surrogate: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: Norm = "linf", steps: int = 10,
             eot: int = 1, restarts: int = 1) -> torch.Tensor:
    """Transfer attack: EOT-PGD on a surrogate model; the target model is never queried."""
    return pgd(surrogate, x, y, eps, norm, steps=steps, eot=eot, restarts=restarts)


# -- score-based black box ------------------------------------------------------------------------
def _square_fraction(p_init: float, it: int, queries: int) -> float:
    """Square's schedule of the fraction of pixels changed per query (rescaled to 10,000 queries as in the paper)."""
    t = int(it / max(queries, 1) * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256),
                       (10000, 512)):
        if t <= bound:
            return p_init / div
    return p_init / 512


def _pseudo_gaussian(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Square-l2's centred bump: concentric rectangles weighted 1/(k+1)^2, unit l2 norm."""
    delta = torch.zeros(h, w, device=device)
    ch, cw = h // 2, w // 2
    for k in range(max(ch, cw) + 1):
        delta[max(ch - k, 0):min(ch + k + 1, h), max(cw - k, 0):min(cw + k + 1, w)] += 1.0 / (k + 1) ** 2
    return delta / delta.norm().clamp_min(1e-12)


def _meta_pseudo_gaussian(s: int, device: torch.device) -> torch.Tensor:
    """Two bumps of opposite sign side by side (randomly transposed), unit l2 norm."""
    top = _pseudo_gaussian(s // 2, s, device) if s // 2 else torch.zeros(0, s, device=device)
    delta = torch.cat([top, -_pseudo_gaussian(s - s // 2, s, device)], 0)
    delta = delta / delta.norm().clamp_min(1e-12)
    return delta.T if torch.rand(()) > 0.5 else delta


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: Norm = "linf", queries: int = 1000,
           p_init: float = 0.8, eot: int = 1) -> torch.Tensor:
    """Square attack (Andriushchenko et al. 2020): random square updates kept when the margin loss drops.

    Uses only the model's outputs, never its gradient; the margin is averaged over `eot` stochastic passes.
    Examples whose averaged margin is already negative stop being queried.
    """
    _check(eps, norm)
    n, c, h, w = x.shape
    x = x.detach()

    def objective(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return eot_loss_grad(model, xs, ys, margin, eot, grad=False)[0]

    if norm == "linf":  # vertical stripes of +-eps
        x_best = (x + eps * torch.randint(0, 2, (n, c, 1, w), device=x.device).float().mul(2).sub(1)).clamp(0, 1)
    else:  # a grid of pseudo-Gaussian bumps, rescaled to norm eps
        s = max(h // 5, 1)
        delta = torch.zeros_like(x)
        for i in range(0, h - s + 1, s):
            for j in range(0, w - s + 1, s):
                bump = _meta_pseudo_gaussian(s, x.device).view(1, 1, s, s)
                delta[:, :, i:i + s, j:j + s] += bump * torch.randint(0, 2, (n, c, 1, 1), device=x.device).float().mul(2).sub(1)
        x_best = project(x + delta * (eps / _flat_norm(delta).clamp_min(1e-12)), x, eps, norm)
    best = objective(x_best, y)
    for it in range(1, queries):
        active = (best > 0).nonzero().squeeze(1)
        if len(active) == 0:
            break
        xa, xb = x[active], x_best[active]
        p = _square_fraction(p_init, it, queries)
        s = min(max(int(round(math.sqrt(p * h * w))), 1), h - 1 if h > 1 else 1)
        r, q = torch.randint(0, h - s + 1, ()).item(), torch.randint(0, w - s + 1, ()).item()
        if norm == "linf":
            candidate = xb.clone()
            signs = torch.randint(0, 2, (len(active), c, 1, 1), device=x.device).float().mul(2).sub(1)
            candidate[:, :, r:r + s, q:q + s] = xa[:, :, r:r + s, q:q + s] + eps * signs
            candidate = project(candidate, xa, eps, norm)
        else:
            candidate = _square_l2_candidate(xa, xb, eps, s, r, q)
        value = objective(candidate, y[active])
        better = value < best[active]
        x_best[active[better]] = candidate[better]
        best[active[better]] = value[better]
    return x_best


def _square_l2_candidate(x: torch.Tensor, x_best: torch.Tensor, eps: float, s: int, r: int, q: int) -> torch.Tensor:
    """Square-l2 update (the paper's): rebuild window 1 from a two-bump pattern plus its old direction, empty a second
    random window, give window 1 the norm of both windows plus a share of the unused budget, rescale to norm eps."""
    n, c, h, w = x.shape
    delta = x_best - x
    r2, q2 = torch.randint(0, h - s + 1, ()).item(), torch.randint(0, w - s + 1, ()).item()
    both = torch.zeros(1, 1, h, w, device=x.device)
    both[..., r:r + s, q:q + s] = 1
    both[..., r2:r2 + s, q2:q2 + s] = 1
    norm_windows = (delta * both).pow(2).sum((2, 3), keepdim=True).sqrt()
    old = delta[..., r:r + s, q:q + s]
    signs = torch.randint(0, 2, (n, c, 1, 1), device=x.device).float().mul(2).sub(1)
    pattern = _meta_pseudo_gaussian(s, x.device).view(1, 1, s, s)
    new = pattern * signs + old / (1e-10 + old.pow(2).sum((2, 3), keepdim=True).sqrt())
    unused = (eps**2 - _flat_norm(delta).pow(2)).clamp_min(0) / c
    new = new / new.pow(2).sum((2, 3), keepdim=True).sqrt().clamp_min(1e-12) * (unused + norm_windows.pow(2)).sqrt()
    delta = delta.clone()
    delta[..., r2:r2 + s, q2:q2 + s] = 0
    delta[..., r:r + s, q:q + s] = new
    return project(x + delta * (eps / _flat_norm(delta).clamp_min(1e-12)), x, eps, "l2")


# -- evaluation of randomized models --------------------------------------------------------------
@torch.no_grad()
def correct_fraction(model: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: int) -> torch.Tensor:
    """Per example, the fraction of `passes` stochastic passes that classify `x` correctly (0 or 1 if deterministic)."""
    probs = sample_probs(model, x, passes)  # (K, B, C); K = 1 for a deterministic model
    return (probs.argmax(-1) == y[None]).float().mean(0)


def worst_case(model: nn.Module, candidates: list[torch.Tensor], y: torch.Tensor, passes: int) -> torch.Tensor:
    """Per example, the candidate the model gets right least often over `passes` passes (first one on ties)."""
    fractions = torch.stack([correct_fraction(model, c, y, passes) for c in candidates])  # (A, B)
    pick = fractions.argmin(0)
    stacked = torch.stack(candidates)
    return stacked[pick, torch.arange(len(y), device=y.device)]


def autoattack_rand(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: Norm = "linf", steps: int = 100,
                    eot: int = 20) -> torch.Tensor:
    """AutoAttack-"rand"-style composite: APGD-CE and APGD-DLR, both with EOT, worst case per example."""
    ce = apgd(model, x, y, eps, norm, steps, "ce", eot)
    dlr = apgd(model, x, y, eps, norm, steps, "dlr", eot)
    return worst_case(model, [ce, dlr], y, eot)


# -- adversarial training -------------------------------------------------------------------------
def adversarial_step(adv: dict) -> Callable[[nn.Module, torch.Tensor, torch.Tensor, str], torch.Tensor]:
    """The trainer's batch transform for `--adv pgd|fgsm-rs`: l-inf PGD (random start, 2.5 eps/steps) or FGSM-RS.

    The attack runs on the model as it trains (train mode), so a stochastic layer draws fresh parameters in
    every attack pass, exactly like any forward pass.
    """
    from ..precision import autocast

    method, eps, steps = adv.get("method"), adv.get("eps", 8 / 255), adv.get("steps", 7)
    # messages name the settings as a Python caller writes them (TrainConfig.adv["steps"]); the CLI says --adv-steps
    if method not in TRAINING_METHODS:
        raise UserError(f'adversarial training: adv["method"]={method!r}: must be one of {", ".join(TRAINING_METHODS)}')
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps <= 1):
        raise UserError(f'adversarial training: adv["eps"]={eps!r}: must be a number in (0, 1] '
                        f"(pixel units; e.g. 8/255 = {8 / 255:.4f})")
    if method == "pgd" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise UserError(f'adversarial training: adv["steps"]={steps!r}: must be an integer >= 1')
    eps = float(eps)

    def step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> torch.Tensor:
        model = getattr(net, "module", net)  # attack the bare model, not a DDP wrapper (no gradient sync)
        with autocast(precision, x.device, model):
            if method == "fgsm-rs":
                return fgsm(model, x, y, eps, "linf", rand_init=True)
            return pgd(model, x, y, eps, "linf", steps=steps)

    return step
