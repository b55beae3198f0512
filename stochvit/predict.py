"""Monte Carlo prediction: softmax probabilities of K stochastic passes, batched when possible."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .layers import StochasticLinear, is_random, random_modules


def passes_can_batch(model: nn.Module) -> bool:
    """Repeating images along the batch gives independent draws unless a layer shares one per batch."""
    return not any(isinstance(m, StochasticLinear) and m.sharing == "batch" for m in random_modules(model))


@torch.no_grad()
def sample_probs(model: nn.Module, x: torch.Tensor, samples: int = 1, max_batch: int = 1024) -> torch.Tensor:
    """Softmax probabilities of `samples` passes, shape (K, B, classes), float32.

    A deterministic model gets one pass (K=1), whatever `samples` says. Passes are run together
    (images repeated along the batch) in chunks of at most `max_batch` images.
    """
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    k = samples if is_random(model) else 1
    b = x.shape[0]
    per_chunk = max(1, max_batch // max(b, 1)) if passes_can_batch(model) else 1
    out = []
    done = 0
    while done < k:
        n = min(per_chunk, k - done)
        logits = model(x.repeat(n, *([1] * (x.dim() - 1))))
        out.append(logits.float().softmax(-1).view(n, b, -1))
        done += n
    return torch.cat(out)


def predict_proba(model: nn.Module, x: torch.Tensor, samples: int = 1, max_batch: int = 1024) -> torch.Tensor:
    """Class probabilities averaged over `samples` stochastic passes, shape (B, classes)."""
    return sample_probs(model, x, samples, max_batch).mean(0)


@torch.no_grad()
def dataset_probs(
    model: nn.Module, dataset: torch.utils.data.Dataset, samples: int = 1, batch_size: int = 256, precision: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pass probabilities over a whole dataset: ((K, N, classes), labels (N,))."""
    from .precision import autocast

    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    probs, labels = [], []
    was_training = model.training
    model.eval()
    with autocast(precision, device, model):
        for x, y in loader:
            probs.append(sample_probs(model, x.to(device), samples).cpu())
            labels.append(y)
    model.train(was_training)
    return torch.cat(probs, dim=1), torch.cat(labels)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw the stochastic layers' samples from `seed`, restoring the caller's random state afterwards."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        torch.manual_seed(seed)
        yield
