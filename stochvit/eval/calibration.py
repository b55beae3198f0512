"""Calibration metrics beyond `stochvit.eval.metrics`, and temperature scaling.

From torchmetrics: ECE (15 equal-width bins, L1), MCE (same bins, max norm), classwise ECE (the mean over
classes of the binary calibration error of p_c against 1[y = c]) and the AUROC of confidence for telling
correct from wrong predictions. Written here, because torchmetrics has no equivalent:
  - adaptive (equal-mass) ECE: the same L1 binning, with bin edges at confidence quantiles (Nixon et al. 2019);
  - AURC: area under the risk-coverage curve of selective classification (Geifman et al. 2019);
  - `reliability`: per-bin accuracy, confidence and counts, which the reliability diagrams draw.
Temperature scaling (Guo et al. 2017) is fitted on validation NLL with LBFGS over log T.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import binary_auroc, binary_calibration_error, multiclass_calibration_error

from .metrics import ECE_BINS, classification_metrics

METRICS = ("accuracy", "nll", "brier", "ece", "adaptive_ece", "mce", "classwise_ece", "aurc", "auroc")
LOWER_IS_BETTER = {"nll", "brier", "ece", "adaptive_ece", "mce", "classwise_ece", "aurc"}


def confidence_correct(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 confidence and 0/1 correctness of (N, C) probabilities."""
    conf, pred = probs.float().max(1)
    return conf, (pred == labels).float()


def equal_mass_edges(conf: torch.Tensor, n_bins: int = ECE_BINS) -> torch.Tensor:
    """Bin edges holding (nearly) equal numbers of confidences; the ends stay at 0 and 1."""
    inner = torch.quantile(conf.double(), torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:-1]).to(conf.dtype)
    return torch.cat([conf.new_zeros(1), inner, conf.new_ones(1)])


def reliability(conf: torch.Tensor, correct: torch.Tensor, edges: torch.Tensor | int = ECE_BINS) -> dict[str, torch.Tensor]:
    """Per-bin mean accuracy, mean confidence and count; bins are [e_i, e_{i+1}) as in torchmetrics (1.0 joins the last)."""
    if isinstance(edges, int):
        edges = torch.linspace(0, 1, edges + 1, dtype=conf.dtype)
    n_bins = len(edges) - 1
    idx = (torch.bucketize(conf.contiguous(), edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf, dtype=torch.float64))
    acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct.double())
    cf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf.double())
    safe = count.clamp_min(1)
    return dict(edges=edges, accuracy=acc / safe, confidence=cf / safe, count=count)


def binned_ece(conf: torch.Tensor, correct: torch.Tensor, edges: torch.Tensor | int = ECE_BINS) -> float:
    """L1 calibration error of the given binning: sum over bins of |accuracy - confidence| x bin mass."""
    r = reliability(conf, correct, edges)
    return ((r["accuracy"] - r["confidence"]).abs() * r["count"]).sum().item() / max(len(conf), 1)


def adaptive_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    conf, correct = confidence_correct(probs, labels)
    return binned_ece(conf, correct, equal_mass_edges(conf, n_bins))


def classwise_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Mean over classes of the binary ECE of p_c against 1[y = c] (Kull et al. 2019)."""
    probs = probs.float()
    errors = [binary_calibration_error(probs[:, c].contiguous(), (labels == c).long(), n_bins=n_bins, norm="l1")
              for c in range(probs.shape[1])]
    return torch.stack(errors).mean().item()


def aurc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the risk-coverage curve: mean over coverages k/N of the error rate among the k most confident.

    Tied confidences share their errors evenly (the expected risk over random orders of the ties), so the value
    does not depend on the order of the input: a constant confidence gives the error rate, whatever the order.
    """
    conf, correct = confidence_correct(probs, labels)
    order = conf.argsort(descending=True)
    errors = 1.0 - correct[order].double()
    _, tie, count = torch.unique_consecutive(conf[order], return_inverse=True, return_counts=True)
    errors = (torch.zeros(len(count), dtype=torch.float64).index_add_(0, tie, errors) / count)[tie]
    risk = errors.cumsum(0) / torch.arange(1, len(errors) + 1, dtype=torch.float64)
    return risk.mean().item()


def misclassification_auroc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC of confidence as a score separating correct from wrong predictions; NaN when all or none are wrong."""
    conf, correct = confidence_correct(probs, labels)
    if correct.min() == correct.max():
        return math.nan
    return binary_auroc(conf, correct.long()).item()


def calibration_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """All of METRICS for (N, C) probabilities; pass as `metric_fn` to `stochvit.eval.metrics.mc_metrics`."""
    probs = probs.float()
    out = classification_metrics(probs, labels)
    out.update(
        adaptive_ece=adaptive_ece(probs, labels),
        mce=multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=ECE_BINS, norm="max").item(),
        classwise_ece=classwise_ece(probs, labels),
        aurc=aurc(probs, labels),
        auroc=misclassification_auroc(probs, labels),
    )
    return {k: out[k] for k in METRICS}


# -- temperature scaling ------------------------------------------------------------------------------

def log_probs(probs: torch.Tensor) -> torch.Tensor:
    """Logits up to a per-row constant (softmax-invariant), finite even where a probability underflowed to 0."""
    return probs.float().clamp_min(torch.finfo(torch.float32).tiny).log()


def apply_temperature(pass_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) of every pass, from the passes' probabilities."""
    return (log_probs(pass_probs) / temperature).softmax(-1)


def fit_temperature(pass_probs: torch.Tensor, labels: torch.Tensor, average: bool = True, max_iter: int = 100) -> float:
    """Temperature minimising NLL on held-out (K, N, C) pass probabilities.

    average=True fits the deployed K-sample predictor mean_k softmax(z_k / T); average=False fits single passes
    (NLL averaged over passes). LBFGS runs on log T so that T stays positive.
    """
    if pass_probs.dim() == 2:
        pass_probs = pass_probs[None]
    z = log_probs(pass_probs)
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        logp = (z / log_t.exp()).log_softmax(-1)
        if average:
            logp = logp.logsumexp(0) - math.log(len(z))
            return -logp.gather(1, labels[:, None]).mean()
        return -logp.gather(2, labels[None, :, None].expand(len(z), -1, 1)).mean()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nll()
        loss.backward()
        return loss

    opt.step(closure)
    t = log_t.exp().item()
    if not math.isfinite(t):
        raise RuntimeError("temperature fit diverged")
    return t
