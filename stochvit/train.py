"""Training: AdamW, linear warmup then cosine, bf16 autocast with fp32 weights, resumable run directories.

    train            the whole run, in the steps below
    open_run         a fresh or resumed run: directory checks, its settings, the lock (`claim_run_dir` for a new one)
    prepare          data, model, optimiser, schedule and loader (`Training`), restored from the checkpoint on resume
    train_one_epoch  one pass over the training data (also the federated clients' local fit)
    validate         single-pass metrics on a split; `end_epoch` logs the row (metrics.jsonl/.csv, TensorBoard),
                     keeps the best weights (stochvit.tracking) and writes the checkpoint
    finish_run       final evaluation and files (stochvit.runs.finalize_run)

Resuming restores model, optimiser, schedule and every RNG state saved at the last finished epoch,
so a run killed mid-epoch and resumed ends with the same weights as an uninterrupted one (on CPU).
DDP is used when launched with `torchrun` (WORLD_SIZE > 1); rank 0 writes the run directory.
"""

from __future__ import annotations

import io
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .data import DataBundle, ImageSet, load_data
from .defaults import AUGMENTS, DATA_MODES, DEFAULT_LAYER, recipe_for
from .errors import UserError
from .eval.metrics import classification_metrics
from .layers import random_modules
from .mlp import set_fused
from .models import Normalized, stochastic_config
from .precision import autocast, resolve_device, resolve_precision
from .predict import dataset_probs
from .runs import (
    LOCK_FILE,
    Curves,
    atomic_write_bytes,
    build_model,
    check_writable,
    finalize_run,
    load_weights,
    read_json,
    read_metrics,
    run_config,
    run_lock,
    write_json,
)
from .scale import adamw, compiled, train_batches
from .tracking import BestCheckpoint, TensorBoard, check_eval_metric, check_logger, open_logger


