"""Client partitions (stochvit.federated.partition) against flwr-datasets' semantics and the Dirichlet distribution:
minimum size by redrawing, seeded reproducibility, self-balancing, shares distributed as Dir(alpha), label shards."""

from __future__ import annotations

import numpy as np
import pytest

from stochvit.data import load_data
from stochvit.errors import UserError
from stochvit.eval.stats import Scores, interval
from stochvit.federated.partition import (
    MAX_REDRAWS,
    Spec,
    dirichlet,
    histogram,
    iid,
    label_shards,
    label_skew,
    parse_partition,
    partition,
)
from stochvit.federated.settings import from_run_config, to_run_config
from stochvit.train import TrainConfig


@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    return load_data("digits").train.labels.numpy()


def assigned_once(shards: list[np.ndarray], n: int) -> bool:
    joined = np.concatenate(shards)
    return len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def test_parse_partition_specs():
    assert parse_partition("iid") == Spec("iid")
    assert parse_partition("dirichlet:0.5") == Spec("dirichlet", 0.5, False)
    assert parse_partition("dirichlet:0.5:balanced") == Spec("dirichlet", 0.5, True)
    assert parse_partition("shard:2") == Spec("shard", 2)
    for bad in ("shard", "shard:0", "shard:-1", "shard:1.5", "shard:x", "shard:2:unbalanced", "dirichlet:0.5:unbalanced",
                "dirichlet:inf"):
        with pytest.raises(UserError, match="--partition"):
            parse_partition(bad)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-3)
    assert from_run_config(to_run_config(cfg, {"partition": "shard:2"}))[1]["partition"] == "shard:2"
    with pytest.raises(UserError):
        from_run_config(to_run_config(cfg, {"partition": "shard:0"}))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3", "dirichlet:0.3:balanced", "shard:2"])
def test_every_scheme_is_seeded_and_assigns_every_sample_once(digits_labels, spec):
    a = partition(digits_labels, 6, spec, seed=3)
    b = partition(digits_labels, 6, spec, seed=3)
    c = partition(digits_labels, 6, spec, seed=4)
    assert assigned_once(a, len(digits_labels)) and assigned_once(c, len(digits_labels))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_redraws_until_every_client_has_the_minimum(digits_labels):
    first = dirichlet(digits_labels, 10, 0.1, seed=0, min_size=0, self_balancing=True)  # the first draw, accepted as it is
    assert min(len(s) for s in first) < 60
    redrawn = dirichlet(digits_labels, 10, 0.1, seed=0, min_size=60, self_balancing=True)
    assert min(len(s) for s in redrawn) >= 60 and assigned_once(redrawn, len(digits_labels))
    for seed in range(1, 6):
        assert min(len(s) for s in dirichlet(digits_labels, 10, 0.1, seed)) >= 10  # the default minimum (flwr-datasets')
    # an unreachable minimum fails after a bounded number of draws, saying what to change
    two_classes = np.repeat([0, 1], 100)
    with pytest.raises(UserError, match=f"{1 + MAX_REDRAWS} draws.*larger alpha"):
        dirichlet(two_classes, 10, 0.01, seed=0, min_size=15)
    with pytest.raises(UserError, match="cannot give"):
        dirichlet(two_classes, 10, 1.0, seed=0, min_size=21)


def test_self_balancing_caps_clients_near_the_average(digits_labels):
    """A client above n / N gets no share of later classes, so it ends below n / N + the largest class."""
    n, clients = len(digits_labels), 10
    cap = n / clients + np.bincount(digits_labels).max()
    balanced = [max(map(len, dirichlet(digits_labels, clients, 0.1, s, min_size=1, self_balancing=True))) for s in range(5)]
    plain = [max(map(len, dirichlet(digits_labels, clients, 0.1, s, min_size=1, self_balancing=False))) for s in range(5)]
    assert max(balanced) <= cap < max(plain)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 5.0])
def test_unbalanced_shares_follow_the_dirichlet(alpha):
    """A class's share on one client is Beta(alpha, (N-1) alpha): sum_k (share_k - 1/N)^2 has mean (1 - 1/N) / (N alpha + 1)."""
    classes, per_class, clients = 300, 400, 5
    labels = np.repeat(np.arange(classes), per_class)
    counts = histogram(labels, dirichlet(labels, clients, alpha, seed=1, min_size=0, self_balancing=False), classes)
    shares = counts.T / per_class  # (classes, clients)
    spread = ((shares - 1 / clients) ** 2).sum(1)  # independent over classes
    low, high = interval(Scores.per_image(spread), n_boot=2000, seed=0)
    expected = (1 - 1 / clients) / (clients * alpha + 1)
    assert low <= expected <= high, (low, expected, high)
    assert high - low < 0.3 * expected  # tight enough to tell alpha=0.1 (0.53) from 0.5 (0.23) and 5 (0.03)


def classes_holding_90_percent(counts: np.ndarray) -> np.ndarray:
    """Per client, how many of its largest classes it takes to reach 90% of its samples."""
    c = np.sort(counts, 1)[:, ::-1]
    return (np.cumsum(c, 1) < 0.9 * c.sum(1, keepdims=True)).sum(1) + 1


def test_large_alpha_is_near_iid_small_alpha_concentrates(digits_labels):
    n, clients = len(digits_labels), 10
    near_iid = histogram(digits_labels, dirichlet(digits_labels, clients, 1000.0, 0), 10)
    assert label_skew(near_iid) < 1.5 * label_skew(histogram(digits_labels, iid(n, clients, 0), 10))  # sampling noise only
    assert classes_holding_90_percent(near_iid).min() >= 8  # as IID: 9 of the 10 classes
    # alpha -> 0 gives each class to one client: a client holds Binomial(10, 1/10) classes, 3 or fewer with p = 0.99
    k = np.concatenate([classes_holding_90_percent(histogram(digits_labels, dirichlet(
        digits_labels, clients, 0.05, seed, min_size=0, self_balancing=False), 10)) for seed in range(5)])
    assert (k <= 3).mean() >= 0.75 and np.median(k) <= 2, np.bincount(k)


def test_label_shards_give_each_client_at_most_n_classes():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 60))  # 20 single-class shards of 30
    for per_client in (1, 2):
        shards = label_shards(labels, 20 // per_client, per_client, seed=0)
        assert assigned_once(shards, len(labels))
        assert all(len(s) == 30 * per_client for s in shards)
        assert all(len(np.unique(labels[s])) <= per_client for s in shards)
    with pytest.raises(UserError, match="shards"):
        label_shards(labels, 400, 2, seed=0)


def test_label_shards_on_unequal_classes(digits_labels):
    """Class sizes are not multiples of the shard size: a shard may straddle two neighbouring classes, never more."""
    shards = partition(digits_labels, 10, "shard:2", seed=0)
    assert assigned_once(shards, len(digits_labels))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 2  # shard sizes differ by at most one
    seen = [len(np.unique(digits_labels[s])) for s in shards]
    assert max(seen) <= 4 and np.mean(seen) < 3.5, seen
    skew = label_skew(histogram(digits_labels, shards, 10))
    assert skew > label_skew(histogram(digits_labels, partition(digits_labels, 10, "dirichlet:0.5", 0), 10))
