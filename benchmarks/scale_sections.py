"""The CPU scale study of issue 16, one run, side by side (`python benchmarks/throughput.py --sections all`).

- peak: the bf16 (fp32 without native bf16) matmul peak, 2048 x 2048 matmuls, best of 5, at the run's thread count.
- trainer: the real training path (`stochvit.train.prepare` + `train_one_epoch`, data loading, augmentation and
  clipping included) of `vit_tiny_patch4_32` with the default stochastic layer at default precision, eager and (not in
  --quick) with `--compile`, epochs interleaved with the same eager steps on one repeated batch and with the loader
  alone (what the data pipeline costs), on `--trainer-data`
  or on a synthetic folder of CIFAR-size PNGs (decoded into memory like the JPEGs, so the speed is the same); its
  images/s over the limit peak / GFLOP-per-image, with both the issue's 1.04 GFLOP and the count of
  `torch.utils.flop_counter` (matmuls forward + backward).
- layer: the default stochastic layer vs the plain model, bf16 training steps, by two methods in the same rounds:
  `blocks` (each model runs `steps` consecutive steps per round, models in a fixed order: the cells of this script's
  default mode) and `alternating` (one step each, the order flipped every round: ABBA), each with timm's attention on
  its explicit path (what stochvit's bf16 autocast runs on a CPU) and with the fused SDPA kernel kept; on the explicit
  path also the layer with its scale compiled into the activation (`stochvit.set_fused`, `train --fused`), and both
  models compiled whole with torch.compile (blocks method; not in --quick: compilation takes minutes). A ratio is
  reported as the median of the per-round ratios with its 95% distribution-free interval (scipy's quantile_test) and
  as the ratio of medians.
- threads: training images/s with 1 and 2 torch threads (rounds interleaved) for the digits model (its recipe, fp32)
  and the CIFAR-size model (bf16 where native), idle and beside a load (a child process training vit_tiny in bf16 on
  torch's default threads, "one other stochvit job"); the digits model also with OMP_WAIT_POLICY=PASSIVE, idle and
  loaded (a child run of this section, since OpenMP reads it at start-up).
- orthogonal: plain, diagonal and full-orthogonal layers at digits width (vit_digits_patch2_8, batch 64), training and
  inference, blocks method.
- weights: what bf16 weights would buy the bf16 training step of vit_tiny (default layer), before the trainer changes:
  today's step (bf16 autocast over fp32 weights: every matmul casts its operands, the residual stream stays fp32)
  against a prototype that keeps a bf16 copy of the model for the forward and backward and fp32 master weights in
  AdamW (the bf16 gradients copied up, the updated weights copied down every step), rounds alternating; not in
  --quick, also both compiled, the prototype with fused AdamW too (every lever at once: how near the limit it gets).
- profile: torch.profiler of bf16 vit_tiny training steps (default layer): the top ops by self CPU time, and the step's
  copies grouped by the autograd node that ran them (a TorchDispatchMode), where the profile cannot say.
- gemms: the matmuls of one such training step alone (mm, addmm, bmm, recorded with their shapes, strides and dtypes
  by a TorchDispatchMode, then replayed on random tensors, each call's best of 5 with its operands in cache): the rate
  the hardware reaches at the model's own shapes, and so the trainer's ceiling if everything but the matmuls cost
  nothing. The 2048^3 peak is not reachable at width 192; this says how much of the gap to it the shapes explain and
  how much the rest of the step does. Its FLOP count includes the explicit attention's bmm, which
  torch.utils.flop_counter does not count on the fused CPU kernel (the trainer section's "counted").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import stats
from throughput import _step_fn
from torch import nn

import stochvit
from stochvit.precision import cpu_has_native_bf16, resolve_precision
from stochvit.procs import child_dies_with_parent

SECTIONS = ("peak", "gemms", "trainer", "layer", "weights", "threads", "orthogonal", "profile")
ISSUE_GFLOP = 1.04  # issue 16's cost of a vit_tiny_patch4_32 training step per image
BF16 = "bf16" if cpu_has_native_bf16() else "fp32"
FULL = dict(matmul=2048, matmul_repeats=5, batch=128, digits_batch=64, trainer_images=2560, trainer_limit=None, trainer_epochs=2,
            layer_rounds=12, layer_steps=2, layer_compile=True, trainer_compile=True, thread_rounds=3, thread_steps=5,
            ortho_rounds=5, ortho_steps=3, profile_steps=2, gemm_repeats=5,
            thread_counts=(1, 2), loads=("idle", "loaded"))
QUICK = dict(matmul=256, matmul_repeats=2, batch=8, digits_batch=8, trainer_images=100, trainer_limit=24, trainer_epochs=1,
             layer_rounds=2, layer_steps=1, layer_compile=False, trainer_compile=False, thread_rounds=1, thread_steps=2,
             ortho_rounds=1, ortho_steps=1, profile_steps=1, gemm_repeats=1,
             thread_counts=(1,), loads=("idle",))  # one thread, no load process: never oversubscribes a shared machine


# -- helpers -------------------------------------------------------------------------------------------------------

def median_ci(values: list[float]) -> dict:
    """Median of per-round values with its 95% distribution-free interval (None with fewer than 6 rounds)."""
    out = dict(median=statistics.median(values), n=len(values))
    if len(values) >= 6:
        ci = stats.quantile_test(np.asarray(values), q=out["median"], p=0.5).confidence_interval(0.95)
        out["ci95"] = [float(ci.low), float(ci.high)]
    return out


def fmt(r: dict) -> str:
    ci = f" [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if "ci95" in r else ""
    return f"{r['median']:.3f}{ci}"


def matmul_peak(n: int, repeats: int, dtype: torch.dtype) -> float:
    """GFLOP/s of an n x n x n matmul, best of `repeats` after one warm-up."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def counted_gflop(name: str, batch: int = 8) -> float:
    """Matmul GFLOP per image of a training step (forward + backward), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = stochvit.create_model(name, stochastic=True)
    embed = model.patch_embed
    x = torch.randn(batch, embed.proj.in_channels, *embed.img_size)
    with FlopCounterMode(display=False) as fc:
        nn.functional.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long)).backward()
    return fc.get_total_flops() / batch / 1e9


def synthetic_folder(root: Path, n: int, size: int = 32) -> str:
    """`n` random RGB PNGs in 10 class folders: a CIFAR-size image folder (decoded into memory like the JPEGs)."""
    from torchvision.io import encode_png, write_file

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        d = root / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        write_file(str(d / f"{i}.png"), encode_png(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)))
    return f"imagefolder:{root}"


def training(data: str, batch: int, limit: int | None, tmp: Path, compile: bool = False):
    """The trainer's own `Training` (stochvit.train.prepare): default model, layer and precision for `data`."""
    from stochvit.train import TrainConfig, prepare

    cfg = TrainConfig(data=data, epochs=100, batch_size=batch, lr=1e-3, warmup_epochs=0, train_limit=limit, eval_samples=1,
                      compile=compile)
    cfg.validate()
    return prepare(cfg, tmp / f"run-{len(list(tmp.iterdir()))}")