@dataclass
class TrainConfig:
    """Every setting of a training run. model, epochs, batch_size and lr left None come from `recipe_for(data)`
    (`resolved`, also done by `validate`), so `TrainConfig(data="cifar10")` gets what `stochvit train --data cifar10`
    gets; explicit values win. A run's config.json stores the resolved values."""

    data: str = "digits"
    data_dir: str | None = None
    download: bool = False
    split_seed: int = 0
    train_limit: int | None = None
    img_size: int | None = None
    model: str | None = None  # None: from the recipe
    act: str = "gelu"
    drop_rate: float = 0.0
    mc_dropout: bool = False
    stochastic: dict | None = field(default_factory=DEFAULT_LAYER.to_dict)  # LayerConfig's JSON form; None: off
    epochs: int | None = None  # None: from the recipe, as batch_size and lr
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.0
    augment: str = "crop-flip"  # "none" trains on the raw images: the over-confident regime of the CIFAR-10 study
    clip_grad: float | None = 1.0
    seed: int = 0
    precision: str = "auto"
    workers: int = 0
    eval_samples: int = 10
    val_every: int = 1  # validate every N epochs (and always after the last): per-epoch val costs a lot on CPU
    eval_metric: str = "nll"  # the validation metric that picks model_best.safetensors (stochvit.tracking.EVAL_METRICS)
    log: str | None = None  # "tensorboard": also write the metrics rows to RUN_DIR/tensorboard/ (stochvit.tracking)
    fused: bool = False  # compile the default layer's scale into the activation (stochvit.mlp.set_fused)
    compile: bool = False  # torch.compile the training forward and backward (stochvit.scale)
    data_mode: str = "auto"  # memory | stream | auto (stream an image folder past the memory budget: stochvit.stream)
    adv: dict | None = None  # adversarial training settings, filled by the robustness suite
    # transfer learning, filled by `stochvit transfer` (stochvit.eval.transfer)
    init_weights: str | None = None  # safetensors to start from (a relative path is inside the run directory)
    freeze_backbone: bool = False  # linear probe: only the classifier head trains
    backbone_lr_scale: float = 1.0  # fine-tuning: the backbone's learning rate is lr * this
    norm: dict | None = None  # {"mean": [...], "std": [...]} input normalisation instead of the data's (the source's)

    def resolved(self) -> TrainConfig:
        """A copy with the recipe's values (`recipe_for(self.data)`) in the fields left None."""
        recipe = recipe_for(self.data) if isinstance(self.data, str) else {}
        return replace(self, **{k: v for k, v in recipe.items() if getattr(self, k) is None})

    def validate(self) -> None:
        """Fill in the recipe (`resolved`), then refuse bad settings naming their flag, before the data is loaded or
        the run directory exists.

        Each check states its rule: a negative seed or `--train-limit 0` used to surface as sklearn's or numpy's
        text, and `--weight-decay nan` as a NaN loss blamed on `--lr`. Wrong types (an edited config.json) too.
        """
        self.__dict__.update(vars(self.resolved()))

        def fail(name: str, rule: str) -> None:
            raise UserError(f"invalid {name}={getattr(self, name)}: must be {rule}")

        ints = [("epochs", 1), ("batch_size", 1), ("eval_samples", 1), ("val_every", 1), ("workers", 0),
                ("seed", 0), ("split_seed", 0), ("train_limit", 1), ("img_size", 1)]
        for name, lowest in ints:
            v = getattr(self, name)
            if v is None and name in ("train_limit", "img_size"):
                continue
            seed = name in ("seed", "split_seed")  # numpy and sklearn take seeds in [0, 2**32)
            if isinstance(v, bool) or not isinstance(v, int) or v < lowest or (seed and v >= 2**32):
                fail(name, f"an integer >= {lowest}" + (" and < 2**32" if seed else ""))
        floats = [("lr", lambda x: x > 0, "> 0"), ("weight_decay", lambda x: x >= 0, ">= 0"),
                  ("label_smoothing", lambda x: 0 <= x < 1, "in [0, 1)"), ("drop_rate", lambda x: 0 <= x < 1, "in [0, 1)"),
                  ("warmup_epochs", lambda x: x >= 0, ">= 0"), ("backbone_lr_scale", lambda x: x > 0, "> 0"),
                  ("clip_grad", lambda x: x > 0, "> 0 (0 on the command line disables clipping)")]
        for name, ok, rule in floats:
            v = getattr(self, name)
            if v is None and name == "clip_grad":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                fail(name, f"a finite number {rule}")
        try:
            self.stochastic = stochastic_config(self.stochastic)  # stochvit.defaults.LayerConfig's checks
        except ValueError as e:
            raise UserError(f"stochastic layer: {e}") from None
        if self.data_mode not in DATA_MODES:
            raise UserError(f"invalid data_mode={self.data_mode}; expected one of {', '.join(DATA_MODES)}")
        if self.augment not in AUGMENTS:
            raise UserError(f"invalid augment={self.augment}; expected one of {', '.join(AUGMENTS)}")
        if self.mc_dropout and self.drop_rate <= 0:
            raise UserError("mc_dropout needs drop_rate > 0")
        check_eval_metric(self.eval_metric)
        check_logger(self.log)  # TensorBoard without its package: refused before the run directory exists


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    # numpy's state holds an ndarray, which torch.load(weights_only=True) refuses: store its keys as a tensor
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss, cached=cached)
    state = dict(torch=torch.get_rng_state(), numpy=numpy_state, python=random.getstate())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def warn_long_warmup(cfg: TrainConfig) -> str | None:
    """One stderr line when the warmup outlasts the run: the learning rate would silently never reach --lr.

    Returns the message (None when the schedule is fine); printed on rank 0 only.
    """
    cfg = cfg.resolved()
    if cfg.warmup_epochs <= cfg.epochs:
        return None
    msg = (f"stochvit: warning: --warmup-epochs {cfg.warmup_epochs:g} is longer than the run (--epochs {cfg.epochs}): "
           f"the learning rate peaks at {cfg.epochs / cfg.warmup_epochs:.0%} of --lr {cfg.lr:g} and never decays; "
           f"pass a --warmup-epochs below {cfg.epochs}")
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)
    return msg


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def save_checkpoint(path: Path, model: nn.Module, opt, sched, epoch: int, best: dict | None = None) -> None:
    """checkpoint.pt: weights, optimiser, schedule, the finished epoch, every RNG state and the best epoch so far
    (`BestCheckpoint.state`; older checkpoints lack it and still resume), written atomically."""
    buf = io.BytesIO()
    torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                    epoch=epoch, rng=_rng_state(), **({"best": best} if best is not None else {})), buf)
    atomic_write_bytes(path / "checkpoint.pt", buf.getvalue())


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "rng")


