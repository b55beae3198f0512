"""Throughput of plain vs stochastic ViTs, measured side by side in one process with interleaved repeats.

    python benchmarks/throughput.py --out benchmarks/results/throughput.json            # the cells below
    python benchmarks/throughput.py --sections all --out benchmarks/results/throughput-scale.json   # the scale study
    python benchmarks/throughput.py --sections all --quick --out /tmp/t.json            # the same at toy size (seconds)

With `--sections` (see `scale_sections.py` beside this file) it measures instead, in one run, what issue 16 asks:
the bf16 matmul peak beside the end-to-end trainer (their ratio), the default layer against the plain model in bf16
training by two interleaving methods, threads 1 vs 2 idle and beside a load, the orthogonal kind at digits width, and
a torch.profiler breakdown of one bf16 training step; it writes JSON and a Markdown table beside it.

Models: plain timm `vit_tiny_patch4_32`, the same with the default stochastic layer (diagonal U[0.5,1.5],
token-consistent, pre-activation), eager or with its scale compiled into the activation (`stochvit.set_fused`; compiled
during the warm-up), and with the full kind (Gaussian random projection, or Haar-orthogonal: a Householder QR of a
C x C Gaussian per image and block, applied without forming Q). `ratio_to_diagonal` compares each model with the
default diagonal layer timed beside it. `plain-sdpa` is the plain model with timm's fused attention kernel kept
in bf16 on a CPU, which stochvit's autocast replaces by the explicit path (stochvit.precision).
Training = forward + backward + AdamW step; inference = forward under no_grad in eval(). Batch 128.
Every (model, task, precision) cell is timed once per round, rounds interleaved, and the median kept,
so slow drifts of the machine hit all models alike; the ratios are what to read.

End-to-end trainer speed (`--trainer-data SPEC`): in the same process, right after the cells, `stochvit.train` runs
2 epochs of the plain model on `--trainer-limit` images of SPEC at default precision (data loading and augmentation
included); its last-epoch images/s is divided by the plain fp32 pure training-step rate measured above.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import stochvit
from stochvit.precision import autocast, cpu_has_native_bf16

MODELS = {
    "plain": False,
    "stochastic-diagonal": True,
    "stochastic-diagonal-fused": True,  # the same layer with stochvit.set_fused: scale compiled into the activation
    "stochastic-full-gaussian": dict(kind="full", distribution="gaussian"),
    "stochastic-full-orthogonal": dict(kind="full", distribution="orthogonal"),  # a Haar draw per image and block
    "plain-sdpa": False,  # plain, but bf16 on a CPU keeps timm's fused SDPA kernel (stochvit.precision.autocast)
}


def _step_fn(model: nn.Module, task: str, precision: str, x: torch.Tensor, y: torch.Tensor, sdpa: bool = False):
    device = torch.device("cpu")
    switch = None if sdpa else model  # autocast(model=None) leaves the attention path alone
    if task == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()

        def step() -> None:
            with autocast(precision, device, switch):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        @torch.no_grad()
        def step() -> None:
            with autocast(precision, device, switch):
                model(x)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/throughput.json")
    p.add_argument("--sections", default=None, help="comma list of peak,trainer,layer,threads,orthogonal,profile or all: "
                   "the scale study (scale_sections.py) instead of the cells")
    p.add_argument("--quick", action="store_true", help="with --sections: toy sizes, seconds (for the tests)")
    a, _ = p.parse_known_args()
    if a.sections is None:
        legacy_main(p)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import scale_sections

    scale_sections.main(p)


def legacy_main(p: argparse.ArgumentParser) -> None:
    """The cells of every model x task x precision (the command lines in RESULTS.md before `--sections`)."""
    p.add_argument("--model", default="vit_tiny_patch4_32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per cell per round")
    p.add_argument("--precisions", default=None,
                   help="comma list of fp32,bf16 (default: fp32, plus bf16 where the CPU runs it natively)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)} (plain is always timed)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--trainer-data", default=None, help="also time `stochvit train` end to end on this dataset spec")
    p.add_argument("--trainer-limit", type=int, default=2560, help="training images for the trainer timing")
    a = p.parse_args()
    if a.precisions is None:
        a.precisions = "fp32,bf16" if cpu_has_native_bf16() else "fp32"
    unknown = set(a.models.split(",")) - set(MODELS)
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; choose from {', '.join(MODELS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    embed = stochvit.create_model(a.model, stochastic=False).patch_embed  # the model's own input shape
    x = torch.randn(a.batch_size, embed.proj.in_channels, *embed.img_size)
    y = torch.randint(0, 10, (a.batch_size,))
    cells = {}
    for prec in a.precisions.split(","):
        for task in ("train", "infer"):
            for name in ["plain"] + [m for m in a.models.split(",") if m != "plain"]:
                model = stochvit.create_model(a.model, stochastic=MODELS[name])
                if name.endswith("-fused"):
                    stochvit.set_fused(model)
                cells[(name, task, prec)] = _step_fn(model, task, prec, x, y, sdpa=name.endswith("-sdpa"))
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
        if ("stochastic-diagonal", task, prec) in times:
            rows[-1]["ratio_to_diagonal"] = ips / (a.batch_size / statistics.median(times[("stochastic-diagonal", task, prec)]))
    result = dict(model=a.model, batch_size=a.batch_size, rounds=a.rounds, steps=a.steps, threads=torch.get_num_threads(),
                  torch=torch.__version__, machine=platform.processor() or platform.machine(), rows=rows)
    if a.trainer_data:
        result["trainer"] = _trainer_speed(a, a.batch_size / statistics.median(times[("plain", "train", "fp32")]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':<28}{'task':<7}{'prec':<6}{'img/s':>9}{'ratio':>8}{'vs diag':>9}")
    for r in rows:
        print(f"{r['model']:<28}{r['task']:<7}{r['precision']:<6}{r['images_per_s']:>9.1f}{r['ratio_to_plain']:>8.3f}"
              + (f"{r['ratio_to_diagonal']:>9.3f}" if "ratio_to_diagonal" in r else ""))
    if "trainer" in result:
        t = result["trainer"]
        print(f"stochvit train ({t['precision']}, data pipeline included): {t['images_per_s']:.1f} img/s = "
              f"{t['ratio_to_plain_fp32_step']:.3f} x the plain fp32 training-step rate")


def _trainer_speed(a: argparse.Namespace, fp32_step_rate: float) -> dict:
    """Last-epoch images/s of `stochvit.train` (plain model, default precision) against the pure fp32 step rate."""
    import tempfile

    from stochvit.runs import read_json
    from stochvit.train import TrainConfig, train

    cfg = TrainConfig(data=a.trainer_data, model=a.model, stochastic=None, epochs=2, batch_size=a.batch_size, lr=1e-3,
                      train_limit=a.trainer_limit, eval_samples=1)
    with tempfile.TemporaryDirectory() as tmp:
        run = train(cfg, out=Path(tmp) / "run", quiet=True)
        last = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line][-1]
        ips = json.loads(last)["train_images_per_s"]
        precision = read_json(run / "summary.json", "summary")["precision"]
    return dict(data=a.trainer_data, images=a.trainer_limit, precision=precision, images_per_s=ips,
                plain_fp32_step_images_per_s=fp32_step_rate, ratio_to_plain_fp32_step=ips / fp32_step_rate)


if __name__ == "__main__":
    main()
