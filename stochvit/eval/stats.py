"""Paired comparisons with confidence intervals, and the verdicts they support.

Every comparison is method minus baseline on the *same* test images. The evidence of one run for one metric is a
`Scores`: a function of bootstrap weights over the test images, so that non-additive metrics (ECE) are recomputed
on every resample instead of being treated as means of per-image numbers.

The interval (95% by default), chosen by how many training seeds each side has:

- **one run per side**: a paired percentile bootstrap over test images (both runs see the same resampled images).
  It covers test-set sampling only; `Comparison.seeds` says so, and a one-seed verdict is marked as such.
- **several seeds**: a t-interval whose units are the seeds, the units of replication of training. With the same
  seeds on both sides the per-seed differences are paired (runs with one seed share initialisation and data order);
  otherwise Welch's interval. Because every seed is scored on one fixed test set, the seed spread cannot show the
  test set's own sampling error, so the paired image-bootstrap variance of the seed-averaged difference is added.
  This counts each run's image noise twice, on purpose: the interval errs wide, never narrow (coverage is tested).
  A resampling of seeds was not used: with 3 seeds a bootstrap has 10 distinct means and under-covers.

Hand-written because scipy's `bootstrap` resamples one statistic of arrays, not a weighted ECE over runs that share
their test images, and no library computes the seed-plus-image interval; scipy supplies the t quantiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import stats as scipy_stats

from .metrics import ECE_BINS

HIGHER_IS_BETTER = {"accuracy": True, "nll": False, "brier": False, "ece": False, "robust_accuracy": True,
                    "psnr": True, "ssim": True, "auroc": True, "aurc": False}
PROB_METRICS = ("accuracy", "nll", "brier", "ece")
VERDICTS = ("better", "worse", "no difference detected")


def _weighted_mean(values: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(N,) values, (B, N) weights -> (B,) weighted means."""
    return (w @ values.double()) / w.sum(1)


def weighted_ece(conf: torch.Tensor, correct: torch.Tensor, w: torch.Tensor, n_bins: int = ECE_BINS) -> torch.Tensor:
    """ECE (equal-width bins, L1, torchmetrics' binning) of each row of bootstrap weights: (B,) from (N,), (N,), (B, N)."""
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    idx = (torch.bucketize(conf.contiguous(), edges, right=True) - 1).clamp(0, n_bins - 1)
    onehot = torch.nn.functional.one_hot(idx, n_bins).double()  # (N, bins)
    w = w.double()
    gap = (w @ (onehot * correct.double()[:, None]) - w @ (onehot * conf.double()[:, None])).abs()  # per-bin |acc - conf| mass
    return gap.sum(1) / w.sum(1)