def load_checkpoint(path: Path) -> dict:
    """A run directory's checkpoint.pt ({} when there is none yet), loaded with weights_only=True: no code runs.

    Every entry `--resume` needs must be there; an empty, truncated or foreign file is one line, not a traceback.
    """
    f = path / "checkpoint.pt"
    try:
        if f.is_file() and f.stat().st_size == 0:
            raise UserError(f"{f} is empty (0 bytes); it cannot be resumed, so start a new run")
        ckpt = torch.load(f, weights_only=True)
    except FileNotFoundError:
        return {}
    except UserError:
        raise
    except Exception as e:  # unpickling refused, truncated file, a directory
        raise UserError(f"cannot load {f} safely: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")\
            from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{f} lacks {', '.join(missing)}: not a stochvit training checkpoint, so it cannot be resumed")
    return ckpt


def restore_checkpoint(ckpt: dict, model: nn.Module, opt, sched, path: Path | None = None) -> int:
    """Load a checkpoint's model, optimiser, schedule and RNG states; returns the first epoch still to train.

    A checkpoint from another model (or a config.json edited to another model) is one line, not torch's 70.
    """
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        first = " ".join(str(e).strip().splitlines()[:2])[:300]
        where = f"{path / 'checkpoint.pt'} does not fit the model in {path / 'config.json'}" if path else \
            "the checkpoint does not fit the model"
        raise UserError(f"{where} ({first}); was either file replaced or edited?") from None
    return int(ckpt["epoch"]) + 1


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def is_main_process() -> bool:
    """True outside torchrun and on its rank 0: the rank that writes the run directory and reports."""
    return _distributed()[0] == 0


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, position embeddings and tokens.

    Transfer options split off the classifier head: `freeze_backbone` trains only the head (the backbone keeps
    requires_grad=False and is not in the optimiser, so it stays bit-identical); `backbone_lr_scale` scales the rest.
    Used by the trainer and by the federated clients' local fit.
    """
    cfg = cfg.resolved()
    split = cfg.freeze_backbone or cfg.backbone_lr_scale != 1
    head = {id(p) for p in model.net.get_classifier().parameters()} if split else set()
    if cfg.freeze_backbone:
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    parts = [(named, cfg.lr)] if not head else [([x for x in named if id(x[1]) in head], cfg.lr),
                                                ([x for x in named if id(x[1]) not in head], cfg.lr * cfg.backbone_lr_scale)]
    groups = []
    for params, lr in parts:
        decay = [p for n, p in params if p.ndim > 1 and "pos_embed" not in n and "token" not in n]
        no_decay = [p for n, p in params if not (p.ndim > 1 and "pos_embed" not in n and "token" not in n)]
        groups += [dict(params=ps, weight_decay=wd, lr=lr) for ps, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if ps]
    return groups


def make_optimizer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    """AdamW over `param_groups` and its per-step schedule: linear warmup, then cosine decay to 0 at the last step."""
    opt = adamw(param_groups(model, cfg), cfg.lr, next(model.parameters()).device)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(cfg.warmup_epochs * steps_per_epoch)))
    return opt, sched


# -- opening a run directory ---------------------------------------------------------------------------------------

def new_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def _is_unused(path: Path) -> bool:
    """True for a run directory that holds nothing but (perhaps) the lock file of a run that never started."""
    return not path.exists() or all(p.name == LOCK_FILE for p in path.iterdir())


def _discard_unstarted(path: Path, created: bool) -> None:
    """Remove what a fresh run wrote before its first checkpoint (config.json, metrics, temp files, .lock).

    The directory was empty when the lock was taken and the lock is still held, so every file in it is this run's.
    A directory the run created goes too; one the user gave (empty) stays, empty.
    """
    for f in path.iterdir():
        if f.is_file() or f.is_symlink():
            f.unlink(missing_ok=True)
        elif f.is_dir():  # tensorboard/
            shutil.rmtree(f, ignore_errors=True)
    if created:
        try:
            path.rmdir()
        except OSError:
            pass


def _resumed_config(path: Path, config: Any) -> TrainConfig:
    """The TrainConfig stored in a run's config.json, checked like fresh flags (it may have been edited)."""
    from dataclasses import fields

    settings = config.get("train") if isinstance(config, dict) else None
    if not isinstance(settings, dict):
        raise UserError(f"{path / 'config.json'} has no `train` settings; it is not a stochvit run to resume")
    unknown = sorted(set(settings) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise UserError(f"{path / 'config.json'}: unknown training settings {unknown} (from another stochvit version?)")
    cfg = TrainConfig(**settings)
    cfg.validate()
    return cfg


def _not_empty(path: Path) -> UserError:
    return UserError(f"output directory {path} is not empty; choose a new out or continue with resume={path}")


def open_run(stack: ExitStack, cfg: TrainConfig | None, out: str | Path | None,
             resume: str | Path | None, new_lr: float | None = None) -> tuple[TrainConfig, Path]:
    """The validated settings and the directory of a fresh or resumed run; refusals come before anything is loaded.

    A resumed run's directory is locked here (on rank 0, for as long as `stack` lives), and its settings are the ones
    in its config.json. A fresh run's directory is only checked: `claim_run_dir` locks and writes it once the model
    is known to build.
    """
    if resume is not None:
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"resume {path}: not a run directory (give the directory of an interrupted run)")
        config = read_json(path / "config.json", f"{path} is not a run directory to resume")
        if (path / "summary.json").exists():
            raise UserError(f"run {path} already finished")
        cfg = _resumed_config(path, config)
        if new_lr is not None:  # checked like a fresh lr
            cfg.lr = new_lr
            cfg.validate()
    else:
        if new_lr is not None:
            raise ValueError("a new lr applies to a resumed run only; set TrainConfig.lr for a fresh one")
        cfg = cfg or TrainConfig()
        cfg.validate()
        path = Path(out) if out else new_run_dir()
        check_writable(path)  # a file, /proc or a read-only mount: refused before the data is loaded
        if not _is_unused(path):
            raise _not_empty(path)
    if resume is not None and _distributed()[0] == 0:
        stack.enter_context(run_lock(path))
        if (path / "summary.json").exists():  # finished by another process meanwhile
            raise UserError(f"run {path} already finished")
    return cfg, path


