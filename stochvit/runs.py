"""Run directories: everything needed to rebuild, reload and re-evaluate a trained model.

    config.json        every setting (model, stochastic layer, data, training, versions)
    model.safetensors  final weights of the timm model (plain timm keys; no code executed on load)
    checkpoint.pt      training state, written atomically each epoch (loaded with weights_only=True)
    metrics.jsonl      one line per epoch
    summary.json       final metrics; its presence marks a finished run
    curves.png         training curves
    .lock              flock'ed by the one process writing the run (`run_lock`); left behind, it blocks nothing
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .layers import MCDropout
from .models import Normalized, create_model


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file and rename, so a reader or a kill never sees half a file.

    A failed write (full disk, read-only mount) removes its temp file and is a one-line UserError.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:  # e.g. Ctrl-C mid-write
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


LOCK_FILE = ".lock"  # inside a run directory; held (flock) by the one process writing the run


@contextmanager
def run_lock(path: Path) -> Iterator[Path]:
    """Hold an exclusive lock on run directory `path` (created if missing) while one process writes it.

    Two `stochvit train --out D` at once used to interleave their files (config.json of one run beside the
    weights of the other). `flock` is released by the kernel when its process dies, so the `.lock` a killed
    run leaves behind never blocks `--resume`. `stochvit.train.train` takes it for fresh and resumed runs (so
    transfer's training too); any other writer of run directories (federated) should wrap its writes in it.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies, as for every run file
    except OSError as e:
        raise UserError(f"cannot write run directory {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"run directory {path} is in use by another stochvit process; wait for it to end "
                        "or choose another --out") from None
    try:
        yield path
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, default=float) + "\n").encode())


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (one per epoch or round); [] when there is none yet. The one reader."""
    f = Path(path) / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend: every plot stochvit writes goes to a file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def versions() -> dict[str, str]:
    import timm
    import torchvision

    from . import __version__

    return dict(stochvit=__version__, torch=torch.__version__, torchvision=torchvision.__version__, timm=timm.__version__,
                python=platform.python_version())


def enable_mc_dropout(model: nn.Module) -> int:
    """Replace every active `nn.Dropout` with `MCDropout` (kept on at inference). Returns the count."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                setattr(parent, name, MCDropout(child.p))
                count += 1
    return count


def build_model(config: dict) -> Normalized:
    """The model a config describes, wrapped to take [0, 1] images."""
    m = config["model"]
    net = create_model(m["name"], stochastic=config.get("stochastic") or False, **m.get("kwargs", {}))
    if m.get("mc_dropout"):
        if enable_mc_dropout(net) == 0:
            raise UserError("mc_dropout needs a positive dropout rate (--drop-rate)")
    data = config["data"]
    return Normalized(net, data["mean"], data["std"])


@dataclass
class Run:
    path: Path
    config: dict
    model: Normalized
    summary: dict

    @property
    def name(self) -> str:
        return self.path.name


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors state dict into `model`, turning mismatches into a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read weights {path}: {e}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"weights {path} do not fit the model: {' '.join(first[:3])[:400]}") from None


def load_run(path: str | Path) -> Run:
    """Rebuild a finished run's model (in eval mode) from its directory."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"run directory {path} does not exist")
    config = read_json(path / "config.json", "not a stochvit run directory")
    if not (path / "summary.json").exists() or not (path / "model.safetensors").exists():
        raise UserError(f"run {path} did not finish (no summary.json/model.safetensors); "
                        f"continue it with `stochvit train --resume {path}`")
    try:
        model = build_model(config)
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}/config.json is incomplete or from an incompatible version ({e!r})") from None
    load_weights(model.net, path / "model.safetensors")
    return Run(path=path, config=config, model=model.eval(), summary=read_json(path / "summary.json", "run summary"))