def _per_image(metric: str, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    probs = probs.float()
    if metric == "accuracy":
        return (probs.argmax(1) == labels).double()
    if metric == "nll":
        return -probs.gather(1, labels[:, None]).squeeze(1).clamp_min(torch.finfo(torch.float32).tiny).log().double()
    if metric == "brier":
        return (probs - torch.nn.functional.one_hot(labels, probs.shape[1]).float()).pow(2).sum(1).double()
    raise ValueError(f"metric {metric!r} is not additive over images")


class Scores:
    """One run's evidence for one metric: its value under bootstrap weights over the N shared test images."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], n: int) -> None:
        self.fn, self.n = fn, n

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return self.fn(w)

    def value(self) -> float:
        return float(self.fn(torch.ones(1, self.n, dtype=torch.float64))[0])

    @classmethod
    def per_image(cls, values: torch.Tensor | np.ndarray) -> Scores:
        """Metrics that are means over images (robust accuracy, PSNR). (K, N) values are averaged over the K passes."""
        v = torch.as_tensor(values, dtype=torch.float64)
        v = v.mean(0) if v.dim() == 2 else v
        if v.dim() != 1 or not torch.isfinite(v).all():
            raise ValueError("per-image values must be finite, shape (N,) or (K, N)")
        return cls(lambda w: _weighted_mean(v, w), len(v))

    @classmethod
    def from_probs(cls, metric: str, probs: torch.Tensor, labels: torch.Tensor) -> Scores:
        """accuracy, NLL, Brier or ECE of (N, C) probabilities, or the mean over passes of (K, N, C) ones (single pass)."""
        if metric not in PROB_METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {PROB_METRICS}")
        passes = probs[None] if probs.dim() == 2 else probs
        if metric == "ece":
            pairs = [p.float().max(1) for p in passes]
            cc = [(conf, (pred == labels).double()) for conf, pred in pairs]
            return cls(lambda w: torch.stack([weighted_ece(c, k, w) for c, k in cc]).mean(0), len(labels))
        values = torch.stack([_per_image(metric, p, labels) for p in passes])
        return cls.per_image(values)


@dataclass(frozen=True)
class Comparison:
    """method - baseline for one metric, its interval and the verdict it supports."""

    metric: str
    method: str
    baseline: str
    method_value: float
    baseline_value: float
    difference: float
    low: float
    high: float
    seeds: tuple[int, int]
    interval: str
    higher_is_better: bool
    level: float = 0.95

    @property
    def half_width(self) -> float:
        """The smallest effect this comparison could have detected (about: an effect this large excludes 0)."""
        return (self.high - self.low) / 2

    @property
    def verdict(self) -> str:
        if self.low > 0 or self.high < 0:
            return VERDICTS[0] if (self.low > 0) == self.higher_is_better else VERDICTS[1]
        return VERDICTS[2]

    def verdict_text(self) -> str:
        """The verdict in words, with the detectable effect when there is none, and a one-seed caveat."""
        text = self.verdict
        if text == VERDICTS[2]:
            text += f" (smallest detectable {self.half_width:.3g})"
        if max(self.seeds) == 1:
            text += ", 1 seed"
        elif min(self.seeds) == 1:
            text += ", one side 1 run"  # an ensemble, or a method with one seed so far: its spread is borrowed
        return text

    def as_dict(self) -> dict:
        return dict(asdict(self), half_width=self.half_width, verdict=self.verdict, verdict_text=self.verdict_text())


def bootstrap_weights(n: int, n_boot: int, seed: int) -> torch.Tensor:
    """(n_boot, n) multinomial resampling counts: row b says how often each image is drawn in resample b."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64))


def _mean_scores(group: Sequence[Scores], w: torch.Tensor) -> torch.Tensor:
    return torch.stack([s(w) for s in group]).mean(0)


def compare(method: Sequence[Scores], baseline: Sequence[Scores], metric: str, method_name: str = "method",
            baseline_name: str = "baseline", higher_is_better: bool | None = None, level: float = 0.95,
            n_boot: int = 2000, seed: int = 0, paired: bool = True, same_seeds: bool = True) -> Comparison:
    """Compare runs of a method with runs of a baseline (one `Scores` per seed), see the module docstring.

    `paired=False` resamples the two sides' images independently (for test sets that are not shared: it is wider on
    the same data). `same_seeds` pairs the per-seed differences when both sides have the same number of seeds.
    """
    if not method or not baseline:
        raise ValueError("compare needs at least one run on each side")
    n = method[0].n
    if any(s.n != n for s in [*method, *baseline]) and paired:
        raise ValueError("paired comparison needs the same test images on both sides")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    if higher_is_better is None:
        if metric not in HIGHER_IS_BETTER:
            raise ValueError(f"say whether higher {metric!r} is better")
        higher_is_better = HIGHER_IS_BETTER[metric]
    m_vals = np.array([s.value() for s in method])
    b_vals = np.array([s.value() for s in baseline])
    diff = float(m_vals.mean() - b_vals.mean())
    boot = _boot_differences(method, baseline, n_boot, seed, paired)
    nm, nb = len(method), len(baseline)
    alpha = 1 - level
    if nm == 1 and nb == 1:
        low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
        how = f"{'paired' if paired else 'unpaired'} percentile bootstrap over {n} test images ({n_boot} resamples)"
    else:
        seed_var, df, how = _seed_variance(m_vals, b_vals, same_seeds)
        se = math.sqrt(seed_var + float(np.var(boot, ddof=1)))
        t = float(scipy_stats.t.ppf(1 - alpha / 2, df))
        low, high = diff - t * se, diff + t * se
        how += f", plus the image-bootstrap variance over {n} test images"
    return Comparison(metric, method_name, baseline_name, float(m_vals.mean()), float(b_vals.mean()), diff,
                      float(low), float(high), (nm, nb), how, bool(higher_is_better), level)


def _boot_differences(method: Sequence[Scores], baseline: Sequence[Scores], n_boot: int, seed: int,
                      paired: bool, chunk: int = 500) -> np.ndarray:
    out = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        w = bootstrap_weights(method[0].n, b, seed + start)
        w_base = w if paired else bootstrap_weights(baseline[0].n, b, seed + start + 7_919_000)
        out.append((_mean_scores(method, w) - _mean_scores(baseline, w_base)).numpy())
    return np.concatenate(out)


def _seed_variance(m: np.ndarray, b: np.ndarray, same_seeds: bool) -> tuple[float, float, str]:
    """Variance of the seed-averaged difference from the seed spread, its degrees of freedom, and how."""
    nm, nb = len(m), len(b)
    if same_seeds and nm == nb:
        d = m - b
        return float(np.var(d, ddof=1) / nm), nm - 1, f"t-interval over {nm} per-seed paired differences"
    if min(nm, nb) == 1:  # one side has one run (an ensemble): assume its seed spread equals the other side's
        many = m if nm > 1 else b
        s2 = float(np.var(many, ddof=1))
        return s2 / nm + s2 / nb, len(many) - 1, f"t-interval, {nm} vs {nb} seeds with the seed spread of the {len(many)}"
    vm, vb = np.var(m, ddof=1) / nm, np.var(b, ddof=1) / nb
    df = (vm + vb) ** 2 / (vm**2 / (nm - 1) + vb**2 / (nb - 1)) if vm + vb > 0 else min(nm, nb) - 1
    return float(vm + vb), float(df), f"Welch t-interval over {nm} vs {nb} seeds"


def compare_probs(method: Sequence[torch.Tensor], baseline: Sequence[torch.Tensor], labels: torch.Tensor,
                  metrics: Sequence[str] = PROB_METRICS, **kwargs) -> list[Comparison]:
    """`compare` for each metric of per-seed probabilities ((N, C), or (K, N, C) for single-pass metrics)."""
    return [compare([Scores.from_probs(m, p, labels) for p in method], [Scores.from_probs(m, p, labels) for p in baseline],
                    m, **kwargs) for m in metrics]


def comparison_table(rows: Sequence[Comparison], digits: int = 4) -> str:
    """Markdown: method, baseline, both values, difference [95% CI], seeds, verdict."""
    head = "| metric | method | baseline | method value | baseline value | difference [95% CI] | seeds | verdict |"
    lines = [head, "|" + "---|" * 8]
    for c in rows:
        f = f"{{:.{digits}f}}"
        lines.append(f"| {c.metric} | {c.method} | {c.baseline} | {f.format(c.method_value)} | {f.format(c.baseline_value)} | "
                     f"{c.difference:+.{digits}f} [{c.low:+.{digits}f}, {c.high:+.{digits}f}] | {c.seeds[0]} vs {c.seeds[1]} | "
                     f"**{c.verdict_text()}** |")
    return "\n".join(lines) + "\n"


def interval(scores: Scores, level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of one run's metric value over its test images (test-set sampling only).

    For the error bars of a single method's value; a difference between methods needs `compare` (paired).
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    vals = np.concatenate([scores(bootstrap_weights(scores.n, min(500, n_boot - start), seed + start)).numpy()
                           for start in range(0, n_boot, 500)])
    low, high = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