def epoch_rate(t, batches=None) -> float:
    """Images/s of one pass of `batches` (default `t.loader`) through `stochvit.train.train_one_epoch`."""
    from stochvit.train import train_one_epoch

    s = train_one_epoch(t.model, t.loader if batches is None else batches, t.opt, sched=t.sched, loss_fn=t.loss_fn,
                        precision=t.precision, clip_grad=t.cfg.clip_grad, net=t.net)
    return s["images"] / s["seconds"]


def loader_rate(t) -> float:
    """Images/s of one pass of `t.loader` alone: decoding is done, so this is batching and augmentation."""
    start, n = time.perf_counter(), sum(len(y) for _, y in t.loader)
    return n / (time.perf_counter() - start)


LOAD_CODE = """
import torch, stochvit
from torch import nn
from stochvit.precision import autocast
m = stochvit.create_model("vit_tiny_patch4_32", stochastic=True)
opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
first = True
while True:
    with autocast("auto", torch.device("cpu"), m):
        loss = nn.functional.cross_entropy(m(x).float(), y)
    opt.zero_grad(); loss.backward(); opt.step()
    if first:
        print("ready", flush=True); first = False
"""


@contextlib.contextmanager
def background_load() -> Iterator[None]:
    """A child process training vit_tiny on torch's default threads for the duration; ended (by its pid) on exit."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    proc = subprocess.Popen([sys.executable, "-c", LOAD_CODE], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                            text=True, preexec_fn=child_dies_with_parent)
    try:
        if proc.stdout.readline().strip() != "ready":  # it has imported torch and taken one step
            raise RuntimeError(f"the background load process exited with status {proc.wait()}")
        yield
    finally:
        proc.kill()
        proc.wait()


def interleaved(cells: dict[str, Callable[[], None]], rounds: int, steps: int, alternate: bool = False,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per step of each cell per round: `steps` consecutive steps per cell, cells in order (reversed every
    other round when `alternate`), after `warmup` steps of each."""
    for fn in cells.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cells}
    for r in range(rounds):
        order = list(cells)[::-1] if alternate and r % 2 else list(cells)
        for k in order:
            t = time.perf_counter()
            for _ in range(steps):
                cells[k]()
            times[k].append((time.perf_counter() - t) / steps)
    return times


