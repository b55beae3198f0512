"""`stochvit evaluate`: accuracy, NLL, Brier and ECE of a run, single-pass (mean ± std) and K-sample.

`run(Settings(run_dir))` writes RUN_DIR/eval-...json (named by the settings) and returns an `EvaluateResult`.
On the run's own data by default; `data` evaluates on any other labelled data with the run's class names (a folder
of class folders, or the official CIFAR-10 test set through torchvision's files), and `split="all"` on every image
of it, which is what an external test set is for.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import DataBundle, ImageSet
from ..errors import UserError
from ..eval.metrics import mc_metrics
from ..layers import is_random, sampling
from ..precision import resolve_device
from ..predict import dataset_probs, seeded
from ..runs import Run, check_compatible, check_overwrite, data_for, load_run, write_json
from .settings import EvaluateSettings as Settings
from .settings import Result, record

SPLITS = ("test", "val", "all")


def check_class_names(config: dict, data: DataBundle) -> None:
    """Another dataset's label i must name the run's class i: same names in the same order (ImageFolder sorts them)."""
    want = config.get("data", {}).get("class_names")
    if want is not None and list(want) != list(data.class_names):
        order = " (the same names in another order)" if sorted(want) == sorted(data.class_names) else ""
        raise UserError(f"data {data.name!r} has classes {', '.join(data.class_names)} but the run was trained on "
                        f"{', '.join(want)}{order}; its labels would not mean the run's classes")


def every_image(data: DataBundle) -> ImageSet:
    """Train, val and test of `data` together, without augmentation: each image once."""
    parts = (data.train, data.val, data.test)
    return ImageSet(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def evaluate(run: Run, data_spec: str | None = None, data_dir: str | None = None, samples: int = 10, mode: str = "on",
             split: str = "test", precision: str = "auto", batch_size: int = 256) -> dict:
    own = data_spec is None or data_spec == run.config["train"]["data"]
    if split not in SPLITS:
        raise UserError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if split == "all" and own:
        raise UserError("split 'all' evaluates on every image of another dataset (data=...); the run's own data holds "
                        "its training images")
    data = data_for(run.config, data_spec, data_dir)
    check_compatible(run.config, data)
    if not own:
        check_class_names(run.config, data)
    dataset = every_image(data) if split == "all" else getattr(data, split)
    with sampling(run.model, mode):  # mode="mean" of a kind="full" run: a UserError, one line
        probs, labels = dataset_probs(run.model, dataset, samples, batch_size, precision)
    non_finite = warn_non_finite(probs, f"{run.path} on {data.name} ({split})")
    result = mc_metrics(probs, labels)
    images = (f"every image of {data.name} ({len(dataset)})" if split == "all" else
              data.test_source() if split == "test" else f"the validation split of {data.name} ({len(dataset)} images)")
    return dict(run=str(run.path), data=data.name, split=split, images=images, mode=mode, **result,
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


def output_path(s: Settings, run: Run) -> Path:
    """RUN_DIR/eval-<data>-<split>-<mode>-k<K>-seed<S>.json: a file per setting that changes the numbers."""
    if s.out is not None:
        return Path(s.out)
    tag = (s.data or run.config["train"]["data"]).replace(":", "_").replace("/", "_")
    k = s.samples if s.mode == "on" and is_random(run.model) else 1  # the passes that differ: one for a fixed model
    return run.path / f"eval-{tag}-{s.split}-{s.mode}-k{k}-seed{s.seed}.json"


@dataclass
class EvaluateResult(Result):
    """`out`: the JSON file written (None, with a warning, when it could not be); `report`: what it holds."""

    report: dict


def run(s: Settings) -> EvaluateResult:
    """Evaluate `s.run_dir` (seeded: the same settings give the same numbers) and write the result as JSON."""
    if s.samples < 1:
        raise UserError(f"samples={s.samples} must be >= 1")
    if s.split not in SPLITS:
        raise UserError(f"split={s.split!r} is not one of {', '.join(SPLITS)}")
    device = resolve_device(s.device)
    loaded = load_run(s.run_dir)
    loaded.model.to(device)
    out = output_path(s, loaded)
    settings = record(s) | {"run_dir": str(loaded.path)}
    check_overwrite(out, settings, s.overwrite)
    with seeded(s.seed):
        result = evaluate(loaded, s.data, s.data_dir, s.samples, s.mode, s.split, s.precision, s.batch_size)
    result["settings"] = settings
    try:  # the numbers are the result: a read-only run (or a full disk) still gets them, and a warning
        write_json(out, result)
    except UserError as e:
        print(f"stochvit: warning: {e}; the result was not saved", file=sys.stderr, flush=True)
        return EvaluateResult(None, result)
    return EvaluateResult(out, result)
