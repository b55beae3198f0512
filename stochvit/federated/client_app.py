"""The Flower `ClientApp`: local training and evaluation of any stochvit model on this node's data.

The handlers only unpack and pack Flower messages; the model, the node's data and the local fit are in
`stochvit.federated.task`, shared with the ServerApp.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import task

app = ClientApp()


def fail_from_round(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Testing hook, a Flower mod around the train handler: with the run-config key `fail-from-round` = N > 0
    (`stochvit federated --fail-from-round N`, hidden), every client's training fails from round N on.

    A run-config key, not a Python callback, because the ClientApp runs in Flower's own processes (Ray actors).
    """
    fail_from = int(context.run_config.get("fail-from-round", 0))
    server_round = int(msg.content["config"]["server-round"])
    if fail_from and server_round >= fail_from:
        raise RuntimeError(f"fail-from-round={fail_from}: this client fails from round {fail_from} on (fault injection)")
    return call_next(msg, context)


def _setup(msg: Message) -> tuple[dict, ArrayRecord, ConfigRecord]:
    torch.set_num_threads(1)  # nodes share the host's cores (simulation actors, loopback SuperNodes)
    cfg_record = msg.content["config"]
    return json.loads(str(cfg_record[task.CONFIG_KEY])), msg.content["arrays"], cfg_record


@app.train(mods=[fail_from_round])
def train(msg: Message, context: Context) -> Message:
    """Train the global model on local data; reply with the new weights and `num-examples` for FedAvg."""
    config, arrays, cfg_record = _setup(msg)
    new, metrics = task.local_update(config, arrays, context.node_config, int(cfg_record["server-round"]))
    return Message(content=RecordDict({"arrays": new, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Single-pass accuracy, NLL and ECE of the global model on this node's held-out data."""
    config, arrays, _ = _setup(msg)
    _, held = task.local_data(config, context.node_config)
    m = task.evaluate(task.model_from(config, arrays), held, config["train"]["precision"], config["train"]["seed"])
    reply = RecordDict({"metrics": MetricRecord({"accuracy": m["accuracy"], "nll": m["nll"], "ece": m["ece"],
                                                 "num-examples": len(held)})})
    return Message(content=reply, reply_to=msg)
