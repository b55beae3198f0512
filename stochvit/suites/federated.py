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

    The run directory is locked (`stochvit.runs.run_lock`) throughout. A run that fails or is interrupted after a
    finished round keeps its directory and checkpoint, and `resume` continues it; one that finished no round keeps
    only `logs/`. Either way the reason comes in one line: the ServerApp's last words, e.g. a round with fewer
    replies than min-clients.
    """
    from ..runs import LOCK_FILE

    if s.cpus_per_client < 1:
        raise UserError(f"cpus_per_client={s.cpus_per_client} must be a positive integer")
    rc = federated_run_config(s)
    out = Path(rc["out-dir"])
    if out.exists() and not out.is_dir():
        raise UserError(f"out {out} is a file, not a directory; choose a new out")
    if out.exists() and any(f.name != LOCK_FILE for f in out.iterdir()):
        hint = f" (an interrupted run: stochvit federated --resume {out})" if _resumable(out) else ""
        raise UserError(f"output directory {out} is not empty{hint}; choose a new out")
    return _locked_run(rc, out, s.cpus_per_client, s.timeout, fresh=True)


def resume(run_dir: str | Path, cpus_per_client: int = 1, timeout: float = 86400.0) -> FederatedResult:
    """Continue an interrupted federated run from its last finished round, with the run config it was started with.

    The clients' seeds and learning rate depend on the round only, so with every client in every round the resumed
    run repeats the rounds the interrupted one would have run (a sampled fraction of clients is drawn anew).
    """
    import tomllib

    out = Path(run_dir).expanduser().resolve()
    if (out / "summary.json").exists():
        raise UserError(f"{out} has finished; nothing to resume")
    if not _resumable(out):
        raise UserError(f"{out} is not an interrupted federated run with a finished round (it needs config.json, "
                        "logs/run-config.toml and federated-checkpoint.safetensors); start a new run instead")
    if cpus_per_client < 1:
        raise UserError(f"cpus_per_client={cpus_per_client} must be a positive integer")
    rc = tomllib.loads((out / "logs" / "run-config.toml").read_text()) | {"resume": True, "fail-from-round": 0}
    return _locked_run(rc, out, cpus_per_client, timeout, fresh=False)


def _resumable(out: Path) -> bool:
    from ..federated.launch import CHECKPOINT

    return all((out / f).exists() for f in ("config.json", "logs/run-config.toml", CHECKPOINT))


def _locked_run(rc: dict, out: Path, cpus_per_client: int, timeout: float, fresh: bool) -> FederatedResult:
    from ..runs import LOCK_FILE, run_lock

    with run_lock(out):  # a second writer is refused here, in one line
        try:
            return _run(rc, out, cpus_per_client, timeout, fresh)
        except BaseException:
            if not _resumable(out):  # no finished round: what the ServerApp wrote goes, the logs stay
                for f in out.iterdir():
                    if f.name not in ("logs", LOCK_FILE):
                        shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink(missing_ok=True)
            raise


def _run(rc: dict, out: Path, cpus_per_client: int, timeout: float, fresh: bool) -> FederatedResult:
    import tomli_w
    from tqdm import tqdm

    from ..federated.launch import FINISHED, Federation, last_error_line
    from ..runs import read_metrics

    logs = out / "logs"
    rounds, clients = rc["rounds"], rc["clients"]
    logs.mkdir(parents=True, exist_ok=not fresh)
    config_file = logs / ("run-config.toml" if fresh else "resume-config.toml")  # the original stays as it was
    config_file.write_text(tomli_w.dumps(rc))
    t0 = time.perf_counter()
    shown = len(read_metrics(out)) if not fresh else 0
    bar = tqdm(total=rounds, initial=shown, desc=f"federated {clients} clients, {rc['partition']}", unit="round")

    def progress() -> bool:
        nonlocal shown
        rows = read_metrics(out)
        for r in rows[shown:]:
            bar.update(1)
            tqdm.write(f"round {r['round']:3d}/{rounds}  val acc {r['val_accuracy']:.4f}  NLL {r['val_nll']:.4f}  "
                       f"ECE {r['val_ece']:.4f}  train loss {r['train_loss']:.4f}  clients {r['clients_replied']}/"
                       f"{r['clients_sampled']}  {r['epoch_seconds']:.1f} s")
        shown = len(rows)
        return (out / "summary.json").exists()

    with tempfile.TemporaryDirectory(prefix="stochvit-flwr-") as work, Federation(Path(work), logs) as fed:
        run_id = fed.submit(config_file, f"num-supernodes={clients} client-resources-num-cpus={cpus_per_client}")
        bar.set_postfix_str(f"run {run_id}")
        try:
            status = fed.wait(run_id, timeout, done=progress)
        finally:
            bar.close()
        progress()
        if status != FINISHED or not (out / "summary.json").exists():
            log = logs / "serverapp.log"
            log.write_text(fed.logs_of(run_id))
            reason = fed.failure_reason(run_id) or last_error_line(log) or "no reason given"
            kept = (f"the run directory keeps its last finished round: stochvit federated --resume {out}"
                    if _resumable(out) else "the run directory keeps only logs/")
            raise UserError(f"federated run {run_id} ended as {status!r}: {reason}; {kept} (see {log})")
    summary = json.loads((out / "summary.json").read_text())
    t = summary["test"]
    fewer = summary["federated"]["rounds_with_fewer_clients"]
    print(f"run: {out}\ntest accuracy {summary['test_accuracy']:.4f} (single pass), {t['mc_average']['accuracy']:.4f} "
          f"(K={t['samples']} average); ECE {t['single_pass']['ece']['mean']:.4f}; {rounds} round{'s' if rounds != 1 else ''} in "
          f"{time.perf_counter() - t0:.0f} s" + (f"; rounds with fewer clients: {fewer}" if fewer else ""))
    return FederatedResult(out, summary)