def claim_run_dir(stack: ExitStack, path: Path, config: dict) -> None:
    """Lock a fresh run's directory (for as long as `stack` lives) and write its config.json.

    Until the first checkpoint exists, leaving `stack` with an exception removes everything the run wrote.
    """
    created = not path.exists()
    stack.enter_context(run_lock(path))
    if not _is_unused(path):  # another run wrote here since `open_run` looked
        raise _not_empty(path)
    stack.push(lambda kind, *_: _discard_unstarted(path, created)
               if kind is not None and not (path / "checkpoint.pt").exists() else None)
    write_json(path / "config.json", config)


# -- building what the epochs share --------------------------------------------------------------------------------

@dataclass
class Training:
    """What the epochs of one run share: built by `prepare`, advanced by `train_one_epoch`, saved by the checkpoint."""

    cfg: TrainConfig
    config: dict  # the run's config.json
    data: DataBundle
    model: Normalized
    net: nn.Module  # what the loop calls: `model`, or its DDP wrapper under torchrun
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    loader: torch.utils.data.DataLoader
    sampler: torch.utils.data.DistributedSampler | None
    loss_fn: nn.Module
    precision: str
    steps_per_epoch: int
    start_epoch: int = 0  # 0, or the epoch after a resumed run's last checkpoint
    adv_step: Callable | None = None  # stochvit.eval.attacks.adversarial_step when cfg.adv is set
    rank: int = 0
    world: int = 1
    best: BestCheckpoint = field(default_factory=BestCheckpoint)  # model_best.safetensors, restored on resume
    tensorboard: TensorBoard | None = None  # with cfg.log == "tensorboard", opened by `train` on rank 0


