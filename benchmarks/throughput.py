"""Throughput of plain vs stochastic ViTs, measured side by side in one process with interleaved repeats.

    python benchmarks/throughput.py --out benchmarks/results/throughput.json

Models: plain timm `vit_tiny_patch4_32`, the same with the default stochastic layer (diagonal U[0.5,1.5],
token-consistent, pre-activation) and with the full kind (Gaussian random projection; the orthogonal
one adds a QR decomposition per image and block).
Training = forward + backward + AdamW step; inference = forward under no_grad in eval(). Batch 128.
Every (model, task, precision) cell is timed once per round, rounds interleaved, and the median kept,
so slow drifts of the machine hit all models alike; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import stochvit
from stochvit.precision import autocast, cpu_has_native_bf16

MODELS = {
    "plain": False,
    "stochastic-diagonal": True,
    "stochastic-full-gaussian": dict(kind="full", distribution="gaussian"),
}


def _step_fn(model: nn.Module, task: str, precision: str, x: torch.Tensor, y: torch.Tensor):
    device = torch.device("cpu")
    if task == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()

        def step() -> None:
            with autocast(precision, device):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        @torch.no_grad()
        def step() -> None:
            with autocast(precision, device):
                model(x)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch4_32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per cell per round")
    p.add_argument("--precisions", default=None,
                   help="comma list of fp32,bf16 (default: fp32, plus bf16 where the CPU runs it natively)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)} (plain is always timed)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--out", default="benchmarks/results/throughput.json")
    a = p.parse_args()
    if a.precisions is None:
        a.precisions = "fp32,bf16" if cpu_has_native_bf16() else "fp32"
    unknown = set(a.models.split(",")) - set(MODELS)
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; choose from {', '.join(MODELS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.randn(a.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (a.batch_size,))
    cells = {}
    for prec in a.precisions.split(","):
        for task in ("train", "infer"):
            for name in ["plain"] + [m for m in a.models.split(",") if m != "plain"]:
                model = stochvit.create_model(a.model, stochastic=MODELS[name])
                cells[(name, task, prec)] = _step_fn(model, task, prec, x, y)
    times: dict[tuple, list[float]] = {k: [] for k in cells}
    for fn in cells.values():  # warm-up
        fn()
    for r in range(a.rounds):
        for key, fn in cells.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                fn()
            times[key].append((time.perf_counter() - t0) / a.steps)
        print(f"round {r + 1}/{a.rounds} done", flush=True)
    rows = []
    for (name, task, prec), ts in times.items():
        ips = a.batch_size / statistics.median(ts)
        base = a.batch_size / statistics.median(times[("plain", task, prec)])
        rows.append(dict(model=name, task=task, precision=prec, images_per_s=ips, ratio_to_plain=ips / base))
    result = dict(model=a.model, batch_size=a.batch_size, rounds=a.rounds, steps=a.steps, threads=torch.get_num_threads(),
                  torch=torch.__version__, machine=platform.processor() or platform.machine(), rows=rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':<28}{'task':<7}{'prec':<6}{'img/s':>9}{'ratio':>8}")
    for r in rows:
        print(f"{r['model']:<28}{r['task']:<7}{r['precision']:<6}{r['images_per_s']:>9.1f}{r['ratio_to_plain']:>8.3f}")


if __name__ == "__main__":
    main()
