"""On this CPU, side by side in one process, rounds interleaved, medians kept (stochvit.scale's choices):

    OMP_NUM_THREADS=1 python benchmarks/scale_cpu.py --out benchmarks/results/scale-cpu.json

1. augmentation: one epoch of batches from the per-sample path (DataLoader + torchvision RandomCrop/flip, 0 workers)
   vs the batched one (`stochvit.scale.DeviceBatches`), for the digits split and 10,000 CIFAR-size images;
2. AdamW: for-loop vs foreach vs fused step over vit_tiny_patch4_32's parameters;
3. torch.compile of a training step (forward + backward + AdamW) vs eager, vit_tiny_patch4_32 in bf16 autocast where
   native (the trainer's default) and the digits model in fp32; the compile time is reported too.
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
from stochvit.data import ImageSet, augmentation, load_data
from stochvit.precision import autocast, resolve_precision
from stochvit.scale import train_batches


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def medians(cells: dict, rounds: int) -> dict[str, float]:
    """Each cell timed once per round, rounds interleaved: slow drifts of a shared machine hit all cells alike."""
    times: dict[str, list[float]] = {k: [] for k in cells}
    for _ in range(rounds):
        for k, fn in cells.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def augmentation_cells() -> dict:
    digits = load_data("digits").train
    g = torch.Generator().manual_seed(0)
    cifar = ImageSet(torch.randint(0, 256, (10000, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.zeros(10000, dtype=torch.long), augmentation(32, flip=True))
    cpu = torch.device("cpu")
    cells = {}
    for name, data, batch in (("digits", digits, 64), ("cifar-size", cifar, 128)):
        for path, batched in (("per-sample", False), ("batched", True)):
            loader = train_batches(data, batch, cpu, device_batches=batched)
            cells[f"{name}/{path}"] = lambda loader=loader: sum(len(y) for _, y in loader)
    return cells


def adamw_cells() -> dict:
    net = stochvit.create_model("vit_tiny_patch4_32", stochastic=False, num_classes=10)
    params = [p for p in net.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    cells = {}
    for impl in ("for-loop", "foreach", "fused"):
        kw = dict(foreach=False) if impl == "for-loop" else {impl: True}
        opt = torch.optim.AdamW(params, lr=1e-3, **kw)
        cells[impl] = lambda opt=opt: [opt.step() for _ in range(5)]
    return cells


def step_cells(name: str, in_chans: int, size: int, batch: int, precision: str, compile_times: dict) -> dict:
    cells = {}
    x = torch.rand(batch, in_chans, size, size)
    y = torch.randint(0, 10, (batch,))
    for mode in ("eager", "compiled"):
        model = stochvit.create_model(name, stochastic=True, num_classes=10, in_chans=in_chans, img_size=size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        fwd = torch.compile(model) if mode == "compiled" else model
        prec = resolve_precision(precision, torch.device("cpu"), model)

        def step(fwd=fwd, opt=opt, model=model, prec=prec) -> None:
            with autocast(prec, torch.device("cpu"), model):
                loss = nn.functional.cross_entropy(fwd(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        compile_times[f"{name}/{mode}"] = timed(step)  # the first step: compilation for the compiled one
        step()
        cells[f"{name}/{mode}"] = step
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    result: dict = dict(machine=platform.processor() or platform.machine(), torch=torch.__version__,
                        threads=torch.get_num_threads(), rounds=a.rounds)
    aug = medians(augmentation_cells(), a.rounds)
    result["augmentation_epoch_s"] = aug
    result["augmentation_speedup"] = {n: aug[f"{n}/per-sample"] / aug[f"{n}/batched"] for n in ("digits", "cifar-size")}
    opt = medians(adamw_cells(), a.rounds)
    result["adamw_5_steps_s"] = opt
    result["adamw_speedup_vs_for_loop"] = {k: opt["for-loop"] / v for k, v in opt.items()}
    first: dict = {}
    cells = {**step_cells("vit_tiny_patch4_32", 3, 32, 128, "auto", first),
             **step_cells("vit_digits_patch2_8", 1, 8, 64, "auto", first)}
    steps = medians(cells, a.rounds)
    result["train_step_s"] = steps
    result["first_step_s"] = first
    result["compile_speedup"] = {n: steps[f"{n}/eager"] / steps[f"{n}/compiled"]
                                 for n in ("vit_tiny_patch4_32", "vit_digits_patch2_8")}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
