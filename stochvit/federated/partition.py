"""Seeded client partitions of a labelled set: IID, label-skewed Dirichlet(alpha), or label shards, with a JSON + PNG summary.

Written by hand, not with flwr-datasets' `IidPartitioner` / `DirichletPartitioner` / `ShardPartitioner`: those
partition a Hugging Face `datasets.Dataset` (flwr-datasets pulls in `datasets` and pyarrow, and would downgrade the
huggingface_hub that timm uses here), while stochvit keeps every dataset as an in-memory tensor. The semantics are theirs:

- `dirichlet:ALPHA` (Hsu et al. 2019; flwr-datasets' `DirichletPartitioner` defaults): for each class draw
  p ~ Dir(alpha * 1_N) over the N clients and deal that class's samples out in those proportions. The whole
  assignment is redrawn, at most MAX_REDRAWS times, until every client has `min_size` samples (default 10, as
  `min_partition_size`); then a UserError says what to change. `dirichlet:ALPHA:balanced` adds flwr-datasets'
  optional self-balancing (`self_balancing=True`): a client that already holds more than the average n / N gets no
  share of later classes.
- `shard:N` (McMahan et al. 2017, "pathological non-IID"): sort the samples by label, cut them into N x clients
  shards of consecutive samples (sizes differ by at most one, so every sample is used), give each client N shards
  at random. A client sees at most N classes when the shards are single-class.

Every scheme is a function of (labels, clients, spec, seed) only: the same seed gives the same shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import UserError
from ..runs import write_json

MAX_REDRAWS = 10
MIN_PARTITION_SIZE = 10
SPECS_HELP = "iid | dirichlet:ALPHA[:balanced] | shard:N"


class Spec(NamedTuple):
    kind: str  # "iid" | "dirichlet" | "shard"
    value: float | int | None = None  # alpha, or shards per client
    self_balancing: bool = False  # dirichlet only


def parse_partition(spec: str) -> Spec:
    """"iid"; "dirichlet:0.5" or "dirichlet:0.5:balanced" (self-balancing); "shard:2" (2 label shards per client)."""
    if spec == "iid":
        return Spec("iid")
    kind, _, rest = spec.partition(":")
    value, _, option = rest.partition(":")
    if kind == "dirichlet" and option in ("", "balanced"):
        try:
            alpha = float(value)
        except ValueError:
            alpha = -1.0
        if alpha > 0 and np.isfinite(alpha):
            return Spec("dirichlet", alpha, option == "balanced")
    if kind == "shard" and not option and value.isdigit() and int(value) >= 1:
        return Spec("shard", int(value))
    raise UserError(f"--partition {spec!r}: expected {SPECS_HELP} with ALPHA > 0 and N >= 1 (e.g. dirichlet:0.5, shard:2)")


def iid(n: int, clients: int, seed: int) -> list[np.ndarray]:
    """A seeded random split of range(n) into `clients` shards whose sizes differ by at most one."""
    _check(n, clients, 1)
    return [np.sort(s) for s in np.array_split(np.random.default_rng(seed).permutation(n), clients)]


def dirichlet(labels: np.ndarray, clients: int, alpha: float, seed: int, min_size: int = MIN_PARTITION_SIZE,
              self_balancing: bool = False) -> list[np.ndarray]:
    """Label-skewed shards: per class, proportions over clients drawn from Dir(alpha); smaller alpha, more skew."""
    labels = np.asarray(labels)
    _check(len(labels), clients, min_size)
    if not alpha > 0:
        raise UserError(f"Dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    average = len(labels) / clients
    for _ in range(1 + MAX_REDRAWS):
        shards: list[list[np.ndarray]] = [[] for _ in range(clients)]
        sizes = np.zeros(clients, dtype=int)
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(clients, alpha))
            if self_balancing:
                open_ = sizes <= average
                p = np.where(open_, p, 0.0)
                p = p / p.sum() if p.sum() > 0 else open_ / open_.sum()  # all of p on full clients: share evenly
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].append(part)
                sizes[k] += len(part)
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(s)) for s in shards]
    raise UserError(f"Dirichlet(alpha={alpha}) left a client with fewer than {min_size} samples in {1 + MAX_REDRAWS} draws "
                    f"(seed {seed}); use fewer clients, a larger alpha or a smaller minimum partition size")


def label_shards(labels: np.ndarray, clients: int, per_client: int, seed: int) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: label-sorted samples cut into clients x per_client shards, N at random each."""
    labels = np.asarray(labels)
    count = clients * per_client
    _check(len(labels), clients, 1)
    if len(labels) < count:
        raise UserError(f"{len(labels)} samples cannot be cut into {count} shards ({clients} clients x {per_client})")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]  # by label; random order within a class
    pieces = np.array_split(order, count)
    deal = rng.permutation(count).reshape(clients, per_client)
    return [np.sort(np.concatenate([pieces[i] for i in row])) for row in deal]


def _check(n: int, clients: int, min_size: int) -> None:
    if clients < 1:
        raise UserError(f"need at least one client, got {clients}")
    if n < clients * min_size:
        raise UserError(f"{n} samples cannot give {clients} clients {min_size} samples each")


def partition(labels: np.ndarray, clients: int, spec: str, seed: int, min_size: int = MIN_PARTITION_SIZE) -> list[np.ndarray]:
    """Shards of indices into `labels` for `spec` (see SPECS_HELP); each index lands in exactly one shard."""
    kind, value, balanced = parse_partition(spec)
    if kind == "iid":
        return iid(len(labels), clients, seed)
    if kind == "shard":
        return label_shards(labels, clients, int(value), seed)
    return dirichlet(labels, clients, float(value), seed, min_size, balanced)


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
