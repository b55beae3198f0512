"""Digits federated benchmark: 5 clients, IID vs Dirichlet(0.5) vs Dirichlet(0.1), deterministic vs stochastic ViT,
same rounds and local epochs, each through `stochvit federated` (a real Flower simulation).

    nice -n 10 python benchmarks/federated.py                       # 20 rounds x 3 local epochs, batch 32
    nice -n 10 python benchmarks/federated.py --rounds 5 --only iid # a quick look
    python benchmarks/federated.py --only iid dirichlet:0.1 --seeds 0 1 2   # the committed 3-seed reading
    OMP_NUM_THREADS=1 python benchmarks/federated.py ... --cpus-per-client 2 --parallel 2   # two runs at a time
    OMP_NUM_THREADS=2 python benchmarks/federated.py --data imagefolder:../shared/data/cifar10-jpeg \
        --train-limit 4000 --rounds 4 --local-epochs 1 --batch-size 128 --fraction-evaluate 0 --eval-samples 1
                                                                    # CIFAR-10, CPU-short (runs/cifar10-federated)

Runs go to benchmarks/runs/{digits,cifar10}-federated/<partition>-<model>-seed<S>, or under `--name` (finished ones
are reused, interrupted ones resumed from their last finished round, both only when they ran this recipe; `--seeds`
seeds the partition, the initial weights and the clients' sampling of each run); the table (final and per-round
accuracy / ECE, wall time) goes to results.{json,md} there, with the comparisons: stochastic minus deterministic per
partition, and each Dirichlet partition minus IID per model, each with a 95% interval (stochvit.suites.compare_runs:
one seed, a paired bootstrap over the shared test images; several, a t-interval over the per-seed differences plus the
image-bootstrap variance), also plotted in differences.png. The reading is written up by hand in benchmarks/results/federated.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from stochvit.eval.stats import Comparison
from stochvit.federated.launch import CHECKPOINT
from stochvit.suites.compare_runs import Predictions, RunPredictions, compare_runs, comparisons_markdown, plot_comparisons

RUNS = Path(__file__).resolve().parent / "runs"
LOGS = Path(__file__).resolve().parent / "logs"
PARTITIONS = ("iid", "dirichlet:0.5", "dirichlet:0.1")
MODELS = {"deterministic": ["--no-stochastic"], "stochastic": ["--stochastic"]}


def check_recipe(out: Path, a: argparse.Namespace) -> None:
    """A finished run is reused only when it ran this recipe (runs of another go under another --name)."""
    config = json.loads((out / "config.json").read_text())
    fed, train = config["federated"], config["train"]
    ran = dict(clients=fed["clients"], rounds=fed["rounds"], fraction_train=fed["fraction-train"],
               server_lr=fed.get("server-lr", 1.0), server_momentum=fed.get("server-momentum", 0.0), local_epochs=train["epochs"],
               batch_size=train["batch_size"], train_limit=train["train_limit"], lr=train["lr"])
    asked = {k: getattr(a, k) for k in ran}
    if a.lr is None:  # the recipe's default: whatever the run resolved
        asked["lr"] = ran["lr"]
    if ran != asked:
        diff = ", ".join(f"{k} {ran[k]} (asked {asked[k]})" for k in ran if ran[k] != asked[k])
        sys.exit(f"{out} ran another recipe: {diff}; choose another --name for this one")


def run_dir(partition: str, model: str, seed: int, a: argparse.Namespace) -> Path:
    return a.root / f"{partition.replace(':', '')}-{model}-seed{seed}"


def say(line: str) -> None:
    """One line in one write (print writes the text and its newline apart), so parallel runs' lines do not mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def launch(cmd: list[str], out: Path, a: argparse.Namespace) -> None:
    """One `stochvit federated` process; with --parallel > 1 its output is appended to benchmarks/logs/NAME/RUN.log
    instead of sharing the terminal with the others."""
    say(f"$ {' '.join(cmd[1:])}")
    if a.parallel == 1:
        subprocess.run(cmd, check=True)
        return
    log = LOGS / a.root.name / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    say(f"finished {out.name} (log: {log})")


