"""The model card (`README.md`) of a finished run, in the style of the Hugging Face / timm model cards.

It says what a reader of a run directory asks first: which model and stochastic layer, which data and split, the
test metrics, the settings, and how the run was made (command line, git commit of the code, device).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import STEM_MODELS
from .runs import atomic_write_bytes

METRICS = (("accuracy", "accuracy"), ("nll", "NLL"), ("brier", "Brier"), ("ece", "ECE (15 bins)"))


def git_commit() -> str | None:
    """The commit of stochvit's own source checkout ("+dirty" with uncommitted changes), None for an installed wheel.

    Only a checkout whose top level holds stochvit's pyproject.toml counts: a site-packages inside some other repository
    must not report that repository's commit.
    """
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        return None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return None
    sha = git("rev-parse", "HEAD")
    if sha is None:
        return None
    return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    """The hardware a run used, in words: GPU name, or CPU model, cores and torch threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ddp = f", {world} processes (DDP)" if world > 1 else ""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}){ddp}"
    if device.type != "cpu":
        return f"{device.type}{ddp}"
    return f"cpu ({_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads){ddp}"


def provenance(device: torch.device) -> dict[str, Any]:
    """How this run was made: the command line that finished it, the code's git commit (when known) and the device."""
    return dict(command=shlex.join(sys.argv), git_commit=git_commit(), device=device_description(device),
                finished=datetime.now(UTC).isoformat(timespec="seconds"))


def _value(v: Any) -> str:
    return f"`{json.dumps(v)}`" if isinstance(v, (dict, list, tuple)) else f"`{v}`"


def model_card(name: str, config: dict, summary: dict, model: nn.Module | None = None) -> str:
    """The card's markdown from a run's config.json and summary.json contents."""
    spec = config["data"].get("spec", "?")
    front = ["---", "library_name: timm", "license: mit", "pipeline_tag: image-classification",
             "tags: [image-classification, timm, stochvit" + (", stochastic-layers]" if config.get("stochastic") else "]"),
             f"datasets: [{json.dumps(spec.split(':')[0])}]", "---"]
    lines = [*front, *_details(name, config, model), *_results(config, summary), *_training(config, summary),
             *_provenance(name, config, summary)]
    return "\n".join(lines)


def _details(name: str, config: dict, model: nn.Module | None) -> list[str]:
    m, data, stoch, train = config["model"], config["data"], config.get("stochastic"), config.get("train", {})
    kw, versions, spec = m.get("kwargs", {}), config.get("versions", {}), data.get("spec", "?")
    kind = ("with token-consistent stochastic layers" if stoch and stoch.get("sharing") == "image"
            else "with stochastic layers" if stoch else "deterministic (no stochastic layer)")
    timm_name = f"; plain timm: `{config['architecture']}` with `model_args` from config.json" if "architecture" in config else ""
    if config.get("architecture") == m["name"] and m["name"] in STEM_MODELS:  # a stem timm's model_args cannot describe
        timm_name += " after `import stochvit`, which registers its convolution stem (timm alone does not know the name)"
    lines = [f"# Model card for {name}", "",
             f"A `{m['name']}` vision transformer, {kind}, trained on `{spec}` with stochvit "
             f"{versions.get('stochvit', '')}.", "", "## Model details", "",
             "- **Model type:** image classification",
             f"- **Architecture:** `{m['name']}` {_value(kw)}{timm_name}"]
    if stoch:
        layer = ", ".join(f"{k}={v}" for k, v in stoch.items())
        lines.append(f"- **Stochastic layer:** {layer} (sampled at every forward pass, at inference too)")
    else:
        lines.append("- **Stochastic layer:** none")
    if m.get("mc_dropout"):
        lines.append(f"- **MC dropout:** rate {train.get('drop_rate')} kept on at inference")
    if model is not None:
        lines.append(f"- **Parameters (M):** {sum(p.numel() for p in model.parameters()) / 1e6:.3f}")
    return lines + [f"- **Image size:** {kw.get('in_chans')} x {kw.get('img_size')} x {kw.get('img_size')}, "
                    f"inputs in [0, 1] normalised with mean {data.get('mean')} and std {data.get('std')}",
                    f"- **Classes ({kw.get('num_classes')}):** {', '.join(map(str, data.get('class_names') or []))}", "",
                    "## Data", "",
                    f"- **Dataset:** `{spec}`" + (f" from `{data['data_dir']}`" if data.get("data_dir") else ""),
                    f"- **Split:** {_value(data.get('split'))}; images {_value(data.get('sizes'))}", ""]


