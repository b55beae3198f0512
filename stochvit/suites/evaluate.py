"""`stochvit evaluate`: accuracy, NLL, Brier and ECE of a run, single-pass (mean ± std) and K-sample."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..eval.metrics import mc_metrics
from ..layers import sampling
from ..predict import dataset_probs
from ..runs import Run, check_compatible, data_for, load_run, write_json

SPLITS = ("test", "val")


def evaluate(run: Run, data_spec: str | None = None, data_dir: str | None = None, samples: int = 10, mode: str = "on",
             split: str = "test", precision: str = "auto") -> dict:
    data = data_for(run.config, data_spec, data_dir)
    check_compatible(run.config, data)
    with sampling(run.model, mode):
        probs, labels = dataset_probs(run.model, getattr(data, split), samples, precision=precision)
    non_finite = warn_non_finite(probs, f"{run.path} on {data.name} ({split})")
    result = mc_metrics(probs, labels)
    return dict(run=str(run.path), data=data.name, split=split, mode=mode, **result,
                **(dict(non_finite_fraction=non_finite) if non_finite else {}))


def warn_non_finite(probs: torch.Tensor, what: str) -> float:
    """Fraction of predictions (pass x image) that are not finite, warned about in one stderr line when > 0.

    NaN weights used to evaluate silently to chance accuracy (argmax of NaN is 0) with NLL nan.
    """
    bad = (~torch.isfinite(probs)).any(dim=-1).float().mean().item()
    if bad:
        print(f"stochvit: warning: {what}: {bad:.1%} of the model's outputs are NaN or infinite (NaN or overflowing "
              "weights?); its accuracy and calibration figures are meaningless", file=sys.stderr, flush=True)
    return bad


def format_table(result: dict) -> str:
    keys = list(result["mc_average"])
    lines = [f"{'metric':<10} {'single pass (mean ± std)':>26} {'K=' + str(result['samples']) + ' average':>14}"]
    for k in keys:
        s = result["single_pass"][k]
        lines.append(f"{k:<10} {s['mean']:>17.4f} ± {s['std']:.4f} {result['mc_average'][k]:>14.4f}")
    return "\n".join(lines)


def run_evaluate(run_dir: str, data: str | None, data_dir: str | None, samples: int, mode: str, split: str) -> Path:
    run = load_run(run_dir)
    result = evaluate(run, data, data_dir, samples, mode, split)
    tag = (data or run.config["train"]["data"]).replace(":", "_").replace("/", "_")
    out = run.path / f"eval-{tag}-{split}-{mode}-k{result['samples']}.json"
    write_json(out, result)
    print(f"{run.path} on {result['data']} ({split}, mode={mode})\n{format_table(result)}\nwrote {out}")
    return out
