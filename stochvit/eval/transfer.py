"""Transfer learning: start a (stochastic) ViT from pretrained weights and train it on a new task.

Sources: a stochvit run directory, or any timm model name with weights from a local `.safetensors` or `.pth`
file (read by timm's `load_state_dict` with `weights_only=True`, so a pickle that would run code is refused).
Nothing is downloaded.

Adaptation uses timm's own helpers, as `timm.create_model(pretrained=True)` does: the model family's
`checkpoint_filter_fn` (position embeddings resampled with `resample_abs_pos_embed` when the patch grid
differs, patch kernels with `resample_patch_embed`), `adapt_input_conv` for another number of input
channels, and a fresh classifier head for the new classes. The input normalisation of the source is kept
when the channel count matches, so a frozen backbone sees inputs as it did in pretraining.

Stochastic layers during transfer: `keep` them as the source had them, turn them `off` (the authors did
this when fine-tuning), or `add` them to a deterministic source. They have no parameters, so all three
load the same weights.

The run directory is prepared here (config.json from `stochvit.runs.run_config` plus the adapted weights in
init.safetensors) and trained by `stochvit.train.train(resume=...)`, the ordinary trainer, which ends with
`finalize_run`: the result is a normal run directory, and an interrupted transfer continues with
`stochvit train --resume RUN_DIR`.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import Mlp
from timm.models import adapt_input_conv
from torch import nn

from ..data import load_data
from ..defaults import STOCHASTIC_TARGETS, TRANSFER_MODES
from ..errors import UserError
from ..models import stochastic_config
from ..runs import atomic_dir, build_model, load_run, read_json, read_weights, run_config, write_json  # noqa: F401 (read_weights: public here too)
from ..train import TrainConfig, train

MODES, STOCHASTIC_MODES = TRANSFER_MODES, STOCHASTIC_TARGETS
INIT_FILE = "init.safetensors"


@dataclass
class Source:
    """Pretrained weights (timm keys) and what is known about how they were trained."""

    model: str  # timm model name
    state: dict[str, torch.Tensor]
    act: str
    stochastic: dict | None = None  # the source's stochastic layer settings (None: deterministic)
    norm: dict | None = None  # {"mean", "std"} the source was trained with
    origin: dict = field(default_factory=dict)


def _act_name(net: nn.Module) -> str:
    """The MLP activation of a timm model as a timm name, so the target model is built with the same one."""
    from timm.layers.create_act import _ACT_LAYER_DEFAULT

    act = next((m.act for m in net.modules() if isinstance(m, Mlp)), None)
    if act is None or (type(act) is nn.GELU and act.approximate == "none"):
        return "gelu"
    if type(act) is nn.GELU:
        return "gelu_tanh"
    for name, cls in _ACT_LAYER_DEFAULT.items():
        if type(act) is cls:
            return name
    raise UserError(f"unsupported MLP activation {type(act).__name__} in the source model")


def load_source(source: str, weights: str | None = None) -> Source:
    """A stochvit run directory, or a timm model name with `weights` from a local file."""
    path = Path(source).expanduser()
    if path.is_dir():
        if weights is not None:
            raise UserError(f"weights are for timm model names; {path} is a run directory and brings its own weights")
        run = load_run(path)
        config = run.config
        return Source(
            model=config["model"]["name"], state=run.model.net.state_dict(),
            act=config["model"]["kwargs"].get("act_layer", "gelu"),
            stochastic=config.get("stochastic"), norm=dict(mean=config["data"]["mean"], std=config["data"]["std"]),
            origin=dict(kind="run", path=str(path), data=config["data"]["spec"], test_accuracy=run.summary.get("test_accuracy")),
        )
    if not timm.is_model(source):
        raise UserError(f"source {source!r} is neither a run directory nor a timm model name (see timm.list_models())")
    if weights is None:
        raise UserError(
            f"no weights for {source}: nothing is downloaded at run time. On a machine with internet, save them with "
            f"`m = timm.create_model('{source}', pretrained=True); safetensors.torch.save_file(m.state_dict(), 'w.safetensors')` "
            f"(or fetch model.safetensors from https://huggingface.co/timm), then pass weights=PATH (.safetensors or .pth)"
        )
    state = read_weights(weights)
    try:
        with torch.device("meta"):  # only its config and activation are read: no memory, no init cost
            probe = timm.create_model(source, pretrained=False)
    except Exception as e:
        raise UserError(f"cannot build timm model {source}: {e}") from None
    cfg = getattr(probe, "pretrained_cfg", None) or {}
    norm = dict(mean=list(cfg["mean"]), std=list(cfg["std"])) if "mean" in cfg and "std" in cfg else None
    digest = hashlib.sha256(Path(weights).expanduser().read_bytes()).hexdigest()
    return Source(model=source, state=state, act=_act_name(probe), norm=norm,
                  origin=dict(kind="timm", model=source, weights=str(Path(weights).resolve()), sha256=digest))


def stochastic_for(mode: str, source: dict | None, layer: dict | None = None) -> dict | None:
    """The target's stochastic layer settings: `keep` the source's, `off`, or `add` `layer` (defaults if None)."""
    if mode == "keep":
        return stochastic_config(source)
    if mode == "off":
        return None
    if mode == "add":
        if source:
            raise UserError("the source is already stochastic: use stochastic_target keep (as trained) or off")
        try:
            return stochastic_config(layer or True)
        except ValueError as e:
            raise UserError(f"stochastic layer: {e}") from None
    raise UserError(f"stochastic_target {mode!r} is not one of {', '.join(STOCHASTIC_MODES)}")


def _first_conv(net: nn.Module) -> str | None:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    embed = getattr(net, "patch_embed", None)
    name = cfg.get("first_conv") or ("patch_embed.stem.0" if hasattr(embed, "stem") else  # vit_digits_convstem_8
                                     "patch_embed.proj" if embed is not None else None)
    return name[0] if isinstance(name, (tuple, list)) else name


def _head_keys(net: nn.Module) -> set[str]:
    """State-dict keys of the classifier head(s): they are replaced, never transferred."""
    heads = [net.get_classifier()] if hasattr(net, "get_classifier") else []
    prefixes = [n for n, m in net.named_modules() if any(m is h for h in heads) and n]
    return {k for k in net.state_dict() if any(k == p or k.startswith(p + ".") for p in prefixes)}


def adapt_state_dict(state: dict[str, torch.Tensor], net: nn.Module, source: str = "weights") -> tuple[dict, list[str]]:
    """Fit a pretrained state dict to `net` (a timm model built for the new task) with timm's helpers.

    Returns the full state dict for `net` (its own fresh head) and notes saying what was adapted.
    Raises UserError when the weights belong to another architecture.
    """
    notes: list[str] = []
    own = net.state_dict()
    filter_fn = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if filter_fn is not None:
        try:
            state = filter_fn(dict(state), net)
        except Exception as e:  # weights of another architecture trip the family's converter
            raise UserError(f"{source} do not fit {type(net).__name__}: timm's checkpoint_filter_fn failed "
                            f"({type(e).__name__}: {str(e)[:200]})") from None
    if "pos_embed" in state and shapes.get("pos_embed") not in (None, tuple(state["pos_embed"].shape)):
        notes.append(f"position embeddings resampled {shapes['pos_embed']} -> {tuple(state['pos_embed'].shape)}")
    conv = _first_conv(net)
    key = f"{conv}.weight" if conv else None
    if key in state and key in own and state[key].dim() == 4 and state[key].shape[1] != own[key].shape[1]:
        before = tuple(state[key].shape)
        state[key] = adapt_input_conv(own[key].shape[1], state[key])
        notes.append(f"input channels adapted {before[1]} -> {own[key].shape[1]} ({key})")
    head = _head_keys(net)
    dropped = {k: tuple(v.shape) for k, v in state.items() if k in head}
    state = {k: v for k, v in state.items() if k not in head}
    state.update({k: own[k] for k in head})
    notes.append(f"classifier head replaced: {dropped or 'none in source'} -> {({k: tuple(own[k].shape) for k in sorted(head)})}")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing keys (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})" if unexpected else "",
                 "shape mismatch " + ", ".join(f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:3])
                 if wrong else ""]
        raise UserError(f"{source} do not fit {type(net).__name__}: " + "; ".join(p for p in parts if p)
                        + ". Is the source the architecture these weights were trained with?")
    return {k: v.to(own[k].dtype).contiguous() for k, v in state.items()}, notes


def default_lr(mode: str) -> float:
    """A linear head alone tolerates (and needs) a larger step than a whole pretrained network."""
    return 1e-2 if mode == "linear-probe" else 1e-3


def prepare(source: str, out: str | Path, data: str = "digits", weights: str | None = None, mode: str = "finetune",
            stochastic: str = "keep", layer: dict | None = None, backbone_lr_scale: float = 1.0, **train_fields: Any) -> Path:
    """Write a run directory ready to train: config.json (with a `transfer` section) and the adapted init weights.

    `train_fields` are TrainConfig fields (epochs, lr, train_limit, data_dir, img_size, seed, ...).
    """
    if mode not in MODES:
        raise UserError(f"transfer_mode {mode!r} is not one of {', '.join(MODES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output directory {out} is not empty; choose a new out (continue an interrupted one with "
                        f"`stochvit train --resume {out}`)")
    src = load_source(source, weights)
    target = stochastic_for(stochastic, src.stochastic, layer)
    fields = {**dict(epochs=20, batch_size=64, lr=default_lr(mode), eval_samples=10),
              **{k: v for k, v in train_fields.items() if v is not None}}
    probe = mode == "linear-probe"
    if probe and backbone_lr_scale != 1.0:
        raise UserError("backbone_lr_scale is for transfer_mode finetune; a linear probe does not train the backbone at all")
    cfg = TrainConfig(data=data, model=src.model, act=src.act, stochastic=target, init_weights=INIT_FILE,
                      freeze_backbone=probe, backbone_lr_scale=1.0 if probe else backbone_lr_scale, **fields)
    cfg.validate()
    bundle = load_data(cfg.data, cfg.data_dir, cfg.download, cfg.split_seed, train_limit=cfg.train_limit, img_size=cfg.img_size)
    if src.norm is not None and len(src.norm["mean"]) == bundle.in_chans:
        cfg.norm = src.norm
    config = run_config(cfg, bundle)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the fresh head's initial weights follow --seed
        try:
            net = build_model(config).net
        except (TypeError, ValueError, RuntimeError, AssertionError) as e:
            raise UserError(f"cannot build {src.model} for {bundle.name} ({bundle.img_size}px, {bundle.in_chans} channels, "
                            f"{bundle.num_classes} classes): {e}") from None
    patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
    if patch is not None and bundle.img_size < max(patch):
        raise UserError(f"{bundle.name}: {bundle.img_size}px images are smaller than {src.model}'s {max(patch)}-pixel patches; "
                        "resize them (imagefolder: img_size) or transfer from a model with smaller patches")
    state, notes = adapt_state_dict(src.state, net, f"weights from {source}")
    net.load_state_dict(state)
    config["transfer"] = dict(source=src.origin, mode=mode,
                              stochastic=dict(mode=stochastic, source=src.stochastic, target=target),
                              backbone_lr_scale=cfg.backbone_lr_scale, normalisation="source" if cfg.norm else "target data",
                              adaptations=notes)
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:  # `out` is new or empty (checked above)
        save_file(state, str(tmp / INIT_FILE))
        write_json(tmp / "config.json", config)
    return out


def report(path: Path, summary: dict | None = None) -> str:
    """Markdown summary of a transfer run from its config and `summary` (default: its summary.json)."""
    config = read_json(path / "config.json", "not a run directory")
    s = summary if summary is not None else read_json(path / "summary.json", "run summary")
    t, info = s["test"], config["transfer"]
    src = info["source"]
    weights = f", weights {src['weights']}" if "weights" in src else ""
    lines = [f"# Transfer run {path.name}", "",
             f"- source: {src.get('path') or src.get('model')} ({src['kind']}{weights})",
             f"- target data: {config['data']['spec']} ({config['data']['num_classes']} classes, "
             f"{config['data']['sizes']['train']} training images)",
             f"- mode: {info['mode']}; stochastic layers: {info['stochastic']['mode']} -> "
             f"{'on' if info['stochastic']['target'] else 'none'}; backbone lr scale {info['backbone_lr_scale']}",
             f"- input normalisation: {info['normalisation']}", *[f"- {n}" for n in info["adaptations"]], "",
             "| metric | single pass (mean ± std) | K-sample average |", "|---|---|---|"]
    for k, v in t["mc_average"].items():
        lines.append(f"| {k} | {t['single_pass'][k]['mean']:.4f} ± {t['single_pass'][k]['std']:.4f} | {v:.4f} |")
    lines.append(f"\nK = {t['samples']}; trained {s['epochs']} epochs in {s['train_seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def transfer(source: str, out: str | Path, quiet: bool = False, device: str | None = None, **kwargs: Any) -> Path:
    """Prepare the run directory and train it with the ordinary trainer (on `device`; None: cuda when available), whose
    last step (`runs.finalize_run`) writes transfer.md just before summary.json (also when an interrupted transfer is
    finished with `stochvit train --resume`)."""
    from ..precision import resolve_device

    resolve_device(device)  # a device this machine lacks: refused before the run directory is written
    path = prepare(source, out, **kwargs)
    train(resume=path, quiet=quiet, device=device)
    return path