def _model(cfg: TrainConfig, config: dict, data: DataBundle, device: torch.device) -> Normalized:
    try:
        model = build_model(config).to(device)
    except ValueError as e:
        raise UserError(str(e)) from None
    check_trainable_width(model, device)
    patch = getattr(getattr(model.net, "patch_embed", None), "patch_size", None)
    if patch is not None and data.img_size < max(patch):
        raise UserError(f"{cfg.data}: images of {data.img_size}x{data.img_size} are smaller than {cfg.model}'s "
                        f"{max(patch)}-pixel patches; pass a larger img_size or choose another model")
    return model


ORTHOGONAL_CPU_MAX_WIDTH = 256  # the digits model's MLP width


def check_trainable_width(model: nn.Module, device: torch.device) -> None:
    """Refuse, on a CPU, Haar-orthogonal layers wider than ORTHOGONAL_CPU_MAX_WIDTH: each draw is a C x C QR per image
    and block, cubic in the width: at vit_tiny_patch4_32's MLP width (768) a CIFAR-10 epoch takes hours on a CPU
    (measured against the diagonal layer in benchmarks/RESULTS.md). The full Gaussian kind has no QR."""
    if device.type != "cpu":
        return
    wide = [m.features for m in random_modules(model) if getattr(m, "distribution", None) == "orthogonal"
            and m.features > ORTHOGONAL_CPU_MAX_WIDTH]
    if wide:
        raise UserError(f"kind='full' distribution='orthogonal' at width {max(wide)} is refused for training on a CPU "
                        f"(a {max(wide)}x{max(wide)} QR per image and block; widths up to {ORTHOGONAL_CPU_MAX_WIDTH} "
                        "train): use distribution='gaussian', position='output', or a CUDA device")


