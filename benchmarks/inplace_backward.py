"""The default layer's in-place scale under autograd, before and after the fix, timed side by side.

    python benchmarks/inplace_backward.py --out benchmarks/results/inplace-backward-xeon.json

`StochasticMlp` used to scale fc1's output in place in training too. That output is a view of its matmul's
result, so autograd rebuilt the base in the backward (CopySlices, AsStrided): four activation-sized copies per MLP.
The layer now scales in place only where autograd does not record (stochvit.layers.StochasticLinear.forward). This
times, in one process with interleaved rounds, bf16 training steps of vit_tiny_patch4_32: plain, the default layer as
it is, and the default layer with the old in-place forward patched back in. Median of per-round ratios to plain, and
of the fixed layer's step rate over the old one's, with 95% distribution-free intervals (scipy's quantile_test, via
scale_sections.median_ci).
"""

from __future__ import annotations

import argparse
import json
import platform
import types
from pathlib import Path

import torch
from scale_sections import BF16, interleaved, ratio_rows
from throughput import _step_fn

import stochvit


def inplace_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The pre-fix StochasticMlp.forward at its default settings: fc1, scale in place, activation, fc2."""
    x = self.fc1(x)
    x = x.mul_(self.stochastic.draw(x))
    return self.fc2(self.act(x))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/inplace-backward.json")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    a = p.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(a.batch_size, 3, 32, 32), torch.randint(0, 10, (a.batch_size,))
    models = {"plain": stochvit.create_model("vit_tiny_patch4_32", stochastic=False),
              "stochastic": stochvit.create_model("vit_tiny_patch4_32"),
              "stochastic-inplace": stochvit.create_model("vit_tiny_patch4_32")}
    for block in models["stochastic-inplace"].blocks:
        block.mlp.forward = types.MethodType(inplace_forward, block.mlp)
    cells = {k: _step_fn(m, "train", BF16, x, y) for k, m in models.items()}
    times = interleaved(cells, a.rounds, 2, alternate=True)
    rows = ratio_rows(times, "plain", a.batch_size)
    fix = ratio_rows(times, "stochastic-inplace", a.batch_size)["stochastic"]  # the fix's speed-up of the layer's step
    result = dict(machine=platform.processor() or platform.machine(), torch=torch.__version__,
                  threads=torch.get_num_threads(), precision=BF16, batch=a.batch_size, rounds=a.rounds, rows=rows,
                  fix_speedup=fix["ratio"])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    for k, r in rows.items():
        ci = r["ratio"].get("ci95", [float("nan")] * 2)
        print(f"{k:<20} {r['images_per_s']:7.1f} img/s  ratio to plain {r['ratio']['median']:.3f} "
              f"[{ci[0]:.3f}, {ci[1]:.3f}]  ratio of medians {r['ratio_of_medians']:.3f}")
    ci = fix["ratio"].get("ci95", [float("nan")] * 2)
    print(f"the fix's speed-up (stochastic over stochastic-inplace): {fix['ratio']['median']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")


if __name__ == "__main__":
    main()