def ratio_rows(times: dict[str, list[float]], base: str, batch: int) -> dict[str, dict]:
    """Each cell's images/s (median) and its throughput ratio to `base`: per-round ratios and ratio of medians."""
    out = {}
    for k, ts in times.items():
        per_round = [b / t for b, t in zip(times[base], ts)]
        out[k] = dict(images_per_s=batch / statistics.median(ts), ratio=median_ci(per_round),
                      ratio_of_medians=statistics.median(times[base]) / statistics.median(ts))
    return out


def model_cells(name: str, variants: dict[str, dict], task: str, precision: str, batch: int) -> dict:
    """Step functions (throughput._step_fn) of `variants`: {label: dict(stochastic=..., sdpa=..., fused=...)}."""
    torch.manual_seed(0)
    embed = stochvit.create_model(name, stochastic=False).patch_embed
    x = torch.randn(batch, embed.proj.in_channels, *embed.img_size)
    y = torch.randint(0, 10, (batch,))
    cells = {}
    for label, v in variants.items():
        model = stochvit.create_model(name, stochastic=v["stochastic"])
        if v.get("fused"):
            stochvit.set_fused(model)
        if v.get("compile"):  # compiled on the first (warm-up) step, where interleaved() does not time it
            model = torch.compile(model)
        cells[label] = _step_fn(model, task, precision, x, y, sdpa=v.get("sdpa", False))
    return cells


# -- sections ------------------------------------------------------------------------------------------------------

def peak_section(c: dict, _tmp: Path) -> dict:
    dtype = torch.bfloat16 if BF16 == "bf16" else torch.float32
    return dict(dtype=str(dtype).removeprefix("torch."), n=c["matmul"], repeats=c["matmul_repeats"],
                threads=torch.get_num_threads(), gflop_per_s=matmul_peak(c["matmul"], c["matmul_repeats"], dtype))


def trainer_section(c: dict, tmp: Path, data: str | None, peak: dict) -> dict:
    spec = data or synthetic_folder(tmp / "cifar-size", c["trainer_images"])
    limit = c["trainer_limit"] if data is None else int(c["trainer_images"] * 0.8)
    t = training(spec, c["batch"], limit, tmp)
    epoch_rate(t)  # warm-up epoch
    tc = training(spec, c["batch"], limit, tmp, compile=True) if c["trainer_compile"] else None
    if tc is not None:
        epoch_rate(tc)  # warm-up epoch: the compilation
    one_batch = [next(iter(t.loader))] * len(t.loader)  # the same steps without the data pipeline
    rates, compiled_rates, batch_rates, loader_rates = [], [], [], []
    for _ in range(c["trainer_epochs"]):  # eager and compiled epochs interleaved
        rates.append(epoch_rate(t))
        batch_rates.append(epoch_rate(t, one_batch))
        loader_rates.append(loader_rate(t))
        if tc is not None:
            compiled_rates.append(epoch_rate(tc))
    ips = statistics.median(rates)
    counted = counted_gflop(t.cfg.model)
    out = dict(data=spec if data else f"synthetic CIFAR-size PNG folder ({c['trainer_images']} images, 80% train)",
               model=t.cfg.model, stochastic=t.cfg.stochastic is not None, precision=t.precision, batch=c["batch"],
               train_images=len(t.data.train), epochs_timed=len(rates), images_per_s=ips,
               gflop_per_image_issue=ISSUE_GFLOP, gflop_per_image_counted=counted,
               one_batch_images_per_s=statistics.median(batch_rates), loader_images_per_s=statistics.median(loader_rates))
    out["limit_images_per_s"] = peak["gflop_per_s"] / ISSUE_GFLOP
    out["ratio_to_limit"] = ips / out["limit_images_per_s"]
    out["ratio_to_limit_counted"] = ips / (peak["gflop_per_s"] / counted)
    if compiled_rates:  # `stochvit train --compile`
        out["compiled_images_per_s"] = statistics.median(compiled_rates)
        out["compiled_ratio_to_limit"] = out["compiled_images_per_s"] / out["limit_images_per_s"]
    return out