def prepare(cfg: TrainConfig, path: Path, resumed: bool = False, device: str | torch.device | None = None) -> Training:
    """Data, model, optimiser, schedule and loader of a run; a resumed run also gets its checkpoint's state.

    `device`: "cpu", "cuda" or "cuda:N" (None: cuda when available); under torchrun each rank takes the GPU of its
    rank on a CUDA device, and `cpu` keeps every rank on the CPU (gloo).

    The order of the random draws is part of the checkpoint format: seed, initialise the model, then (resuming)
    restore the saved RNG states; the loader draws its shuffle only when iterated. Changing it breaks the bit-exact
    resume of existing run directories.
    """
    rank, world = _distributed()
    device = resolve_device(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
    data = load_data(cfg.data, cfg.data_dir, cfg.download, cfg.split_seed, train_limit=cfg.train_limit, img_size=cfg.img_size,
                     data_mode=cfg.data_mode)
    if cfg.augment == "none":
        data.train.transform = None
    for part in (data.train, data.val, data.test):  # streamed sets decode in worker processes for evaluation too
        if hasattr(part, "workers"):
            part.workers = cfg.workers
    warn_long_warmup(cfg)
    config = run_config(cfg, data)
    _seed_everything(cfg.seed + rank)
    model = _model(cfg, config, data, device)
    precision = resolve_precision(cfg.precision, device, model)
    if cfg.fused:
        set_fused(model.net)
    ckpt = load_checkpoint(path) if resumed else {}
    if cfg.init_weights and not ckpt:  # before the run directory is written: weights that do not fit leave nothing
        load_weights(model.net, path / cfg.init_weights)
    steps_per_epoch = math.ceil(len(data.train) / (cfg.batch_size * world))
    opt, sched = make_optimizer(model, cfg, steps_per_epoch)
    start = restore_checkpoint(ckpt, model, opt, sched, path) if ckpt else 0
    if ckpt:
        done = sorted({r["epoch"] for r in read_metrics(path) if r["epoch"] < start})
        if done != list(range(start)):  # before training: a deleted or cut metrics.jsonl would misreport the run
            raise UserError(f"{path / 'metrics.jsonl'} has rows for epochs {done} but checkpoint.pt is at epoch "
                            f"{start - 1} (counting from 0); restore metrics.jsonl to resume")
    net = compiled(nn.parallel.DistributedDataParallel(model) if world > 1 else model, cfg.compile)
    # On CUDA an in-memory split is batched and augmented on the device; on a CPU the DataLoader path stays, so that
    # CPU runs draw exactly as before and old checkpoints resume bit-exactly (stochvit.scale.train_batches).
    loader = train_batches(data.train, cfg.batch_size, device, world, cfg.seed, cfg.workers,
                           device_batches=device.type == "cuda")
    sampler = loader.sampler if world > 1 else None
    adv_step = None
    if cfg.adv:
        from .eval.attacks import adversarial_step

        adv_step = adversarial_step(cfg.adv)
    return Training(cfg=cfg, config=config, data=data, model=model, net=net, opt=opt, sched=sched, loader=loader,
                    sampler=sampler, loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
                    precision=precision, steps_per_epoch=steps_per_epoch, start_epoch=start, adv_step=adv_step,
                    rank=rank, world=world, best=BestCheckpoint.restore(ckpt.get("best"), cfg.eval_metric, start))


def change_peak_lr(t: Training, path: Path, new_lr: float) -> None:
    """Continue a restored schedule with a new peak lr (the way out of a NaN loss), recorded in config.json.

    Warmup and cosine keep their shape and the parameter groups their ratios (transfer's backbone_lr_scale). The
    schedule is rebuilt the way torch resumes one (new `initial_lr` in each group, `last_epoch` of the restored one),
    so every lr is what LambdaLR itself computes: the continued run is bit-exact with one that had this lr stored.
    """
    opt, sched = t.opt, t.sched
    old_lr = sched.base_lrs[0]
    for group, base in zip(opt.param_groups, sched.base_lrs):
        group["initial_lr"] = new_lr * (base / old_lr)
    # LambdaLR's constructor steps once, to last_epoch, setting each group's lr and get_last_lr()
    t.sched = torch.optim.lr_scheduler.LambdaLR(opt, sched.lr_lambdas, last_epoch=sched.last_epoch - 1)
    if t.rank == 0:
        stored = read_json(path / "config.json", "the run's settings")
        old = stored["train"]["lr"]
        stored["train"]["lr"] = new_lr
        stored.setdefault("lr_changes", []).append(dict(epoch=t.start_epoch, old=old, new=new_lr))
        write_json(path / "config.json", stored)


# -- the epochs ----------------------------------------------------------------------------------------------------

class Diverged(UserError):
    """Training diverged (`what`: the loss, the weights or the validation NLL became non-finite) at global `step`."""

    def __init__(self, what: str, step: int) -> None:
        super().__init__(f"{what} at step {step}")
        self.what, self.step = what, step


class NonFiniteLoss(Diverged):
    """The training loss became NaN or infinite; raised before that batch's step, so the weights stay finite."""

    def __init__(self, loss: float, step: int) -> None:
        super().__init__(f"loss became {loss}", step)
        self.loss = loss


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def freeze_norm_statistics(model: nn.Module) -> int:
    """Put BatchNorm layers whose parameters are all frozen (a linear probe's backbone, e.g. the conv stem of
    vit_digits_convstem_8) in eval mode, so that their running statistics stay bit-identical too. Returns the count."""
    frozen = [m for m in model.modules() if isinstance(m, BATCH_NORMS) and not any(p.requires_grad for p in m.parameters())]
    for m in frozen:
        m.eval()
    return len(frozen)


def train_one_epoch(model: nn.Module, loader, opt, *, sched=None, loss_fn: nn.Module | None = None,
                    precision: str = "fp32", clip_grad: float | None = None, adv_step: Callable | None = None,
                    net: nn.Module | None = None, step: int = 0, on_step: Callable[[int], None] | None = None,
                    desc: str | None = None) -> dict[str, float]:
    """One pass over `loader`: forward under `precision` autocast, backward, clip, optimiser and schedule step.

    `net` is the module called (a DDP wrapper of `model`; by default `model` itself); `adv_step(net, x, y, precision)`
    replaces each batch (adversarial training). `step` counts the optimiser steps taken before this epoch, and
    `on_step(step)` runs after every step (progress, or a test's fault injection). `desc` shows a progress bar.
    Returns train_loss and train_accuracy (means over the epoch's images), images, steps and seconds.
    """
    net = model if net is None else net
    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    device = next(model.parameters()).device
    net.train()
    freeze_norm_statistics(model)
    sync = device.type != "cuda"  # reading the loss every step stalls a GPU's queue: there it is checked per epoch
    t0, first, seen = time.perf_counter(), step, 0
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    bar = tqdm(loader, desc=desc, leave=False, disable=desc is None, mininterval=1)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if adv_step is not None:
            x = adv_step(net, x, y, precision)
        with autocast(precision, device, model):
            logits = net(x)
            loss = loss_fn(logits.float(), y)
        if sync and not torch.isfinite(loss):
            raise NonFiniteLoss(loss.item(), step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        opt.step()
        if sched is not None:
            sched.step()
        step += 1
        if on_step is not None:
            on_step(step)
        seen += len(y)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        if sync:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
    if not torch.isfinite(loss_sum):  # on CUDA: the first check of this epoch's losses
        raise NonFiniteLoss(loss_sum.item() / seen, step)
    return dict(train_loss=loss_sum.item() / seen, train_accuracy=correct.item() / seen, images=seen, steps=step - first,
                seconds=time.perf_counter() - t0)


def validate(model: nn.Module, data: ImageSet, precision: str = "auto") -> dict[str, float]:
    """Single-pass accuracy, NLL, ECE and Brier on `data`: the per-epoch (or per-round) check. Draws from the global RNG."""
    probs, labels = dataset_probs(model, data, 1, precision=precision)
    return classification_metrics(probs[0], labels)


def end_epoch(t: Training, path: Path, epoch: int, stats: dict[str, float], quiet: bool = False) -> dict:
    """Rank 0 after an epoch: validation when due, the metrics row (and TensorBoard's), model_best.safetensors when the
    validation is the best so far, then the checkpoint (RNG state after validation).

    A kill between model_best and the checkpoint trains the epoch again on resume, which rewrites model_best."""
    cfg = t.cfg
    row = dict(epoch=epoch, train_loss=stats["train_loss"], train_accuracy=stats["train_accuracy"],
               lr=t.sched.get_last_lr()[0], epoch_seconds=stats["seconds"],
               train_images_per_s=stats["images"] * t.world / stats["seconds"])
    report = ""
    if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
        val = validate(t.model, t.data.val, t.precision)
        if not math.isfinite(val["nll"]):  # finite but overflowing weights: NaN outputs; before the checkpoint
            raise Diverged(f"validation NLL became {val['nll']}", (epoch + 1) * t.steps_per_epoch)
        row.update({f"val_{k}": v for k, v in val.items()})
        report = f"val acc {val['accuracy']:.4f}  val nll {val['nll']:.4f}  "
    Curves(path).append(row)
    if t.tensorboard is not None:
        t.tensorboard.log(row)
    if "val_nll" in row:
        t.best.update(path, t.model.net, epoch, val)
    save_checkpoint(path, t.model, t.opt, t.sched, epoch, t.best.state())
    if not quiet:
        tqdm.write(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
                   f"train acc {row['train_accuracy']:.4f}  {report}{row['train_images_per_s']:.0f} img/s")
    return row


def _diverged(what: str, epoch: int, step: int, cfg: TrainConfig, path: Path, fresh: bool) -> UserError:
    """The one-line error of a diverged run, with the way out: a fresh run left nothing, a later one resumes."""
    kept = ("no epoch had finished, so the run directory was removed" if fresh and not (path / "checkpoint.pt").exists()
            else f"the run stays resumable from its last epoch with a lower peak lr: "
                 f"`stochvit train --resume {path} --lr {cfg.lr / 10:g}`")
    return UserError(f"{what} at epoch {epoch + 1}, step {step}: lower the learning rate (now lr={cfg.lr}) or keep "
                     f"clip_grad; {kept}")


def finish_run(t: Training, path: Path) -> None:
    """Rank 0 evaluates and writes the final files (`stochvit.runs.finalize_run`); every rank waits for it.

    summary.json's metrics are the final weights'; its `best` names the epoch in model_best.safetensors."""
    if t.rank == 0:
        rows = read_metrics(path)
        best = t.best.summary(rows)
        finalize_run(path, t.model, t.data, t.cfg.eval_samples, t.precision, best=best,  # a transfer's transfer.md too
                     metrics_for=f"test and val: model.safetensors, the final weights (epoch {rows[-1]['epoch']}); "
                                 f"{best['file']} holds epoch {best['epoch']}, the best {best['metric']}")
    if t.world > 1:
        dist.barrier()


def train(cfg: TrainConfig | None = None, out: str | Path | None = None, resume: str | Path | None = None,
          quiet: bool = False, on_step: Callable[[int], None] | None = None, lr: float | None = None,
          device: str | torch.device | None = None) -> Path:
    """Train (or resume) a run and return its directory: `open_run`, `prepare`, `train_one_epoch` and `end_epoch`
    per epoch, `finish_run`.

    `on_step(global_step)` runs after every optimiser step (tests kill the process there to check the resume).
    `lr` (with `resume` only) continues with a new peak learning rate, the way out of a NaN loss (`change_peak_lr`).
    `device`: where it trains ("cpu", "cuda", "cuda:N"; None: cuda when available); not part of the run's settings.
    With `cfg.adv` set, each batch is replaced by adversarial examples from `stochvit.eval.attacks.adversarial_step`;
    the attack draws from the global RNGs, which the checkpoint saves, so adversarial runs resume exactly too.
    The writing process holds the run directory's lock (`stochvit.runs.run_lock`) throughout; a fresh run that
    fails before its first checkpoint leaves nothing behind, a later failure leaves it resumable.
    """
    resolve_device(device)  # a device this machine lacks: refused before the run directory is touched
    with ExitStack() as stack:
        cfg, path = open_run(stack, cfg, out, resume, lr)
        t = prepare(cfg, path, resumed=resume is not None, device=device)
        if resume is not None and lr is not None:
            change_peak_lr(t, path, lr)
        if resume is None and t.rank == 0:
            claim_run_dir(stack, path, t.config)
        if t.rank == 0:
            t.tensorboard = open_logger(path, cfg.log, t.start_epoch)
            if t.tensorboard is not None:
                stack.callback(t.tensorboard.close)
        step = t.start_epoch * t.steps_per_epoch
        for epoch in range(t.start_epoch, cfg.epochs):
            if t.sampler is not None:
                t.sampler.set_epoch(epoch)
            desc = None if quiet or t.rank != 0 else f"epoch {epoch + 1}/{cfg.epochs}"
            try:
                stats = train_one_epoch(t.model, t.loader, t.opt, sched=t.sched, loss_fn=t.loss_fn, precision=t.precision,
                                        clip_grad=cfg.clip_grad, adv_step=t.adv_step, net=t.net, step=step,
                                        on_step=on_step, desc=desc)
                step += stats["steps"]
                if not all(torch.isfinite(p).all() for p in t.model.parameters()):  # before the checkpoint: never saved
                    raise Diverged("weights became NaN or infinite", step)
                if t.rank == 0:
                    end_epoch(t, path, epoch, stats, quiet)
            except Diverged as e:
                raise _diverged(e.what, epoch, e.step, cfg, path, resume is None) from None
        finish_run(t, path)
    return path