def run_all(jobs: list[tuple[str, str, int]], a: argparse.Namespace) -> list[dict]:
    """Every job's results, in the jobs' order; `a.parallel` of them at a time, interrupted runs first (so that a
    campaign stopped at a session's end continues where it was). After a failure no further run starts; the failure
    is raised once the runs in flight have finished."""
    if a.parallel == 1:
        return [run(*job, a) for job in jobs]
    queue = iter(sorted(jobs, key=lambda job: not (run_dir(*job, a) / CHECKPOINT).exists()))
    lock = threading.Lock()
    results: dict[tuple[str, str, int], dict] = {}
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                job = None if errors else next(queue, None)
            if job is None:
                return
            try:
                results[job] = run(*job, a)
            except BaseException as e:  # noqa: BLE001 - check_recipe's SystemExit too: raised again below
                with lock:
                    errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(a.parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [results[job] for job in jobs]


def run(partition: str, model: str, seed: int, a: argparse.Namespace) -> dict:
    out = run_dir(partition, model, seed, a)
    wall = None
    finished, interrupted = (out / "summary.json").exists(), (out / CHECKPOINT).exists()
    if finished or interrupted:
        check_recipe(out, a)
    if interrupted and not finished:  # continue it from its last finished round
        launch([sys.executable, "-m", "stochvit.cli", "federated", "--resume", str(out),
                "--cpus-per-client", str(a.cpus_per_client)], out, a)  # its wall time is split across sessions: not recorded
    elif not finished:
        if out.exists():  # interrupted before its first round finished: only logs/, start it again
            say(f"{out} finished no round; running it again")
            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "stochvit.cli", "federated", "--clients", str(a.clients), "--rounds", str(a.rounds),
               "--local-epochs", str(a.local_epochs), "--batch-size", str(a.batch_size), "--partition", partition,
               "--seed", str(seed), "--data", a.data, "--out", str(out),
               "--server-lr", str(a.server_lr), "--server-momentum", str(a.server_momentum),
               *(["--lr", str(a.lr)] if a.lr else []),
               "--fraction-train", str(a.fraction_train), "--fraction-evaluate", str(a.fraction_evaluate),
               "--eval-samples", str(a.eval_samples),
               "--cpus-per-client", str(a.cpus_per_client),
               *(["--train-limit", str(a.train_limit)] if a.train_limit else []), *MODELS[model]]
        t0 = time.perf_counter()
        launch(cmd, out, a)
        wall = time.perf_counter() - t0
        (out / "wall_seconds.txt").write_text(f"{wall:.1f}\n")
    elif (out / "wall_seconds.txt").exists():
        wall = float((out / "wall_seconds.txt").read_text())
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    skew = json.loads((out / "partition.json").read_text())["label_skew"]
    return dict(partition=partition, model=model, seed=seed, run=str(out), label_skew=skew, wall_seconds=wall,
                test_accuracy=s["test"]["single_pass"]["accuracy"]["mean"], test_ece=s["test"]["single_pass"]["ece"]["mean"],
                test_nll=s["test"]["single_pass"]["nll"]["mean"], test_accuracy_mc=s["test"]["mc_average"]["accuracy"],
                test_ece_mc=s["test"]["mc_average"]["ece"], samples=s["test"]["samples"],
                rounds=[dict(round=r["round"], val_accuracy=r["val_accuracy"], val_ece=r["val_ece"], val_nll=r["val_nll"],
                             seconds=r["epoch_seconds"]) for r in rows])