def _results(config: dict, summary: dict) -> list[str]:
    test = summary.get("test", {})
    k = test.get("samples", 1)
    lines = [f"## Results (test split, {(config['data'].get('sizes') or {}).get('test', '?')} images)", "",
             f"| metric | single pass (mean ± std over {k} passes) | average of {k} passes |", "| --- | --- | --- |"]
    single, avg = test.get("single_pass", {}), test.get("mc_average", {})
    for key, title in METRICS:
        if key in single:
            lines.append(f"| {title} | {single[key]['mean']:.4f} ± {single[key]['std']:.4f} | {avg.get(key, float('nan')):.4f} |")
    val = summary.get("val", {}).get("single_pass", {})
    if "accuracy" in val:
        lines += ["", f"Validation (single pass): accuracy {val['accuracy']['mean']:.4f}, NLL {val['nll']['mean']:.4f}."]
    best = summary.get("best") or {}
    if best.get("epoch") is not None:
        lines += ["", f"These are the final weights, `model.safetensors`. `{best['file']}` holds epoch {best['epoch']} "
                      f"(counting from 0), the best {best['metric']} ({best['value']:.4f}; {best['mode']}imum over the "
                      f"validated epochs from {best.get('since_epoch', 0)})."]
    return lines


def _training(config: dict, summary: dict) -> list[str]:
    train = config.get("train", {})
    standard = {"test_accuracy", "test", "val", "epochs", "train_seconds", "precision", "provenance", "best", "metrics_for"}
    extra = {key: v for key, v in summary.items() if key not in standard}
    lines = ["", "## Training", "", f"{summary.get('epochs')} epoch(s) in {summary.get('train_seconds', 0.0):.0f} s, "
             f"precision {summary.get('precision')}. Every setting (config.json `train`):", "",
             "| setting | value |", "| --- | --- |", *(f"| {key} | {_value(v)} |" for key, v in train.items())]
    lines += [*(f"- **{key}:** {_value(v)}" for key, v in extra.items())] if extra else []
    known = {"model", "stochastic", "data", "train", "versions", "architecture", "num_classes", "model_args", "pretrained_cfg"}
    sections = {key: v for key, v in config.items() if key not in known}  # e.g. a transfer's source, a federation
    return lines + (["", *(f"- **{key} (config.json):** {_value(v)}" for key, v in sections.items())] if sections else [])


def _provenance(name: str, config: dict, summary: dict) -> list[str]:
    versions, prov = config.get("versions", {}), summary.get("provenance", {})
    commit = prov.get("git_commit")
    return ["", "## Provenance", "",
            f"- **Command:** `{prov.get('command', '?')}`",
            f"- **Code:** stochvit {versions.get('stochvit', '?')}, "
            + (f"git commit `{commit}`" if commit else "no git checkout (installed package)"),
            f"- **Device:** {prov.get('device', '?')}",
            f"- **Versions:** {', '.join(f'{key} {v}' for key, v in versions.items())}",
            f"- **Finished:** {prov.get('finished', '?')}", "",
            "## How to use", "", "```python", "import stochvit", "",
            f'model = stochvit.load_model("path/to/{name}")  # eval mode, images in [0, 1]',
            "probs = stochvit.predict_proba(model, images, samples=10)  # Monte Carlo average", "```", "",
            "With timm alone (the network with its stochastic layer off; normalise with `pretrained_cfg`'s mean/std):", "",
            "```python", "import timm", "", f'net = timm.create_model("local-dir:path/to/{name}", pretrained=True).eval()',
            "```", ""]


def write_model_card(path: Path, config: dict, summary: dict, model: nn.Module | None = None) -> None:
    """Write `path/README.md` (atomically, like every run file)."""
    atomic_write_bytes(path / "README.md", model_card(path.name, config, summary, model).encode())
