"""The Flower `ServerApp`: FedAvg over stochvit models, central evaluation each round, a normal run directory at the end.

The ServerApp owns the output directory (`out-dir` in the run config):
    config.json              the run's settings (stochvit.train.run_config) plus a "federated" section
    partition.json / .png    class histogram per client of the nominal partition
    tensorboard/             with log = "tensorboard": those rows as TensorBoard scalars, step = round - 1
    metrics.jsonl            one line per round: global val accuracy / NLL / ECE, client train metrics,
                             clients sampled, replied and failed (rounds with fewer clients are visible here)
    rounds.png               those curves and the participation per round
    federated-checkpoint.safetensors  the global weights (and FedAvgM's momentum) after the last finished round,
                             while the run is unfinished: `resume = true` continues from it; removed at the end
    model.safetensors, summary.json, curves.png   via stochvit.runs.finalize_run (summary.json last)
so `stochvit evaluate`, `calibration`, `robustness` and `privacy` load the result like any trained run.

`FedAvgM` comes from `flwr.serverapp.strategy`: plain FedAvg at its defaults (server lr 1, momentum 0); server momentum
accumulates the averaged client updates across rounds (Hsu et al. 2019). `TrackedFedAvgM` records who took part in
each round, and fails the run at the first round with fewer replies than min-clients (fewer than expected but enough
is tolerated and recorded).
"""

from __future__ import annotations

import json
import time
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvgM

from ..data import load_data
from ..errors import UserError
from ..precision import default_device
from ..runs import Curves, atomic_write_bytes, finalize_run, pyplot, read_json, run_config, write_json
from ..tracking import open_logger
from ..train import warn_long_warmup
from . import task
from .launch import CHECKPOINT
from .partition import partition, save_summary
from .settings import from_run_config

app = ServerApp()


class TrackedFedAvgM(FedAvgM):
    """FedAvgM (FedAvg at server lr 1, momentum 0) recording per round the nodes sampled, replied and failed, and
    the client metrics.

    `round_offset`: the rounds a resumed run finished before (Flower's loop counts from 1 again); every round this
    strategy reports, and the `server-round` the clients receive (their seeds and learning rate), include it.
    """

    def __init__(self, round_offset: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.round_offset = round_offset
        self.rounds: dict[int, dict] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        server_round += self.round_offset
        start = time.perf_counter()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        nodes = [m.metadata.dst_node_id for m in messages]
        self.rounds[server_round] = dict(start=start, sampled=len(messages), sampled_nodes=nodes)
        return messages

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        rec = self.rounds[server_round]
        replied = {m.metadata.src_node_id for m in ok}
        rec.update(replied=len(ok), failed=rec["sampled"] - len(ok),
                   missing_nodes=[n for n in rec["sampled_nodes"] if n not in replied],
                   errors=[m.error.reason for m in replies if m.has_error()])
        if len(ok) < self.min_train_nodes:  # FedAvg(M) would go on with the old model and a NaN loss, and report success
            last = rec["errors"][-1].strip().splitlines()[-1] if rec["errors"] and rec["errors"][-1].strip() else "none"
            raise UserError(f"round {server_round} failed: {len(ok)} of {rec['sampled']} sampled clients replied, fewer "
                            f"than --min-clients {self.min_train_nodes} (last client error: {last[:200]})")
        arrays, metrics = super().aggregate_train(server_round, replies)
        rec["train"] = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies) -> MetricRecord | None:
        server_round += self.round_offset
        metrics = super().aggregate_evaluate(server_round, replies)
        self.rounds[server_round]["clients_eval"] = dict(metrics) if metrics is not None else {}
        return metrics


