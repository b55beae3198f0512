"""What a run tracks beside metrics.jsonl: TensorBoard scalars and the best checkpoint by a validation metric.

    TensorBoard      `--log tensorboard`: each metrics row as scalars in RUN_DIR/tensorboard/, through
                     `torch.utils.tensorboard.SummaryWriter` (the `tensorboard` package: the `stochvit[tensorboard]` extra)
    BestCheckpoint   timm's `model_best`: model_best.safetensors holds the weights of the validated epoch with the
                     best `--eval-metric` (val NLL by default), kept beside the final model.safetensors

A metrics row's epoch (counting from 0, as in metrics.jsonl) is TensorBoard's step. A resumed run opens its writer
with `purge_step` at its first epoch, so an epoch logged before a kill and trained again appears once.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:  # nothing here imports torch at load time: the CLI's --help reads LOGGERS and EVAL_METRICS
    from torch import nn

LOGGERS = ("tensorboard",)
TENSORBOARD_DIR = "tensorboard"
BEST_FILE = "model_best.safetensors"
EVAL_METRICS = {"nll": "min", "accuracy": "max", "ece": "min"}  # validation metric -> which end is best


def check_logger(log: str | None) -> None:
    """Refuse an unknown logger, or TensorBoard without its package, before anything is written."""
    if log is None:
        return
    if log not in LOGGERS:
        raise UserError(f"invalid log={log!r}; expected one of {', '.join(LOGGERS)}")
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError('the TensorBoard logger needs the tensorboard package: pip install "stochvit[tensorboard]"')


def scalar_tag(key: str) -> str:
    """A metrics row's key as a TensorBoard tag: train_loss -> train/loss, val_nll -> val/nll (grouped by split)."""
    for split in ("train", "val"):
        if key.startswith(f"{split}_"):
            return f"{split}/{key[len(split) + 1:]}"
    return key


class TensorBoard:
    """Writes metrics rows as scalars, step = the row's epoch. The writer (and its folder) appears with the first row."""

    def __init__(self, path: Path, start_epoch: int = 0) -> None:
        self.dir = Path(path) / TENSORBOARD_DIR
        self.purge_step = start_epoch or None  # hides any events of epochs >= start_epoch a killed run had written
        self.writer = None

    def log(self, row: dict) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir), purge_step=self.purge_step)
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(scalar_tag(key), value, row["epoch"])
        self.writer.flush()  # on disk at each epoch's end, as metrics.jsonl

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def open_logger(path: Path, log: str | None, start_epoch: int = 0) -> TensorBoard | None:
    check_logger(log)
    return TensorBoard(path, start_epoch) if log == "tensorboard" else None


@dataclass
class BestCheckpoint:
    """The best validated epoch so far by `metric` (`EVAL_METRICS`); its state goes into checkpoint.pt.

    `since` is the first epoch whose weights could be kept: 0, or the resumed epoch when an older checkpoint.pt
    (written before stochvit kept a best checkpoint) did not record one. Ties keep the earlier epoch.
    """

    metric: str = "nll"
    value: float | None = None
    epoch: int | None = None
    since: int = 0

    def better(self, value: float) -> bool:
        if self.value is None:
            return True
        return value < self.value if EVAL_METRICS[self.metric] == "min" else value > self.value

    def update(self, path: Path, model: nn.Module, epoch: int, val: dict[str, float]) -> bool:
        """Write model_best.safetensors (plain timm keys, like model.safetensors) when `val` beats the best so far."""
        from .runs import atomic_write_bytes, safetensors_bytes

        if not self.better(val[self.metric]):
            return False
        meta = dict(epoch=str(epoch), metric=f"val_{self.metric}", value=repr(val[self.metric]))
        atomic_write_bytes(Path(path) / BEST_FILE, safetensors_bytes(model, meta))
        self.value, self.epoch = val[self.metric], epoch
        return True

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def restore(cls, state: dict | None, metric: str, start_epoch: int) -> BestCheckpoint:
        """The best of a resumed run: from its checkpoint, or (an older checkpoint, or another metric) from now on."""
        if isinstance(state, dict) and state.get("metric") == metric:
            return cls(**state)
        return cls(metric, since=start_epoch)

    def summary(self, rows: list[dict]) -> dict:
        """summary.json's `best`: which epoch, its value and its single-pass val metrics from metrics.jsonl."""
        row = next((r for r in rows if r["epoch"] == self.epoch), {})
        return dict(file=BEST_FILE, metric=f"val_{self.metric}", mode=EVAL_METRICS[self.metric], epoch=self.epoch,
                    value=self.value, since_epoch=self.since,
                    val={k[4:]: v for k, v in row.items() if k.startswith("val_")})


def check_eval_metric(metric: str) -> None:
    if metric not in EVAL_METRICS:
        raise UserError(f"invalid eval_metric={metric!r}; expected one of {', '.join(EVAL_METRICS)}")
