"""Seeded client partitions of a labelled set: IID, or label-skewed Dirichlet(alpha), with a JSON + PNG summary.

Written by hand, not with flwr-datasets' `IidPartitioner` / `DirichletPartitioner`: those partition a Hugging
Face `datasets.Dataset` (and flwr-datasets pulls in `datasets`, not installed here), while stochvit keeps every
dataset as an in-memory tensor. The Dirichlet scheme is theirs (Hsu et al. 2019, "Measuring the effects of
non-identical data distribution"): for each class draw p ~ Dir(alpha * 1_N) over the N clients and deal that
class's samples out in those proportions; redraw (up to a limit) until every client has `min_size` samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from ..runs import write_json

MAX_REDRAWS = 100


def parse_partition(spec: str) -> tuple[str, float | None]:
    """"iid" -> ("iid", None); "dirichlet:0.5" -> ("dirichlet", 0.5)."""
    if spec == "iid":
        return "iid", None
    kind, _, value = spec.partition(":")
    if kind == "dirichlet":
        try:
            alpha = float(value)
        except ValueError:
            alpha = -1.0
        if alpha > 0 and np.isfinite(alpha):
            return "dirichlet", alpha
    raise UserError(f"--partition {spec!r}: expected 'iid' or 'dirichlet:ALPHA' with ALPHA > 0 (e.g. dirichlet:0.5)")


def iid(n: int, clients: int, seed: int) -> list[np.ndarray]:
    """A seeded random split of range(n) into `clients` shards whose sizes differ by at most one."""
    _check(n, clients, 1)
    return [np.sort(s) for s in np.array_split(np.random.default_rng(seed).permutation(n), clients)]


def dirichlet(labels: np.ndarray, clients: int, alpha: float, seed: int, min_size: int = 2) -> list[np.ndarray]:
    """Label-skewed shards: per class, proportions over clients drawn from Dir(alpha); smaller alpha, more skew."""
    labels = np.asarray(labels)
    _check(len(labels), clients, min_size)
    if not alpha > 0:
        raise UserError(f"Dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    for _ in range(MAX_REDRAWS):
        shards: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * len(idx)).astype(int)
            for shard, part in zip(shards, np.split(idx, cuts)):
                shard.append(part)
        out = [np.sort(np.concatenate(s)) for s in shards]
        if min(len(s) for s in out) >= min_size:
            return out
    raise UserError(f"Dirichlet(alpha={alpha}) left a client with fewer than {min_size} samples in {MAX_REDRAWS} draws; "
                    f"use fewer clients or a larger alpha")


def _check(n: int, clients: int, min_size: int) -> None:
    if clients < 1:
        raise UserError(f"need at least one client, got {clients}")
    if n < clients * min_size:
        raise UserError(f"{n} samples cannot give {clients} clients {min_size} samples each")


def partition(labels: np.ndarray, clients: int, spec: str, seed: int, min_size: int = 2) -> list[np.ndarray]:
    """Shards of indices into `labels` for `spec` ("iid" or "dirichlet:ALPHA"); each index lands in exactly one shard."""
    kind, alpha = parse_partition(spec)
    if kind == "iid":
        return iid(len(labels), clients, seed)
    return dirichlet(labels, clients, alpha, seed, min_size)


def histogram(labels: np.ndarray, shards: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) sample counts."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[s], minlength=num_classes) for s in shards])


def label_skew(counts: np.ndarray) -> float:
    """Mean total-variation distance between each client's label distribution and the global one (0 = IID, -> 1)."""
    counts = np.asarray(counts, dtype=float)
    local = counts / counts.sum(1, keepdims=True).clip(min=1)
    pooled = counts.sum(0) / counts.sum()
    return float(0.5 * np.abs(local - pooled).sum(1).mean())


def save_summary(out: Path, labels: np.ndarray, shards: list[np.ndarray], class_names: list[str], spec: str, seed: int) -> dict:
    """partition.json (class histogram per client, skew) and partition.png (stacked bars); returns the summary."""
    counts = histogram(labels, shards, len(class_names))
    summary = dict(partition=spec, seed=seed, clients=len(shards), classes=class_names, sizes=[int(len(s)) for s in shards],
                   counts=counts.tolist(), label_skew=label_skew(counts))
    write_json(out / "partition.json", summary)
    _plot(out / "partition.png", counts, class_names, f"{spec} partition (label skew {summary['label_skew']:.2f})")
    return summary


def _plot(path: Path, counts: np.ndarray, class_names: list[str], title: str) -> None:
    from ..runs import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(counts) + 2), 3.6))
    bottom = np.zeros(len(counts))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for c, name in enumerate(class_names):
        ax.bar(range(len(counts)), counts[:, c], bottom=bottom, color=cmap(c % cmap.N), label=name)
        bottom += counts[:, c]
    ax.set_xticks(range(len(counts)))
    ax.set_xlabel("client (partition id)")
    ax.set_ylabel("training images")
    ax.set_title(title)
    if len(class_names) <= 20:
        ax.legend(fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
