"""Classification and calibration metrics on predicted probabilities.

ECE comes from torchmetrics; NLL, Brier and accuracy are one-line closed forms.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_calibration_error

ECE_BINS = 15


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """accuracy, NLL, Brier (sum over classes, mean over images) and ECE (15 bins, L1) of (N, C) probs."""
    probs = probs.float()
    n, c = probs.shape
    eps = torch.finfo(torch.float32).tiny
    onehot = torch.nn.functional.one_hot(labels, c).float()
    return dict(
        accuracy=(probs.argmax(1) == labels).float().mean().item(),
        nll=-probs.gather(1, labels[:, None]).clamp_min(eps).log().mean().item(),
        brier=(probs - onehot).pow(2).sum(1).mean().item(),
        ece=multiclass_calibration_error(probs, labels, num_classes=c, n_bins=ECE_BINS, norm="l1").item(),
    )


def mc_metrics(pass_probs: torch.Tensor, labels: torch.Tensor, metric_fn=classification_metrics) -> dict[str, dict]:
    """Metrics of K passes (K, N, C): single-pass mean and std over passes, and of the K-sample average."""
    per_pass = [metric_fn(p, labels) for p in pass_probs]
    single = {k: torch.tensor([m[k] for m in per_pass]) for k in per_pass[0]}
    return dict(
        samples=len(pass_probs),
        single_pass={k: dict(mean=v.mean().item(), std=v.std().item() if len(v) > 1 else 0.0) for k, v in single.items()},
        mc_average=metric_fn(pass_probs.mean(0), labels),
    )
