"""Run directories: everything needed to rebuild, reload and re-evaluate a trained model.

    config.json        every setting (model, stochastic layer, data, training, versions)
    model.safetensors  final weights of the timm model (plain timm keys; no code executed on load)
    model_best.safetensors  the weights of the best validated epoch (stochvit.tracking.BestCheckpoint)
    checkpoint.pt      training state, written atomically each epoch (loaded with weights_only=True)
    metrics.jsonl      one line per epoch (written by `Curves`, read by `read_metrics`), and the same rows as metrics.csv
    summary.json       final metrics; its presence marks a finished run
    curves.png         training curves
    args.yaml          the command's resolved flags (written by the CLI; `--config args.yaml` reruns them)
    tensorboard/       with `--log tensorboard`: the metrics rows as TensorBoard scalars (stochvit.tracking)
    .lock              flock'ed by the one process writing the run (`run_lock`); left behind, it blocks nothing
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import pickle
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .data import DataBundle, load_data
from .errors import UserError
from .layers import MCDropout
from .models import Normalized, create_model, stochastic_config, timm_config

if TYPE_CHECKING:
    from .train import TrainConfig


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
                        "or choose another out") from None
    try:
        yield path
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def check_writable(path: str | Path, name: str = "out") -> Path:
    """Check, before any work, that `path` can become an output folder; creates nothing.

    A file there, a path under /proc or on a read-only mount used to fail as a traceback after the computation;
    now it is one line naming the setting. The probe is a temp file in the nearest existing folder, removed at once.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{name} {path} is a file, not a directory; choose another {name}")
    folder = path.absolute()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{name} {path}: {folder} is a file, not a directory; choose another {name}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".stochvit-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{name} {path}: cannot write in {folder} ({e.strerror or e}); choose another {name}") from None
    return path


def safetensors_bytes(model: nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    """A module's state dict as safetensors bytes, written with `atomic_write_bytes` like every run file (safetensors'
    own save_file makes 0600 files)."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, default=float) + "\n").encode())


SETTINGS_FILE = "settings.json"  # in a report folder: the settings that made it


def check_overwrite(record_path: Path, settings: dict, overwrite: bool = False) -> None:
    """Refuse to replace a report (a JSON file with a "settings" key, or a folder's settings.json) made with other settings.

    The same settings give the same numbers (evaluation is seeded), so replacing such a report loses nothing.
    """
    if overwrite or not record_path.exists():
        return
    try:
        old = json.loads(record_path.read_text())
    except (OSError, ValueError):
        old = None
    old = old.get("settings", old) if isinstance(old, dict) and record_path.name != SETTINGS_FILE else old
    if old != json.loads(json.dumps(settings)):
        changed = sorted(k for k in set(old or {}) | set(settings) if (old or {}).get(k) != settings.get(k)) \
            if isinstance(old, dict) else ["(unknown)"]
        raise UserError(f"{record_path} holds a report made with other settings (differing: {', '.join(changed)}); "
                        "choose another output folder or allow replacing it (overwrite)")


@contextmanager
def atomic_output_dir(out: str | Path, settings: dict, marker: str, overwrite: bool = False) -> Iterator[Path]:
    """Write a report folder all at once: the caller fills a hidden sibling, which then replaces `out`.

    `out` is replaced only when it is empty or a report of this kind (its settings.json, or `marker` from an older
    version); a folder holding anything else is refused, never deleted. settings.json records `settings`.
    """
    out = Path(out)
    check_output_dir(out, settings, marker, overwrite)
    with atomic_dir(out) as tmp:
        yield tmp
        write_json(tmp / SETTINGS_FILE, settings)


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """`atomic_output_dir`'s mechanics without its checks or record (for a new run directory, checked by its maker):
    the caller fills a hidden sibling, which replaces `out` when the block ends without error and is removed otherwise."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_dir(out: Path, settings: dict, marker: str, overwrite: bool = False) -> None:
    """`atomic_output_dir`'s refusals, to be called before the work as well as after it."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out} is a file; choose a folder for the report")
        recorded, older = (out / SETTINGS_FILE).exists(), (out / marker).exists()
        if any(out.iterdir()) and not (recorded or older):
            raise UserError(f"{out} is a folder with other contents; choose a new or empty folder for the report")
        if recorded:
            check_overwrite(out / SETTINGS_FILE, settings, overwrite)
        elif older and not overwrite:
            raise UserError(f"{out} holds a report without a settings record; choose another output or allow "
                            "replacing it (overwrite)")
    check_writable(out)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (one per epoch or round); [] when there is none yet. The one reader."""
    f = Path(path) / "metrics.jsonl"
    if not f.exists():
        return []
    rows = []
    for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = e
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):  # truncated or edited by hand
            raise UserError(f"{f} line {n} is not a metrics row ({line[:60]!r}); restore the file or remove that line")
        rows.append(row)
    return rows


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
            raise UserError("mc_dropout needs a positive dropout rate (drop_rate)")
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


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors or .pth file; never executes code from the file (`weights_only=True`).

    The one reader of weight files: `--init-weights`, `transfer --weights` and every run's model.safetensors."""
    from timm.models import load_state_dict

    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"weights file {p} is a directory, not a .safetensors or .pth file")
    if not p.is_file():
        raise UserError(f"weights file {p} does not exist")
    try:
        state = load_state_dict(str(p), use_ema=True, weights_only=True)
    except Exception as e:  # refused pickle, truncated zip, corrupt safetensors header, not a checkpoint at all
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in first or "Weights only" in first:
            raise UserError(f"refusing to load {p}: it holds Python objects beyond tensors, and unpickling them could run "
                            f"code ({first}); save a plain state dict (torch.save(model.state_dict()) or safetensors)") from None
        raise UserError(f"cannot read weights {p}: not a readable .safetensors or .pth state dict "
                        f"({type(e).__name__}: {first})") from None
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise UserError(f"{p} holds no tensors: expected a model state dict (optionally under 'state_dict' or 'model')")
    return tensors


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a .safetensors (or plain .pth) state dict into `model`, turning mismatches into a clear error."""
    state = read_weights(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"weights {path} do not fit the model: {' '.join(first[:3])[:400]}") from None


def load_run(path: str | Path) -> Run:
    """Rebuild a finished run's model (in eval mode) from its directory."""
    path = Path(path)
    if path.is_file():
        raise UserError(f"{path} is a file; give the run directory that holds it ({path.parent})")
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


