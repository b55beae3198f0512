"""`stochvit federated`: FedAvg of a (stochastic) ViT across N simulated clients on Flower, into a normal run directory.

A local simulation with Flower's own engine: this command starts a SuperLink (`--simulation`) as a separate
process, submits the app in stochvit/federated/app with `flwr run`, follows the rounds through the run
directory's metrics.jsonl, and stops the SuperLink by PID. Real deployments use the same app with SuperNodes
(scripts/federated_loopback.sh, docs/federated.md).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UserError
from .settings import FederatedSettings as Settings
from .settings import Result


@dataclass
class FederatedResult(Result):
    """`out`: the finished run directory; `summary`: its summary.json."""

    summary: dict


def federated_run_config(s: Settings) -> dict:
    """The app's flat run config from the settings (validated)."""
    from ..federated.settings import from_run_config, to_run_config
    from ..train import TrainConfig

    cfg = replace(s.train) if isinstance(s.train, TrainConfig) else TrainConfig(**s.train)
    cfg.epochs = s.local_epochs
    cfg.warmup_epochs = 0.0  # the rounds follow their own cosine schedule
    # the Flower apps run in their own working directory: relative data paths must become absolute here
    if cfg.data.startswith("imagefolder:"):
        path, sep, classes = cfg.data.removeprefix("imagefolder:").partition(":classes=")
        cfg.data = f"imagefolder:{Path(path).expanduser().resolve()}" + (f":classes={classes}" if sep else "")
    if cfg.data_dir:
        cfg.data_dir = str(Path(cfg.data_dir).expanduser().resolve())
    fed = {"out-dir": str(Path(s.out).expanduser().resolve()), "clients": s.clients, "partition": s.partition,
           "rounds": s.rounds, "server-lr": s.server_lr, "server-momentum": s.server_momentum,
           "fraction-train": s.fraction_train, "fraction-evaluate": s.fraction_evaluate,
           "min-clients": s.min_clients if s.min_clients is not None else min(2, s.clients),
           "wait-for-clients": 0, "fail-from-round": s.fail_from_round}
    rc = to_run_config(cfg, fed)
    from_run_config(rc)  # raise UserError here, not inside the ServerApp
    return rc


def run(s: Settings) -> FederatedResult:
    """Simulate the federation (what `stochvit federated` does) into the run directory `s.out`.

    The run directory is locked (`stochvit.runs.run_lock`) throughout. A run that fails or is interrupted leaves
    only `logs/` in it (a federated run cannot be resumed), and its reason in one line: the ServerApp's last
    words, e.g. a round with fewer replies than min-clients.
    """
    from ..runs import LOCK_FILE, run_lock

    if s.cpus_per_client < 1:
        raise UserError(f"cpus_per_client={s.cpus_per_client} must be a positive integer")
    rc = federated_run_config(s)
    out = Path(rc["out-dir"])
    if out.exists() and not out.is_dir():
        raise UserError(f"out {out} is a file, not a directory; choose a new out")
    if out.exists() and any(f.name != LOCK_FILE for f in out.iterdir()):
        raise UserError(f"output directory {out} is not empty; choose a new out")
    with run_lock(out):  # a second writer is refused here, in one line
        try:
            return _run(s, rc, out)
        except BaseException:
            for f in out.iterdir():  # what the ServerApp wrote (the directory was empty): a failed run is not resumable
                if f.name not in ("logs", LOCK_FILE):
                    shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink(missing_ok=True)
            raise


def _run(s: Settings, rc: dict, out: Path) -> FederatedResult:
    import tomli_w
    from tqdm import tqdm

    from ..federated.launch import FINISHED, Federation, last_error_line
    from ..runs import read_metrics

    logs = out / "logs"
    logs.mkdir(parents=True)
    (logs / "run-config.toml").write_text(tomli_w.dumps(rc))
    t0 = time.perf_counter()
    bar = tqdm(total=s.rounds, desc=f"federated {s.clients} clients, {s.partition}", unit="round")
    shown = 0

    def progress() -> bool:
        nonlocal shown
        rows = read_metrics(out)
        for r in rows[shown:]:
            bar.update(1)
            tqdm.write(f"round {r['round']:3d}/{s.rounds}  val acc {r['val_accuracy']:.4f}  NLL {r['val_nll']:.4f}  "
                       f"ECE {r['val_ece']:.4f}  train loss {r['train_loss']:.4f}  clients {r['clients_replied']}/"
                       f"{r['clients_sampled']}  {r['epoch_seconds']:.1f} s")
        shown = len(rows)
        return (out / "summary.json").exists()

    with tempfile.TemporaryDirectory(prefix="stochvit-flwr-") as work, Federation(Path(work), logs) as fed:
        run_id = fed.submit(logs / "run-config.toml",
                            f"num-supernodes={s.clients} client-resources-num-cpus={s.cpus_per_client}")
        bar.set_postfix_str(f"run {run_id}")
        try:
            status = fed.wait(run_id, s.timeout, done=progress)
        finally:
            bar.close()
        progress()
        if status != FINISHED or not (out / "summary.json").exists():
            log = logs / "serverapp.log"
            log.write_text(fed.logs_of(run_id))
            reason = fed.failure_reason(run_id) or last_error_line(log) or "no reason given"
            raise UserError(f"federated run {run_id} ended as {status!r}: {reason}; the run directory keeps only "
                            f"logs/ (see {log})")
    summary = json.loads((out / "summary.json").read_text())
    t = summary["test"]
    fewer = summary["federated"]["rounds_with_fewer_clients"]
    print(f"run: {out}\ntest accuracy {summary['test_accuracy']:.4f} (single pass), {t['mc_average']['accuracy']:.4f} "
          f"(K={t['samples']} average); ECE {t['single_pass']['ece']['mean']:.4f}; {s.rounds} rounds in "
          f"{time.perf_counter() - t0:.0f} s" + (f"; rounds with fewer clients: {fewer}" if fewer else ""))
    return FederatedResult(out, summary)