def layer_section(c: dict, _tmp: Path) -> dict:
    variants = {"plain": dict(stochastic=False), "stochastic": dict(stochastic=True),
                "stochastic-fused": dict(stochastic=True, fused=True),
                "plain-sdpa": dict(stochastic=False, sdpa=True), "stochastic-sdpa": dict(stochastic=True, sdpa=True)}
    compiled = ("plain-compiled", "stochastic-compiled")
    if c["layer_compile"]:  # both models compiled whole: the scale joins the bias + GELU kernel the plain model has too
        variants |= {k: dict(stochastic=k.startswith("stochastic"), compile=True) for k in compiled}
    explicit = ("plain", "stochastic", "stochastic-fused")
    out = dict(model="vit_tiny_patch4_32", precision=BF16, batch=c["batch"], rounds=c["layer_rounds"])
    cells = model_cells("vit_tiny_patch4_32", variants, "train", BF16, c["batch"])
    blocks = interleaved(cells, c["layer_rounds"], c["layer_steps"])
    out["blocks"] = dict(steps=c["layer_steps"], explicit=ratio_rows({k: blocks[k] for k in explicit}, "plain", c["batch"]),
                         sdpa=ratio_rows({k: blocks[k] for k in ("plain-sdpa", "stochastic-sdpa")}, "plain-sdpa", c["batch"]))
    if c["layer_compile"]:
        out["blocks"]["explicit, compiled"] = ratio_rows({k: blocks[k] for k in compiled}, "plain-compiled", c["batch"])
        out["compile_speedup"] = dict(plain=ratio_rows({k: blocks[k] for k in ("plain", "plain-compiled")}, "plain",
                                                       c["batch"])["plain-compiled"]["ratio"],
                                      stochastic=ratio_rows({k: blocks[k] for k in ("stochastic", "stochastic-compiled")},
                                                            "stochastic", c["batch"])["stochastic-compiled"]["ratio"])
    alt = interleaved({k: cells[k] for k in explicit}, c["layer_rounds"], 1, alternate=True)
    out["alternating"] = dict(steps=1, explicit=ratio_rows(alt, "plain", c["batch"]))
    return out


def bf16_weights_step(name: str, x: torch.Tensor, y: torch.Tensor, compile: bool = False) -> Callable[[], None]:
    """A training step of `name` (default layer) on bf16 weights, with fp32 master weights in AdamW: no autocast.
    `compile`: the bf16 model compiled and AdamW fused too (every lever at once)."""
    import copy

    master = stochvit.create_model(name, stochastic=True).train()
    work = copy.deepcopy(master).to(torch.bfloat16)
    for m in work.modules():  # timm's explicit attention path, as stochvit's autocast runs it on a CPU
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    pairs = list(zip(master.parameters(), work.parameters()))
    opt = torch.optim.AdamW(master.parameters(), lr=1e-4, fused=compile)
    xb = x.to(torch.bfloat16)
    forward = torch.compile(work) if compile else work

    def step() -> None:
        loss = nn.functional.cross_entropy(forward(xb).float(), y)
        for _, w in pairs:
            w.grad = None
        loss.backward()
        for m, w in pairs:
            m.grad = w.grad.float()
        opt.step()
        with torch.no_grad():
            for m, w in pairs:
                w.copy_(m)

    return step


