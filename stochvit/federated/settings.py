"""The Flower run config of the stochvit app: flat `key = value` pairs (all TOML scalars), to and from `TrainConfig`.

Flower passes run settings as a flat dict of scalars (`[tool.flwr.app.config]` in app/pyproject.toml, overridden
with `flwr run --run-config`); this module is the one mapping between that dict and stochvit's `TrainConfig`
plus the federated settings. `None` travels as "" (strings) or 0 (numbers) because TOML has no null.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from ..defaults import DEFAULT_LAYER, LayerConfig
from ..errors import UserError
from ..train import TrainConfig
from .partition import parse_partition

# run-config key -> TrainConfig field (local-epochs: epochs of local training per round)
TRAIN_KEYS = {
    "data": "data", "data-dir": "data_dir", "split-seed": "split_seed", "train-limit": "train_limit", "img-size": "img_size",
    "model": "model", "act": "act", "drop-rate": "drop_rate", "mc-dropout": "mc_dropout", "local-epochs": "epochs",
    "batch-size": "batch_size", "lr": "lr", "weight-decay": "weight_decay", "clip-grad": "clip_grad", "seed": "seed",
    "precision": "precision", "eval-samples": "eval_samples", "log": "log",
}
NULLABLE = {"data_dir": "", "train_limit": 0, "img_size": 0, "clip_grad": 0.0, "log": ""}
STOCHASTIC_KEYS = tuple(f.name for f in fields(LayerConfig))  # the layer's keys: LayerConfig's fields

# federated settings and their defaults (also the defaults in app/pyproject.toml, which a test keeps in sync)
FEDERATED_DEFAULTS: dict[str, Any] = {
    "out-dir": "runs/federated",  # where the ServerApp writes the run directory (absolute paths are safest)
    "clients": 2,  # expected SuperNodes: round 1 waits up to wait-for-clients seconds for them
    "partition": "iid",  # iid | dirichlet:ALPHA[:balanced] | shard:N
    "rounds": 3,
    "server-lr": 1.0,  # FedAvgM's server learning rate: new = old - server-lr * momentum buffer (1.0 and 0.0: FedAvg)
    "server-momentum": 0.0,  # FedAvgM's server momentum on the averaged update (Hsu et al. 2019)
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "min-clients": 2,  # fewest nodes a round needs (FedAvg min_train_nodes / min_available_nodes)
    "wait-for-clients": 120,
    "round-timeout": 3600,
}
# run-config keys that steer one submission but are not the run's settings: never in a run's config.json
CONTROL_DEFAULTS: dict[str, Any] = {
    "resume": False,  # continue the interrupted run in out-dir from its last finished round (its checkpoint)
    "fail-from-round": 0,  # testing hook: every client's training fails from this round on (0: never)
}


def to_run_config(cfg: TrainConfig, federated: dict[str, Any]) -> dict[str, Any]:
    """Flat run config for `flwr run --run-config` from a TrainConfig and federated settings."""
    unknown = set(federated) - set(FEDERATED_DEFAULTS) - set(CONTROL_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown federated settings {sorted(unknown)}")
    values = asdict(cfg.resolved())
    rc: dict[str, Any] = {}
    for key, name in TRAIN_KEYS.items():
        v = values[name]
        rc[key] = NULLABLE[name] if v is None and name in NULLABLE else v
    st = cfg.stochastic
    rc["stochastic"] = st is not None
    for key in STOCHASTIC_KEYS:
        v = (st or DEFAULT_LAYER.to_dict())[key]
        rc[key] = ",".join(map(str, v)) if key == "blocks" and v is not None else ("" if v is None else v)
    return {**rc, **FEDERATED_DEFAULTS, **CONTROL_DEFAULTS, **federated}


def from_run_config(rc: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """TrainConfig (validated) and federated settings from a flat run config; missing keys take the defaults."""
    defaults = to_run_config(TrainConfig(epochs=1, batch_size=64, lr=3e-3), {})
    unknown = set(rc) - set(defaults)
    if unknown:
        raise UserError(f"unknown run-config keys {sorted(unknown)}; known: {sorted(defaults)}")
    rc = {**defaults, **rc}
    kwargs = {}
    for key, name in TRAIN_KEYS.items():
        v = rc[key]
        kwargs[name] = None if name in NULLABLE and v == NULLABLE[name] else v
    if rc["stochastic"]:
        blocks = str(rc["blocks"]).strip()
        try:
            block_list = [int(b) for b in blocks.split(",") if b.strip()] if blocks else None
        except ValueError:
            raise UserError(f"run-config blocks={blocks!r}: expected comma-separated integers") from None
        kwargs["stochastic"] = {k: rc[k] for k in STOCHASTIC_KEYS if k != "blocks"} | {"blocks": block_list}
    else:
        kwargs["stochastic"] = None
    cfg = TrainConfig(**kwargs)
    cfg.validate()
    fed = {k: rc[k] for k in FEDERATED_DEFAULTS}
    checks = [("clients", fed["clients"] >= 1), ("rounds", fed["rounds"] >= 1), ("min-clients", fed["min-clients"] >= 1),
              ("fraction-train", 0 < fed["fraction-train"] <= 1), ("fraction-evaluate", 0 <= fed["fraction-evaluate"] <= 1),
              ("min-clients", fed["min-clients"] <= fed["clients"]), ("server-lr", fed["server-lr"] > 0),
              ("server-momentum", 0 <= fed["server-momentum"] < 1)]
    for name, ok in checks:
        if not ok:
            raise UserError(f"invalid {name}={fed[name]} (clients={fed['clients']})")
    if not isinstance(rc["resume"], bool):
        raise UserError(f"invalid resume={rc['resume']!r}: true or false")
    fail = rc["fail-from-round"]
    if isinstance(fail, bool) or not isinstance(fail, int) or fail < 0:
        raise UserError(f"invalid fail-from-round={fail!r}: a round number >= 1, or 0 (a testing hook)")
    parse_partition(fed["partition"])
    return cfg, fed