# -- the run directory's contents: config, data, metrics log and curves, finalisation -----------------------------

def run_config(cfg: TrainConfig, data: DataBundle) -> dict:
    """The run's config.json from a `TrainConfig` and its data: enough to rebuild the model without the training code."""
    kwargs = dict(num_classes=data.num_classes, in_chans=data.in_chans, img_size=data.img_size, act_layer=cfg.act)
    if cfg.drop_rate:
        kwargs.update(drop_rate=cfg.drop_rate, proj_drop_rate=cfg.drop_rate)
    mean, std = (cfg.norm or {}).get("mean", data.mean), (cfg.norm or {}).get("std", data.std)
    return dict(
        model=dict(name=cfg.model, kwargs=kwargs, mc_dropout=cfg.mc_dropout),
        stochastic=stochastic_config(cfg.stochastic),
        data=dict(spec=cfg.data, data_dir=cfg.data_dir, mean=mean, std=std, class_names=data.class_names,
                  **data.describe()),
        train=asdict(cfg),
        versions=versions(),
        # timm's own config.json keys (architecture, num_classes, model_args, pretrained_cfg): plain timm loads the run
        **timm_config(cfg.model, kwargs, mean, std, data.class_names),
    )


def data_for(config: dict, spec: str | None = None, data_dir: str | None = None) -> DataBundle:
    """Reload the data a run was trained on (same split), or another spec with the run's image size."""
    t = config["train"]
    if spec is None or spec == t["data"]:
        return load_data(t["data"], t.get("data_dir") if data_dir is None else data_dir, False, t["split_seed"],
                         train_limit=t.get("train_limit"), img_size=t.get("img_size"), data_mode=t.get("data_mode", "auto"))
    return load_data(spec, data_dir, False, t["split_seed"], img_size=config["model"]["kwargs"]["img_size"])


def check_compatible(config: dict, data: DataBundle) -> None:
    """Clear error when images do not fit the model (size, channels, classes)."""
    k = config["model"]["kwargs"]
    for what, want, got in (("image size", k["img_size"], data.img_size), ("channels", k["in_chans"], data.in_chans),
                            ("classes", k["num_classes"], data.num_classes)):
        if want != got:
            raise UserError(f"data {data.name!r} has {what} {got} but the model expects {want}")