def save_checkpoint(out: Path, server_round: int, arrays: ArrayRecord, strategy: TrackedFedAvgM) -> None:
    """The global weights after `server_round` (and FedAvgM's momentum buffer, when it has one), one atomic file."""
    from safetensors.torch import save

    tensors = {f"weights/{k}": v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
    if strategy.momentum_vector is not None:
        tensors |= {f"momentum/{k}": torch.from_numpy(np.array(m, order="C"))  # (np.ascontiguousarray makes 0-d 1-d)
                    for k, m in zip(arrays.keys(), strategy.momentum_vector, strict=True)}
    atomic_write_bytes(out / CHECKPOINT, save(tensors, metadata={"round": str(server_round)}))


def load_checkpoint(out: Path, keys: list[str]) -> tuple[int, dict[str, torch.Tensor], list[np.ndarray] | None]:
    """(last finished round, global weights, FedAvgM's momentum buffer or None) of an interrupted run; the buffer in
    the order of `keys`, the model's state-dict order, which FedAvgM's arrays follow (safetensors sorts its keys)."""
    from safetensors import safe_open

    path = out / CHECKPOINT
    if not path.exists():
        raise UserError(f"{out} has no {CHECKPOINT}: it finished no round, so there is nothing to resume; start it anew")
    with safe_open(str(path), framework="pt") as f:  # tensors only: no code runs on load
        server_round = int(f.metadata()["round"])
        stored = set(f.keys())
        weights = {k: f.get_tensor(f"weights/{k}") for k in keys}
        momentum = [f.get_tensor(f"momentum/{k}").numpy() for k in keys] if f"momentum/{keys[0]}" in stored else None
    return server_round, weights, momentum


def _wait_for_nodes(grid: Grid, expected: int, minimum: int, seconds: float) -> int:
    """Give the expected SuperNodes time to connect, so round 1 starts with all of them (or at least `minimum`)."""
    deadline = time.monotonic() + seconds
    while (n := len(list(grid.get_node_ids()))) < expected and (time.monotonic() < deadline or n < minimum):
        time.sleep(1)
    return n


def plot_rounds(path: Path, rows: list[dict]) -> None:
    """rounds.png: global val accuracy, NLL, ECE and clients per round (atomic write)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    r = [row["round"] for row in rows]
    fig, ax = plt.subplots(1, 4, figsize=(15, 3.4))
    for a, key in zip(ax, ("accuracy", "nll", "ece")):
        a.plot(r, [row[f"val_{key}"] for row in rows], marker="o")
        a.set_title(f"global model: val {key}")
    sampled, replied = [row["clients_sampled"] for row in rows], [row["clients_replied"] for row in rows]
    if sampled == replied:  # one line, said so, rather than one hidden under the other
        ax[3].plot(r, sampled, marker="o", label="sampled = replied")
    else:
        ax[3].plot(r, sampled, marker="o", label="sampled")
        ax[3].plot(r, replied, marker="x", label="replied")
    ax[3].set_title("clients per round")
    ax[3].set_ylim(0, max(sampled + replied) + 1)
    ax[3].yaxis.set_major_locator(MaxNLocator(integer=True))  # client counts, not 2.85 .. 3.15
    ax[3].legend(loc="lower right")
    for a in ax:
        a.set_xlabel("round")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def settings_changed(stored: Any, submitted: Any, where: str = "") -> list[str]:
    """Where the settings submitted to resume a run depart from its config.json: values that differ, and keys they
    lack. Keys only the submitted settings have are settings a later stochvit added, at defaults that keep the old
    behaviour, so a run started before them still resumes."""
    if isinstance(stored, dict) and isinstance(submitted, dict):
        out = []
        for key, value in stored.items():
            out += [f"{where}{key} (missing)"] if key not in submitted else settings_changed(value, submitted[key],
                                                                                              f"{where}{key}.")
        return out
    return [] if stored == submitted else [where.rstrip(".")]


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg for `rounds` rounds, evaluating the global model on the server's validation split after each."""
    cfg, fed = from_run_config(dict(context.run_config))
    resume = bool(context.run_config.get("resume", False))
    out = Path(fed["out-dir"]).expanduser().resolve()
    if (out / "config.json").exists() and not resume:
        raise UserError(f"{out} already holds a run; choose a new out-dir")
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.data, cfg.data_dir, False, cfg.split_seed, train_limit=cfg.train_limit, img_size=cfg.img_size)
    warn_long_warmup(cfg)
    config = run_config(cfg, data)
    config["federated"] = {k: v for k, v in fed.items() if k != "out-dir"}
    model = task.initial_model(config).to(default_device())
    done, momentum = 0, None
    if resume:
        changed = settings_changed(read_json(out / "config.json", "run config"), json.loads(json.dumps(config)))
        if changed:
            raise UserError(f"{out}/config.json differs from the run config submitted to resume it ({', '.join(changed)}); "
                            "resume with the run's own logs/run-config.toml (stochvit federated --resume RUN_DIR)")
        done, weights, momentum = load_checkpoint(out, list(model.net.state_dict()))
        model.net.load_state_dict(weights)
        log(INFO, "stochvit: resuming %s after round %d of %d", out, done, fed["rounds"])
    else:
        write_json(out / "config.json", config)
        labels = data.train.labels.numpy()
        save_summary(out, labels, partition(labels, fed["clients"], fed["partition"], cfg.seed), data.class_names,
                     fed["partition"], cfg.seed)
    curves = Curves(out)
    tensorboard = open_logger(out, cfg.log)
    strategy = TrackedFedAvgM(round_offset=done, server_learning_rate=fed["server-lr"], server_momentum=fed["server-momentum"],
                              fraction_train=fed["fraction-train"], fraction_evaluate=fed["fraction-evaluate"],
                              min_train_nodes=fed["min-clients"], min_evaluate_nodes=fed["min-clients"],
                              min_available_nodes=fed["min-clients"])
    strategy.momentum_vector = momentum

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        server_round += done
        model.net.load_state_dict(arrays.to_torch_state_dict())
        val = task.evaluate(model, data.val, cfg.precision, cfg.seed + server_round)
        rec = strategy.rounds[server_round]
        seconds = time.perf_counter() - rec["start"]
        train = rec.get("train", {})
        row = dict(epoch=server_round - 1, round=server_round, train_loss=train.get("train-loss", float("nan")),
                   train_accuracy=train.get("train-accuracy", float("nan")), epoch_seconds=seconds,
                   **{f"val_{k}": v for k, v in val.items()},
                   **{f"clients_eval_{k}": v for k, v in rec.get("clients_eval", {}).items() if k != "num-examples"},
                   clients_expected=fed["clients"], clients_sampled=rec["sampled"], clients_replied=rec["replied"],
                   clients_failed=rec["failed"], missing_nodes=rec["missing_nodes"], errors=rec["errors"])
        curves.append(row)
        save_checkpoint(out, server_round, arrays, strategy)  # after the row: a resumed run redoes no finished round
        if tensorboard is not None:
            tensorboard.log(row)
        plot_rounds(out / "rounds.png", curves.rows())
        log(INFO, "stochvit round %d/%d: val accuracy %.4f, NLL %.4f, ECE %.4f; %d/%d clients replied (%.1f s)",
            server_round, fed["rounds"], val["accuracy"], val["nll"], val["ece"], rec["replied"], rec["sampled"], seconds)
        return MetricRecord(val)

    nodes = _wait_for_nodes(grid, fed["clients"], fed["min-clients"], fed["wait-for-clients"])
    log(INFO, "stochvit: %d SuperNodes connected (expected %d, minimum %d)", nodes, fed["clients"], fed["min-clients"])
    train_config = ConfigRecord({task.CONFIG_KEY: json.dumps(config)})
    if done < fed["rounds"]:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.net.state_dict()),
                                num_rounds=fed["rounds"] - done, timeout=fed["round-timeout"], train_config=train_config,
                                evaluate_config=train_config, evaluate_fn=evaluate)
        model.net.load_state_dict(result.arrays.to_torch_state_dict())
    if tensorboard is not None:
        tensorboard.close()
    rows = curves.rows()
    fewer = [r["round"] for r in rows if r["clients_replied"] < fed["clients"]]
    finalize_run(out, model, data, cfg.eval_samples, cfg.precision,
                 federated=dict(rounds=fed["rounds"], clients=fed["clients"], partition=fed["partition"],
                                rounds_with_fewer_clients=fewer,
                                clients_per_round={r["round"]: r["clients_replied"] for r in rows}))
    (out / CHECKPOINT).unlink(missing_ok=True)  # finished: model.safetensors holds the final weights
    log(INFO, "stochvit: run directory %s (rounds with fewer than %d clients: %s)", out, fed["clients"], fewer or "none")