def weights_section(c: dict, _tmp: Path) -> dict:
    if BF16 != "bf16":
        return dict(skipped="this CPU has no native bf16")
    variants = {"autocast": dict(stochastic=True)} | ({"autocast-compiled": dict(stochastic=True, compile=True)}
                                                      if c["layer_compile"] else {})
    cells = model_cells("vit_tiny_patch4_32", variants, "train", BF16, c["batch"])
    torch.manual_seed(0)
    x, y = torch.randn(c["batch"], 3, 32, 32), torch.randint(0, 10, (c["batch"],))
    cells["bf16-weights"] = bf16_weights_step("vit_tiny_patch4_32", x, y)
    if c["layer_compile"]:
        cells["bf16-weights-compiled-fused-adamw"] = bf16_weights_step("vit_tiny_patch4_32", x, y, compile=True)
    times = interleaved(cells, c["layer_rounds"], c["layer_steps"], alternate=True)
    return dict(model="vit_tiny_patch4_32 (default layer)", batch=c["batch"], rounds=c["layer_rounds"],
                rows=ratio_rows(times, "autocast", c["batch"]))


def _thread_rates(t, rounds: int, counts: tuple[int, ...]) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {str(n): [] for n in counts}
    for _ in range(rounds):
        for n in counts:
            torch.set_num_threads(n)
            rates[str(n)].append(epoch_rate(t))
    return rates


def threads_section(c: dict, tmp: Path, models: tuple[str, ...] = ("digits", "cifar-size"), loads: tuple[str, ...] | None = None,
                    child: bool = True) -> dict:
    loads = c["loads"] if loads is None else loads
    before = torch.get_num_threads()
    specs = {"digits": ("digits", c["digits_batch"])}
    if "cifar-size" in models:
        folder = synthetic_folder(tmp / "threads-cifar", max(100, int(c["thread_steps"] * c["batch"] / 0.8) + 10))
        specs["cifar-size"] = (folder, c["batch"])
    trainings = {m: training(specs[m][0], specs[m][1], c["thread_steps"] * specs[m][1], tmp) for m in models}
    rows = []
    try:
        for load in loads:
            with background_load() if load == "loaded" else contextlib.nullcontext():
                for m, t in trainings.items():
                    epoch_rate(t)  # warm-up
                    rates = _thread_rates(t, c["thread_rounds"], c["thread_counts"])
                    rows.append(dict(model=t.cfg.model, data=m, precision=t.precision, load=load,
                                     wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"), batch=specs[m][1],
                                     steps=c["thread_steps"], rounds=c["thread_rounds"],
                                     images_per_s={n: statistics.median(v) for n, v in rates.items()}))
                    ips = rows[-1]["images_per_s"]
                    rows[-1]["two_over_one"] = ips["2"] / ips["1"] if {"1", "2"} <= set(ips) else None
    finally:
        torch.set_num_threads(before)
    if child and "loaded" in loads:  # OMP_WAIT_POLICY is read when OpenMP starts: a child process of this section
        out = tmp / "passive.json"
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        env.pop("OMP_NUM_THREADS", None)
        subprocess.run([sys.executable, str(Path(__file__).with_name("throughput.py")), "--sections", "threads-passive",
                        "--out", str(out), "--rounds", str(c["thread_rounds"])], env=env, check=True,
                       preexec_fn=child_dies_with_parent)
        rows += json.loads(out.read_text())["threads"]["rows"]
    return dict(rows=rows)


def orthogonal_section(c: dict, _tmp: Path) -> dict:
    variants = {"plain": dict(stochastic=False), "diagonal": dict(stochastic=True),
                "orthogonal": dict(stochastic=dict(kind="full", distribution="orthogonal"))}
    out = dict(model="vit_digits_patch2_8", precision="fp32", batch=c["digits_batch"], rounds=c["ortho_rounds"])
    for task in ("train", "infer"):
        cells = model_cells("vit_digits_patch2_8", variants, task, "fp32", c["digits_batch"])
        out[task] = ratio_rows(interleaved(cells, c["ortho_rounds"], c["ortho_steps"]), "diagonal", c["digits_batch"])
    return out