def _csv(rows: list[dict]) -> bytes:
    """metrics.jsonl's rows as CSV (Lightning's CSVLogger / timm's summary.csv shape): a header of every key seen,
    in first-seen order, an empty cell where a row lacks a key (e.g. epochs without validation); lists as JSON."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows)
    return buf.getvalue().encode()


class Curves:
    """The one per-epoch metrics writer (metrics.jsonl, the record read back, and metrics.csv) and the curves plot."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self) -> list[dict]:
        return read_metrics(self.path)

    def append(self, row: dict) -> None:
        rows = [r for r in self.rows() if r["epoch"] < row["epoch"]] + [row]  # a resumed epoch replaces its old line
        atomic_write_bytes(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        atomic_write_bytes(self.path / "metrics.csv", _csv(rows))

    def figure(self):
        """Loss, accuracy and ECE per epoch (per round, numbered from 1, for a federated run, whose rows carry one).
        Every point has a marker, so a 1-epoch run shows its values."""
        from matplotlib.ticker import MaxNLocator

        plt = pyplot()
        rows = self.rows()
        unit = "round" if rows and all("round" in r for r in rows) else "epoch"
        ep = [r[unit] for r in rows]
        val_rows = [r for r in rows if "val_nll" in r]  # --val-every N leaves epochs without validation
        fig, ax = plt.subplots(1, 3, figsize=(13, 3.6), sharex=True)  # one epoch axis, also where val is sparse
        for a, key, title in zip(ax, ("loss", "accuracy", "ece"), ("loss / NLL", "accuracy", "ECE (val)")):
            lines = [] if key == "ece" else [("train", "o-", "C0", ep, [r[f"train_{key}"] for r in rows])]
            lines.append(("val", "s-", "C1", [r[unit] for r in val_rows],
                          [r[f"val_{'nll' if key == 'loss' else key}"] for r in val_rows]))
            for label, fmt, color, x, y in lines:
                a.plot(x, y, fmt, color=color, markersize=4, label=label)
                if len(x) == 1:  # one point: its value in words, the axis alone is hard to read
                    left = x[0] == max(ep) and len(ep) > 1  # at the right edge: write it on the left, inside the panel
                    a.annotate(f"{y[0]:.3f}", (x[0], y[0]), textcoords="offset points", xytext=(-6 if left else 6, 0),
                               ha="right" if left else "left", va="center", fontsize=8, color=color)
            a.set_title(title)
            a.set_xlabel(unit)
            if len(ep) < 3:
                a.set_xticks(ep)
                a.set_xlim(min(ep) - 0.5, max(ep) + 0.5)
            else:
                a.xaxis.set_major_locator(MaxNLocator(integer=True))
            a.legend()
        fig.tight_layout()
        return fig

    def plot(self) -> None:
        fig = self.figure()
        fig.savefig(self.path / "curves.png", dpi=90)
        pyplot().close(fig)




def finalize_run(path: Path, model: nn.Module, data: DataBundle, eval_samples: int = 10, precision: str = "auto",
                 **extra_summary) -> None:
    """Evaluate on val/test, write model.safetensors, curves.png, the model card README.md, a transfer's transfer.md
    and (last) summary.json.

    `path/config.json` must already exist; any producer of run directories (trainer, federated,
    transfer) ends with this call, so every run directory looks the same to `load_run`.
    """
    from .card import provenance, write_model_card
    from .eval.metrics import mc_metrics
    from .precision import resolve_precision
    from .predict import dataset_probs

    model.eval()
    test = mc_metrics(*dataset_probs(model, data.test, eval_samples, precision=precision))
    val = mc_metrics(*dataset_probs(model, data.val, eval_samples, precision=precision))
    curves = Curves(path)
    rows = curves.rows()
    summary = dict(test_accuracy=test["single_pass"]["accuracy"]["mean"], test=test, val=val, epochs=len(rows),
                   train_seconds=sum(r.get("epoch_seconds", 0.0) for r in rows), precision=resolve_precision(precision,
                   next(model.parameters()).device, model), **extra_summary,
                   provenance=provenance(next(model.parameters()).device))
    atomic_write_bytes(path / "model.safetensors", safetensors_bytes(model.net))
    if rows:
        curves.plot()
    config = read_json(path / "config.json", "the run's settings")
    write_model_card(path, config, summary, model.net)
    if "transfer" in config:  # a transfer's report, fresh or resumed: a failure here leaves the run resumable
        from .eval.transfer import report

        atomic_write_bytes(path / "transfer.md", report(path, summary).encode())
    write_json(path / "summary.json", summary)  # last: marks the run finished
