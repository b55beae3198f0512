"""The Flower `ClientApp`: local training and evaluation of any stochvit model on this node's data.

The server sends the global weights (an `ArrayRecord` of the timm model's state dict) and the run's config.json
(a string in the `ConfigRecord`), so every node builds exactly the server's architecture. Stochastic layers have
no parameters or buffers, so only learned weights travel; the random draws are made, and stay, on the client.

A node's data: its shard of the run's training split (`partition-id` / `num-partitions` from the node config,
set by the simulation engine or by `flower-supernode --node-config`), or, with node config `data=SPEC`
(and optionally `data-dir=...`), the whole training split of its own dataset. A seeded tenth of the local
data is held out for the evaluate handler.

The local loop is written here rather than reusing `stochvit.train.train`, which owns a whole run directory
(checkpoints, schedule, curves); a round needs a few epochs of AdamW on an in-memory shard and nothing else.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from ..data import DataBundle, ImageSet
from ..eval.metrics import classification_metrics
from ..precision import autocast, default_device, resolve_precision
from ..predict import dataset_probs
from ..runs import build_model, data_for
from .partition import partition

CONFIG_KEY = "stochvit-config"  # ConfigRecord entry holding the run's config.json
HOLDOUT = 0.1

app = ClientApp()


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


def model_from(config: dict, arrays: ArrayRecord) -> nn.Module:
    """The run's model (pixel-space wrapper) carrying the given weights; strict: every key must match."""
    model = build_model(config)
    model.net.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model.to(default_device())


def round_lr(lr: float, server_round: int, rounds: int) -> float:
    """Cosine decay over rounds (the client optimiser restarts every round, so the schedule lives at round level)."""
    return lr * 0.5 * (1 + math.cos(math.pi * (server_round - 1) / max(1, rounds)))


def fit(model: nn.Module, data: ImageSet, epochs: int, batch_size: int, lr: float, weight_decay: float,
        clip_grad: float | None, precision: str, seed: int) -> dict[str, float]:
    """Local AdamW epochs from the global weights; seeded (shuffling, augmentation and stochastic draws)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device, model)  # once, not per batch
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n and "token" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n and "token" not in n)]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)], lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    seen, loss_sum, correct = 0, 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with autocast(precision, device, model):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            opt.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
    return {"train-loss": loss_sum / seen, "train-accuracy": correct / seen}


def _setup(msg: Message) -> tuple[dict, ArrayRecord, ConfigRecord]:
    torch.set_num_threads(1)  # nodes share the host's cores (simulation actors, loopback SuperNodes)
    cfg_record = msg.content["config"]
    return json.loads(str(cfg_record[CONFIG_KEY])), msg.content["arrays"], cfg_record


def local_update(config: dict, arrays: ArrayRecord, node_config: dict[str, Any], server_round: int) -> tuple[ArrayRecord, dict]:
    """One client's round: the global weights trained on local data; (new weights, metrics with num-examples)."""
    t = config["train"]
    data, _ = local_data(config, node_config)
    model = model_from(config, arrays)
    seed = t["seed"] * 1_000_003 + server_round * 1_009 + int(node_config.get("partition-id", 0))
    metrics = fit(model, data, t["epochs"], t["batch_size"], round_lr(t["lr"], server_round, config["federated"]["rounds"]),
                  t["weight_decay"], t["clip_grad"], t["precision"], seed)
    return ArrayRecord(model.net.state_dict()), {**metrics, "num-examples": len(data)}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on local data; reply with the new weights and `num-examples` for FedAvg."""
    config, arrays, cfg_record = _setup(msg)
    new, metrics = local_update(config, arrays, context.node_config, int(cfg_record["server-round"]))
    return Message(content=RecordDict({"arrays": new, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Single-pass accuracy, NLL and ECE of the global model on this node's held-out data."""
    config, arrays, _ = _setup(msg)
    _, held = local_data(config, context.node_config)
    model = model_from(config, arrays)
    torch.manual_seed(config["train"]["seed"])
    probs, labels = dataset_probs(model, held, 1, precision=config["train"]["precision"])
    m = classification_metrics(probs[0], labels)
    reply = RecordDict({"metrics": MetricRecord({"accuracy": m["accuracy"], "nll": m["nll"], "ece": m["ece"],
                                                 "num-examples": len(held)})})
    return Message(content=reply, reply_to=msg)