def profile_section(c: dict, _tmp: Path, top: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile

    step = model_cells("vit_tiny_patch4_32", {"stochastic": dict(stochastic=True)}, "train", BF16, c["batch"])["stochastic"]
    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(c["profile_steps"]):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [dict(op=e.key, self_cpu_ms_per_step=e.self_cpu_time_total / 1e3 / c["profile_steps"],
                 share=e.self_cpu_time_total / total, calls_per_step=e.count / c["profile_steps"]) for e in events[:top]]
    return dict(model="vit_tiny_patch4_32 (default layer)", precision=BF16, batch=c["batch"], steps=c["profile_steps"],
                threads=torch.get_num_threads(), self_cpu_ms_per_step=total / 1e3 / c["profile_steps"], top=rows,
                copies=step_copies(step, top))


COPY_OPS = ("aten.copy_", "aten._to_copy", "aten.clone")


def record_ops(step: Callable[[], None], on_op: Callable[[Any, tuple, dict, Any], None]) -> None:
    """Run `step` once under a TorchDispatchMode that calls `on_op(func, args, kwargs, out)` after every aten op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            on_op(func, args, kwargs or {}, out)
            return out

    with Record():
        step()


def step_copies(step: Callable[[], None], top: int) -> list[dict]:
    """The copies of one call of `step` (copy_, _to_copy, clone), grouped by op, dtypes and the autograd node that ran
    them ("forward" outside the backward), largest traffic first: where the profile's `aten::copy_` comes from. This is
    how the layer's in-place scale was found rebuilding fc1's output in the backward (CopySlices)."""
    from collections import defaultdict

    groups: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])

    def count(func, args, _kwargs, out) -> None:
        name = str(func.overloadpacket)
        if name in COPY_OPS and isinstance(out, torch.Tensor):
            src = args[1] if name == "aten.copy_" else args[0]
            node = torch._C._current_autograd_node()
            key = (name, f"{src.dtype} -> {out.dtype}".replace("torch.", ""),
                   type(node).__name__ if node is not None else "forward")
            groups[key][0] += 1
            groups[key][1] += out.numel() * out.element_size()

    record_ops(step, count)
    rows = [dict(op=k[0], dtypes=k[1], autograd_node=k[2], calls=n, megabytes=b / 1e6) for k, (n, b) in groups.items()]
    return sorted(rows, key=lambda r: r["megabytes"], reverse=True)[:top]


MATMUL_OPS = {"aten.mm": 0, "aten.addmm": 1, "aten.bmm": 0}  # op -> index of its first matrix operand


class TensorSpec(NamedTuple):
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


def step_matmuls(step: Callable[[], None]) -> list[tuple]:
    """The matmul calls of one call of `step`: (op, args with each tensor as its TensorSpec, kwargs), in order."""
    calls = []

    def keep(func, args, kwargs, _out) -> None:
        if str(func.overloadpacket) in MATMUL_OPS:
            calls.append((func, tuple(TensorSpec(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor)
                                      else a for a in args), kwargs))

    record_ops(step, keep)
    return calls


def matmul_flop(func, args: tuple) -> int:
    """2 m k n (times the batch for bmm) from the specs of the two matrix operands."""
    first = MATMUL_OPS[str(func.overloadpacket)]
    (*batch, m, k), n = args[first].shape, args[first + 1].shape[-1]
    return 2 * m * k * n * (batch[0] if batch else 1)


def gemms_section(c: dict, _tmp: Path) -> dict:
    step = model_cells("vit_tiny_patch4_32", {"stochastic": dict(stochastic=True)}, "train", BF16, c["batch"])["stochastic"]
    step()
    calls = step_matmuls(step)
    replay = [(func, [torch.randn(a.shape, dtype=a.dtype).as_strided(a.shape, a.stride) if isinstance(a, TensorSpec)
                      else a for a in args], kw) for func, args, kw in calls]
    flop = sum(matmul_flop(func, args) for func, args, _ in calls)
    best = 0.0
    for func, args, kw in replay:  # each call's best of `gemm_repeats` after one warm-up: operands in cache, as in the
        func(*args, **kw)          # step, where a matmul reads what the op before it just wrote
        times = []
        for _ in range(c["gemm_repeats"]):
            t = time.perf_counter()
            func(*args, **kw)
            times.append(time.perf_counter() - t)
        best += min(times)
    return dict(model="vit_tiny_patch4_32 (default layer)", precision=BF16, batch=c["batch"], calls=len(calls),
                gflop_per_image=flop / c["batch"] / 1e9, matmul_seconds_per_step=best, gflop_per_s=flop / best / 1e9,
                ceiling_images_per_s=c["batch"] / best, threads=torch.get_num_threads())


# -- report --------------------------------------------------------------------------------------------------------

def markdown(r: dict) -> str:
    lines = [f"# Scale study (`benchmarks/throughput.py --sections`), {r['machine']}, torch {r['torch']}, "
             f"{r['torch_threads']} threads{' (quick: toy sizes)' if r['quick'] else ''}; {r.get('total_seconds', 0):.0f} s", ""]
    if "peak" in r:
        p = r["peak"]
        lines += [f"**matmul peak** ({p['dtype']}, {p['n']}^3, best of {p['repeats']}): {p['gflop_per_s']:.0f} GFLOP/s", ""]
    if "trainer" in r:
        t = r["trainer"]
        lines += [f"**trainer** ({t['model']}, default layer: {t['stochastic']}, {t['precision']}, batch {t['batch']}, "
                  f"{t['data']}): {t['images_per_s']:.1f} img/s; limit peak/{t['gflop_per_image_issue']} GFLOP = "
                  f"{t['limit_images_per_s']:.0f} img/s; **ratio {t['ratio_to_limit']:.3f}** (counted "
                  f"{t['gflop_per_image_counted']:.3f} GFLOP/image: {t['ratio_to_limit_counted']:.3f})"
                  + (f"; with `--compile` {t['compiled_images_per_s']:.1f} img/s, **ratio {t['compiled_ratio_to_limit']:.3f}**"
                     if "compiled_images_per_s" in t else ""), "",
                  f"the same eager steps on one repeated batch (no data pipeline): {t['one_batch_images_per_s']:.1f} img/s; "
                  f"the loader alone (batching, augmentation): {t['loader_images_per_s']:.0f} img/s", ""]
    if "gemms" in r:
        g = r["gemms"]
        share = f" = {g['gflop_per_s'] / r['peak']['gflop_per_s']:.2f} of the peak" if "peak" in r else ""
        lines += [f"**matmuls alone** (the {g['calls']} mm/addmm/bmm calls of one {g['precision']} training step of "
                  f"{g['model']}, batch {g['batch']}, replayed, each call's best of {r['settings']['gemm_repeats']}): "
                  f"{g['gflop_per_s']:.0f} GFLOP/s at the model's shapes{share}; {g['gflop_per_image']:.3f} GFLOP/image; ceiling "
                  f"{g['ceiling_images_per_s']:.0f} img/s"
                  + (f"; the trainer reaches **{r['trainer']['images_per_s'] / g['ceiling_images_per_s']:.3f}** of it"
                     + (f" eager, **{r['trainer']['compiled_images_per_s'] / g['ceiling_images_per_s']:.3f}** compiled"
                        if "compiled_images_per_s" in r["trainer"] else "") if "trainer" in r else ""), ""]
    if "layer" in r:
        L = r["layer"]
        lines += [f"**default layer vs plain**, {L['precision']} training, batch {L['batch']}, {L['rounds']} rounds "
                  "(median of per-round ratios [95% CI]; ratio of medians)", "",
                  "| method | attention | layer | plain img/s | stochastic img/s | ratio | ratio of medians |",
                  "|---|---|---|---|---|---|---|"]
        for method in ("blocks", "alternating"):
            for att, rows in L[method].items():
                if att == "steps":
                    continue
                (_, base), *others = rows.items()
                for label, sto in others:
                    layer = ("fused (set_fused)" if label.endswith("-fused") else
                             "both models torch.compile'd" if label.endswith("-compiled") else "eager")
                    lines.append(f"| {method} ({L[method]['steps']} steps) | {att} | {layer} | {base['images_per_s']:.1f} | "
                                 f"{sto['images_per_s']:.1f} | {fmt(sto['ratio'])} | {sto['ratio_of_medians']:.3f} |")
        lines.append("")
        if "compile_speedup" in L:
            lines += ["torch.compile's speed-up of the training step (compiled over eager, explicit attention): plain "
                      f"{fmt(L['compile_speedup']['plain'])}, stochastic {fmt(L['compile_speedup']['stochastic'])}", ""]
    if "weights" in r and "rows" in r["weights"]:
        w = r["weights"]
        rows = w["rows"]
        lines += [f"**bf16 weights** ({w['model']}, batch {w['batch']}, {w['rounds']} alternating rounds; ratio to "
                  "today's eager autocast step)", "", "| step | img/s | ratio [95% CI] |", "|---|---|---|"]
        lines += [f"| {k} | {row['images_per_s']:.1f} | {fmt(row['ratio'])} |" for k, row in rows.items()] + [""]
    if "threads" in r:
        lines += ["**threads** (training img/s through train_one_epoch, medians of interleaved rounds)", "",
                  "| model | precision | load | OMP_WAIT_POLICY | 1 thread | 2 threads | 2 / 1 |",
                  "|---|---|---|---|---|---|---|"]
        for t in r["threads"]["rows"]:
            ips = t["images_per_s"]
            cells = [f"{ips[n]:.1f}" if n in ips else "-" for n in ("1", "2")]
            ratio = "-" if t["two_over_one"] is None else f"{t['two_over_one']:.3f}"
            lines.append(f"| {t['model']} | {t['precision']} | {t['load']} | {t['wait_policy']} | {' | '.join(cells)} "
                         f"| {ratio} |")
        lines.append("")
    if "orthogonal" in r:
        o = r["orthogonal"]
        lines += [f"**orthogonal vs diagonal** ({o['model']}, fp32, batch {o['batch']}, {o['rounds']} rounds; ratio to "
                  "diagonal)", "", "| task | model | img/s | ratio [95% CI] |", "|---|---|---|---|"]
        for task in ("train", "infer"):
            for name, row in o[task].items():
                lines.append(f"| {task} | {name} | {row['images_per_s']:.1f} | {fmt(row['ratio'])} |")
        lines.append("")
    if "profile" in r:
        p = r["profile"]
        lines += [f"**profile**: one {p['precision']} training step of {p['model']}, batch {p['batch']}, {p['threads']} "
                  f"threads: {p['self_cpu_ms_per_step']:.0f} ms self CPU per step", "",
                  "| op | self CPU ms / step | share | calls / step |", "|---|---|---|---|"]
        for e in p["top"]:
            lines.append(f"| `{e['op']}` | {e['self_cpu_ms_per_step']:.1f} | {e['share']:.1%} | {e['calls_per_step']:g} |")
        lines += ["", "the step's copies by autograd node (written MB per step):", "",
                  "| op | dtypes | autograd node | calls | MB |", "|---|---|---|---|---|"]
        lines += [f"| `{e['op']}` | {e['dtypes']} | {e['autograd_node']} | {e['calls']} | {e['megabytes']:.1f} |"
                  for e in p.get("copies", [])]
        lines.append("")
    return "\n".join(lines)


def main(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trainer-data", default=None, help="dataset spec for the trainer section (None: synthetic PNGs)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of the layer, threads and orthogonal sections")
    p.add_argument("--threads", type=int, default=None, help="torch threads outside the threads section (None: torch's)")
    p.add_argument("--batch-size", type=int, default=None, help="CIFAR-size batch of every section (None: 128, quick 8)")
    a = p.parse_args()
    sections = SECTIONS if a.sections == "all" else tuple(x.strip() for x in a.sections.split(",") if x.strip())
    passive = sections == ("threads-passive",)
    bad = set(sections) - set(SECTIONS) if not passive else set()
    if bad:
        p.error(f"--sections: unknown {sorted(bad)}; choose from {', '.join(SECTIONS)} or all")
    c = dict(QUICK if a.quick else FULL)
    if a.rounds:
        c.update(layer_rounds=a.rounds, thread_rounds=a.rounds, ortho_rounds=a.rounds)
    if a.batch_size:
        c["batch"] = a.batch_size
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict = dict(machine=platform.processor() or platform.machine(), torch=torch.__version__,
                        torch_threads=torch.get_num_threads(), quick=a.quick, settings=c, native_bf16=cpu_has_native_bf16(),
                        precision_auto_vit_tiny=resolve_precision("auto", torch.device("cpu"),
                                                                   stochvit.create_model("vit_tiny_patch4_32")))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in sections:
            t = time.perf_counter()
            if passive:
                result["threads"] = threads_section(c, tmp, models=("digits",), loads=("idle", "loaded"), child=False)
            elif name == "trainer":
                result["peak"] = result.get("peak") or peak_section(c, tmp)
                result["trainer"] = trainer_section(c, tmp, a.trainer_data, result["peak"])
            else:
                result[name] = dict(peak=peak_section, gemms=gemms_section, layer=layer_section, weights=weights_section,
                                    threads=threads_section, orthogonal=orthogonal_section,
                                    profile=profile_section)[name](c, tmp)
            result.setdefault("seconds", {})[name] = time.perf_counter() - t
            result["total_seconds"] = time.perf_counter() - t0
            out.write_text(json.dumps(result, indent=2) + "\n")  # after every section: a late failure keeps the rest
            print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    if not passive:
        out.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
