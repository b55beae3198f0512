"""`stochvit federated`: FedAvg of a (stochastic) ViT across N simulated clients on Flower, into a normal run directory.

A local simulation with Flower's own engine: this command starts a SuperLink (`--simulation`) as a separate
process, submits the app in stochvit/federated/app with `flwr run`, follows the rounds through the run
directory's metrics.jsonl, and stops the SuperLink by PID. Real deployments use the same app with SuperNodes
(scripts/federated_loopback.sh, docs/federated.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ..cli import add_data_args, add_model_args, train_config_from_args
from ..errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "federated", help="federated training (FedAvg on Flower) across simulated clients, IID or label-skewed",
        description="Federated averaging of a deterministic or stochastic ViT over N clients with IID or Dirichlet(alpha) "
                    "label-skewed partitions, simulated with Flower. Writes a normal run directory (evaluate, calibration, "
                    "robustness and privacy accept it) plus metrics.jsonl / rounds.png per round and partition.json / .png.")
    add_data_args(p)
    g = p.add_argument_group("data split")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split")
    g.add_argument("--train-limit", type=int, default=None, help="keep a stratified subset of this many training images")
    g.add_argument("--img-size", type=int, default=None, help="resize imagefolder images to this size")
    add_model_args(p)
    g = p.add_argument_group("federation")
    g.add_argument("--clients", type=int, default=5, help="number of clients (simulated SuperNodes)")
    g.add_argument("--rounds", type=int, default=10, help="FedAvg rounds")
    g.add_argument("--local-epochs", type=int, default=1, help="local epochs per round on each client")
    g.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA (label skew; smaller ALPHA, more skew)")
    g.add_argument("--fraction-train", type=float, default=1.0, help="fraction of clients sampled per round")
    g.add_argument("--fraction-evaluate", type=float, default=1.0, help="fraction of clients that evaluate the global model "
                                                                         "on local held-out data (0 skips)")
    g.add_argument("--min-clients", type=int, default=None, help="fewest clients per round (default: min(2, clients))")
    g.add_argument("--cpus-per-client", type=int, default=1, help="CPU cores reserved per simulated client (an integer)")
    g.add_argument("--timeout", type=float, default=86400, help="give up (and stop the run) after this many seconds")
    g = p.add_argument_group("local optimisation")
    g.add_argument("--batch-size", type=int, default=None, help="default: 64 for digits, 128 otherwise")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate, cosine-decayed over rounds "
                                                         "(default: 3e-3 for digits, 1e-3 otherwise)")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0 disables)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial model, partition and local training")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    g.add_argument("--eval-samples", type=int, default=10, help="K stochastic passes for the final evaluation")
    p.add_argument("--out", required=True, help="run directory to create (must be new or empty)")
    p.set_defaults(func=cmd_federated, warmup_epochs=0.0)  # rounds follow their own cosine schedule


def federated_run_config(a: argparse.Namespace) -> dict:
    """The app's flat run config from the command line (validated)."""
    from ..federated.settings import from_run_config, to_run_config

    cfg = train_config_from_args(a)
    cfg.epochs = a.local_epochs
    # the Flower apps run in their own working directory: relative data paths must become absolute here
    if cfg.data.startswith("imagefolder:"):
        path, sep, classes = cfg.data.removeprefix("imagefolder:").partition(":classes=")
        cfg.data = f"imagefolder:{Path(path).expanduser().resolve()}" + (f":classes={classes}" if sep else "")
    if cfg.data_dir:
        cfg.data_dir = str(Path(cfg.data_dir).expanduser().resolve())
    fed = {"out-dir": str(Path(a.out).expanduser().resolve()), "clients": a.clients, "partition": a.partition,
           "rounds": a.rounds, "fraction-train": a.fraction_train, "fraction-evaluate": a.fraction_evaluate,
           "min-clients": a.min_clients if a.min_clients is not None else min(2, a.clients),
           "wait-for-clients": 0}
    rc = to_run_config(cfg, fed)
    from_run_config(rc)  # raise UserError here, not inside the ServerApp
    return rc


def run_federated(a: argparse.Namespace) -> Path:
    import tomli_w
    from tqdm import tqdm

    from ..federated.launch import FINISHED, Federation
    from ..runs import read_metrics

    if a.cpus_per_client < 1:
        raise UserError("--cpus-per-client must be a positive integer")
    rc = federated_run_config(a)
    out = Path(rc["out-dir"])
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} is not empty; choose a new --out")
    logs = out / "logs"
    logs.mkdir(parents=True)
    (logs / "run-config.toml").write_text(tomli_w.dumps(rc))
    t0 = time.perf_counter()
    bar = tqdm(total=a.rounds, desc=f"federated {a.clients} clients, {a.partition}", unit="round")
    shown = 0

    def progress() -> bool:
        nonlocal shown
        rows = read_metrics(out)
        for r in rows[shown:]:
            bar.update(1)
            tqdm.write(f"round {r['round']:3d}/{a.rounds}  val acc {r['val_accuracy']:.4f}  NLL {r['val_nll']:.4f}  "
                       f"ECE {r['val_ece']:.4f}  train loss {r['train_loss']:.4f}  clients {r['clients_replied']}/"
                       f"{r['clients_sampled']}  {r['epoch_seconds']:.1f} s")
        shown = len(rows)
        return (out / "summary.json").exists()

    with tempfile.TemporaryDirectory(prefix="stochvit-flwr-") as work, Federation(Path(work), logs) as fed:
        run_id = fed.submit(logs / "run-config.toml",
                            f"num-supernodes={a.clients} client-resources-num-cpus={a.cpus_per_client}")
        bar.set_postfix_str(f"run {run_id}")
        try:
            status = fed.wait(run_id, a.timeout, done=progress)
        finally:
            bar.close()
        progress()
        if status != FINISHED or not (out / "summary.json").exists():
            (logs / "serverapp.log").write_text(fed.logs_of(run_id))
            raise UserError(f"federated run {run_id} ended as {status!r} without a finished run directory; "
                            f"see {logs / 'serverapp.log'}")
    summary = json.loads((out / "summary.json").read_text())
    t = summary["test"]
    fewer = summary["federated"]["rounds_with_fewer_clients"]
    print(f"run: {out}\ntest accuracy {summary['test_accuracy']:.4f} (single pass), {t['mc_average']['accuracy']:.4f} "
          f"(K={t['samples']} average); ECE {t['single_pass']['ece']['mean']:.4f}; {a.rounds} rounds in "
          f"{time.perf_counter() - t0:.0f} s" + (f"; rounds with fewer clients: {fewer}" if fewer else ""))
    return out


def cmd_federated(a: argparse.Namespace) -> None:
    run_federated(a)
