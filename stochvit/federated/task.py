"""What the Flower client and server apps share: the model, a node's data, local training and evaluation.

The server sends the global weights (an `ArrayRecord` of the timm model's state dict) and the run's config.json
(a string in the `ConfigRecord`, under CONFIG_KEY), so every node builds exactly the server's architecture.
Stochastic layers have no parameters or buffers, so only learned weights travel; the draws stay on the client.

A node's data: its shard of the run's training split (`partition-id` / `num-partitions` from the node config,
set by the simulation engine or by `flower-supernode --node-config`), or, with node config `data=SPEC`
(and optionally `data-dir=...`), the whole training split of its own dataset. A seeded tenth of the local
data is held out for the evaluate handler.

Local training is the trainer's own epoch (`stochvit.train.train_one_epoch`) over the trainer's AdamW parameter
groups; a round restarts the optimiser, so the learning-rate schedule lives at round level (`round_lr`).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from ..data import DataBundle, ImageSet
from ..models import Normalized
from ..precision import default_device, resolve_precision
from ..runs import build_model, data_for
from ..train import TrainConfig, param_groups, train_one_epoch, validate
from .partition import partition

CONFIG_KEY = "stochvit-config"  # ConfigRecord entry holding the run's config.json
HOLDOUT = 0.1  # fraction of a node's data held out for its evaluate handler


# -- the model -----------------------------------------------------------------------------------------------------

def initial_model(config: dict) -> Normalized:
    """The global model before round 1: the run's architecture, initialised from the run's seed."""
    torch.manual_seed(config["train"]["seed"])
    return build_model(config)


def model_from(config: dict, arrays: ArrayRecord) -> nn.Module:
    """The run's model (pixel-space wrapper) carrying the given weights; strict: every key must match."""
    model = build_model(config)
    model.net.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model.to(default_device())


# -- a node's data -------------------------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def _bundle(train_json: str) -> DataBundle:
    """The run's data, decoded once per process (a simulation actor serves many rounds and clients)."""
    return data_for({"train": json.loads(train_json)})


@lru_cache(maxsize=4)
def _shards(train_json: str, clients: int, spec: str, seed: int) -> tuple[np.ndarray, ...]:
    labels = _bundle(train_json).train.labels.numpy()
    return tuple(partition(labels, clients, spec, seed))


def local_data(config: dict, node_config: dict[str, Any]) -> tuple[ImageSet, ImageSet]:
    """(train, held-out) sets of this node: its partition of the run's training split, or its own data."""
    train = config["train"]
    train_json = json.dumps(train, sort_keys=True)
    if node_config.get("data"):
        kwargs = config["model"]["kwargs"]
        bundle = data_for({"train": train, "model": {"kwargs": kwargs}}, str(node_config["data"]),
                          str(node_config.get("data-dir") or "") or None)
        idx, seed = np.arange(len(bundle.train)), train["seed"]
        pool = bundle.train
    else:
        fed = config["federated"]
        pid = int(node_config["partition-id"])
        clients = int(node_config.get("num-partitions", fed["clients"]))
        if not 0 <= pid < clients:
            raise ValueError(f"partition-id={pid} is outside 0..{clients - 1}")
        pool = _bundle(train_json).train
        idx = _shards(train_json, clients, fed["partition"], train["seed"])[pid]
        seed = train["seed"] + pid
    idx = np.random.default_rng(seed).permutation(idx)
    held = max(1, int(round(HOLDOUT * len(idx)))) if len(idx) > 1 else 0
    return pool.subset(np.sort(idx[held:]), pool.transform), pool.subset(np.sort(idx[:held]))


# -- training and evaluation ---------------------------------------------------------------------------------------

def round_lr(lr: float, server_round: int, rounds: int) -> float:
    """Cosine decay over rounds (the client optimiser restarts every round, so the schedule lives at round level)."""
    return lr * 0.5 * (1 + math.cos(math.pi * (server_round - 1) / max(1, rounds)))


def train(model: nn.Module, data: ImageSet, cfg: TrainConfig, seed: int) -> dict[str, float]:
    """`cfg.epochs` local epochs of the trainer's AdamW at a constant `cfg.lr`; seeded (shuffle, augmentation, draws).

    Returns the mean train loss and accuracy over every image seen (Flower metric names).
    """
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    precision = resolve_precision(cfg.precision, device, model)  # once, not per batch
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    epochs = [train_one_epoch(model, loader, opt, loss_fn=loss_fn, precision=precision, clip_grad=cfg.clip_grad)
              for _ in range(cfg.epochs)]
    images = sum(e["images"] for e in epochs)
    return {"train-loss": sum(e["train_loss"] * e["images"] for e in epochs) / images,
            "train-accuracy": sum(e["train_accuracy"] * e["images"] for e in epochs) / images}


def evaluate(model: nn.Module, data: ImageSet, precision: str, seed: int) -> dict[str, float]:
    """Single-pass accuracy, NLL, ECE and Brier of `model` on `data`, with seeded stochastic draws."""
    torch.manual_seed(seed)
    return validate(model, data, precision)


def local_update(config: dict, arrays: ArrayRecord, node_config: dict[str, Any], server_round: int) -> tuple[ArrayRecord, dict]:
    """One client's round: the global weights trained on local data; (new weights, metrics with num-examples)."""
    t = config["train"]
    data, _ = local_data(config, node_config)
    model = model_from(config, arrays)
    cfg = replace(TrainConfig(**t), lr=round_lr(t["lr"], server_round, config["federated"]["rounds"]))
    seed = t["seed"] * 1_000_003 + server_round * 1_009 + int(node_config.get("partition-id", 0))
    metrics = train(model, data, cfg, seed)
    return ArrayRecord(model.net.state_dict()), {**metrics, "num-examples": len(data)}