def table(results: list[dict]) -> str:
    lines = ["| partition | label skew | model | seed | test acc | test ECE | test NLL | K-avg acc | K-avg ECE | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        wall = f"{r['wall_seconds']:.0f}" if r["wall_seconds"] else "?"
        lines.append(f"| {r['partition']} | {r['label_skew']:.2f} | {r['model']} | {r['seed']} | {r['test_accuracy']:.4f} | "
                     f"{r['test_ece']:.4f} | {r['test_nll']:.4f} | {r['test_accuracy_mc']:.4f} | {r['test_ece_mc']:.4f} | "
                     f"{wall} |")
    lines += ["", "Per-round global val accuracy / ECE:", ""]
    n = max(len(r["rounds"]) for r in results)
    lines.append("| partition | model | seed | " + " | ".join(f"r{i + 1}" for i in range(n)) + " |")
    lines.append("|---|---|---|" + "---|" * n)
    for r in results:
        cells = [f"{x['val_accuracy']:.2f}/{x['val_ece']:.2f}" for x in r["rounds"]]
        lines.append(f"| {r['partition']} | {r['model']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparisons(results: list[dict], predictions: Predictions) -> list[Comparison]:
    """Stochastic - deterministic per partition, then each non-IID partition - IID per model, over the seeds both
    sides have (paired seed by seed: the same seed gives both models the same partition)."""
    runs: dict[tuple[str, str], dict[int, str]] = {}
    for r in results:
        runs.setdefault((r["partition"], r["model"]), {})[r["seed"]] = r["run"]
    partitions = list(dict.fromkeys(r["partition"] for r in results))
    pairs = [((p, "stochastic"), (p, "deterministic")) for p in partitions]
    pairs += [((p, m), ("iid", m)) for m in MODELS for p in partitions if p != "iid"]
    out = []
    for a, b in pairs:
        if seeds := sorted(set(runs.get(a, {})) & set(runs.get(b, {}))):
            out += compare_runs([runs[a][s] for s in seeds], [runs[b][s] for s in seeds], f"{a[0]} {a[1]}",
                                f"{b[0]} {b[1]}", predictions)
    return out


def report(results: list[dict], root: Path, predictions: Predictions) -> tuple[list[Comparison], str]:
    """results.md's text (tables and the comparisons) and differences.png; returns the comparisons and the text."""
    rows = comparisons(results, predictions)
    text = table(results)
    if rows:
        plot_comparisons(root / "differences.png", rows, "federated: method - baseline, 95% CI")
        text += "\n" + comparisons_markdown(rows, "Comparisons") + "\n![differences](differences.png)\n"
    return rows, text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed, model and partition")
    p.add_argument("--only", choices=PARTITIONS, nargs="+", default=None, help="run (or report) only these partitions")
    p.add_argument("--train-limit", type=int, default=None, help="stratified subset of the training split, shared out")
    p.add_argument("--fraction-train", type=float, default=1.0, help="clients sampled per round")
    p.add_argument("--fraction-evaluate", type=float, default=1.0, help="clients evaluating locally (0 skips)")
    p.add_argument("--eval-samples", type=int, default=10, help="K passes for the final evaluation")
    p.add_argument("--cpus-per-client", type=int, default=1,
                   help="Ray CPUs per client: 2 on a 2-core machine runs one client at a time, so that two "
                        "simulations can run side by side")
    p.add_argument("--lr", type=float, default=None, help="the clients' AdamW learning rate (default: the recipe's, by "
                   "the square-root rule from the batch size)")
    p.add_argument("--server-lr", type=float, default=1.0, help="FedAvgM server learning rate (1.0: FedAvg's)")
    p.add_argument("--server-momentum", type=float, default=0.0, help="FedAvgM server momentum (0: FedAvg)")
    p.add_argument("--data", default="digits", help="e.g. imagefolder:/work/shared/data/cifar10-jpeg")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (2 on a 2-core machine, with "
                   "OMP_NUM_THREADS=1 and --cpus-per-client 2), each logging to benchmarks/logs/NAME/RUN.log")
    p.add_argument("--name", default=None, help="runs folder under benchmarks/runs (default: digits-federated or "
                   "cifar10-federated); a new recipe needs a new folder, since finished runs are reused")
    a = p.parse_args()
    a.root = RUNS / (a.name or ("digits-federated" if a.data == "digits" else "cifar10-federated"))
    a.root.mkdir(parents=True, exist_ok=True)
    if a.parallel < 1:
        p.error("--parallel must be at least 1")
    results = run_all([(part, model, seed) for seed in a.seeds for part in (a.only or PARTITIONS) for model in MODELS], a)
    rows, text = report(results, a.root, RunPredictions(a.eval_samples))
    (a.root / "results.json").write_text(json.dumps(dict(results=results, comparisons=[c.as_dict() for c in rows]),
                                                    indent=2) + "\n")
    (a.root / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
