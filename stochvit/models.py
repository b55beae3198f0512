"""Small-image ViTs registered in timm's registry, `create_model`, and the pixel-space wrapper.

`import stochvit` registers:
  vit_digits_patch2_8     8x8 single-channel digits: 16 patches, width 64, 4 blocks
  vit_digits_convstem_8   the same behind a 3x3 convolution stem (`ConvStemPatchEmbed`): the digits recipe's model
  vit_tiny_patch4_32    CIFAR-size: 64 patches, width 192, 6 blocks, 3 heads (CPU-sized depth)
  vit_small_patch4_32   CIFAR-size: 64 patches, width 384, 6 blocks, 6 heads
All accept timm's usual keywords (num_classes, in_chans, img_size, act_layer="relu"/"gelu", ...).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import timm
import torch
from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .defaults import LayerConfig
from .errors import UserError

_DIGITS = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0)
_SMALL_VITS: dict[str, dict[str, Any]] = {
    "vit_digits_patch2_8": _DIGITS,
    "vit_digits_convstem_8": _DIGITS,
    "vit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0),
    "vit_small_patch4_32": dict(img_size=32, patch_size=4, embed_dim=384, depth=6, num_heads=6, mlp_ratio=4.0),
}



class ConvStemPatchEmbed(PatchEmbed):
    """timm's `PatchEmbed` behind a 3x3 convolution stem at full resolution: conv in_chans->stem_width, BatchNorm
    (unless stem_norm=False), GELU; the patch convolution then reads stem_width channels.

    Why: at patch 2 on 8x8 digits a token carries 4 raw pixels, and the plain model sits near chance for its first
    10 epochs; the stem gives each token a 4x4 receptive field of learned edge features (benchmarks/RESULTS.md).
    """

    def __init__(self, img_size: int = 8, patch_size: int = 2, in_chans: int = 1, embed_dim: int = 64,
                 stem_width: int = 32, stem_norm: bool = True, **kwargs: Any) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=stem_width, embed_dim=embed_dim, **kwargs)
        dd = {k: kwargs[k] for k in ("device", "dtype") if kwargs.get(k) is not None}
        self.in_chans = in_chans
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=not stem_norm, **dd),
                                  nn.BatchNorm2d(stem_width, **dd) if stem_norm else nn.Identity(), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.stem(x))


# registered models whose patch embedding is a stem: settings that timm's model_args (JSON) cannot carry, so plain
# timm cannot rebuild these without `import stochvit` (see `timm_config`)
_STEMS: dict[str, dict[str, Any]] = {"vit_digits_convstem_8": dict(stem_width=32, stem_norm=True)}
STEM_MODELS = tuple(_STEMS)


def _register(name: str, arch: dict[str, Any], stem: dict[str, Any] | None = None) -> None:
    def build(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        cfg = kwargs.pop("pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("source") == "local-dir":  # timm.create_model("local-dir:RUN_DIR")
            overlay = {**cfg, **overlay}
        for key in ("cache_dir", "pretrained_model_args"):  # timm's factory bookkeeping
            kwargs.pop(key, None)
        if pretrained and not (overlay.get("file") or overlay.get("state_dict")):
            raise UserError(f"{name} has no published weights; load a run (stochvit.load_model) or a local file: "
                            "pretrained=True, pretrained_cfg_overlay=dict(file='RUN_DIR/model.safetensors')")
        if stem is not None:
            kwargs["embed_layer"] = partial(ConvStemPatchEmbed, **stem)
        model = VisionTransformer(**{**arch, "num_classes": 10, **kwargs})
        if pretrained:
            _load_local(model, name, overlay)
        return model

    build.__name__ = name
    build.__doc__ = f"Small-image ViT: {arch}"
    register_model(build)


def _load_local(model: VisionTransformer, name: str, overlay: dict[str, Any]) -> None:
    """timm's own loader for a local file (`pretrained_cfg_overlay=dict(file=...)`), as for timm's registered models.

    The small ViTs have no canonical checkpoint, so the file is taken to fit the requested model (its head included)
    unless the overlay says otherwise (num_classes, input_size); timm resamples position embeddings on a size change.
    """
    from timm.models import PretrainedCfg, load_pretrained
    from timm.models.vision_transformer import checkpoint_filter_fn

    stem = isinstance(model.patch_embed, ConvStemPatchEmbed)
    chans = model.patch_embed.in_chans if stem else model.patch_embed.proj.in_channels
    first_conv = "patch_embed.stem.0" if stem else "patch_embed.proj"
    cfg = PretrainedCfg(**{"architecture": name, "num_classes": model.num_classes, "first_conv": first_conv,
                           "classifier": "head", "input_size": (chans, *model.patch_embed.img_size), **overlay})
    load_pretrained(model, pretrained_cfg=cfg.to_dict(), num_classes=model.num_classes, in_chans=chans,
                    filter_fn=checkpoint_filter_fn)


for _name, _arch in _SMALL_VITS.items():
    if _name not in timm.list_models(_name):
        _register(_name, _arch, _STEMS.get(_name))


# a timm entrypoint whose built-in arguments (patch 16, width 192, 12 blocks) a small ViT's model_args all override,
# so that plain timm, without `import stochvit`, rebuilds the small ViTs from a run's config.json (not those with a
# stem: their architecture stays the registered name, which resolves once stochvit is imported)
PLAIN_TIMM_VIT = "vit_tiny_patch16_224"


def timm_config(name: str, kwargs: dict[str, Any], mean: list[float], std: list[float],
                class_names: list[str] | None = None) -> dict[str, Any]:
    """timm's (Hugging Face hub) config.json fields for a model: architecture, num_classes, model_args, pretrained_cfg.

    Merged into a run's config.json, they let plain timm load the run: `timm.create_model("local-dir:RUN_DIR",
    pretrained=True)`, or `timm.create_model(architecture, **model_args)` and `load_state_dict`. The stochastic
    layer has no parameters, so that model is the run's network with its scale at the mean (sampling "mean").
    A model with a stem (`_STEMS`) keeps its registered name as architecture: plain timm needs `import stochvit` first.
    """
    arch = _SMALL_VITS.get(name)
    model_args = {**(arch or {}), **kwargs}
    architecture = PLAIN_TIMM_VIT if arch and name not in _STEMS else name
    base = timm.models.get_pretrained_cfg(name) if arch is None else None
    size = model_args.get("img_size") or (base.input_size[-1] if base else 224)
    chans = model_args.get("in_chans", 3)
    num_classes = model_args.get("num_classes", 10 if arch else (base.num_classes if base else 1000))
    pretrained_cfg = dict(
        architecture=architecture, input_size=[chans, size, size], fixed_input_size=True,
        interpolation="bilinear", crop_pct=1.0, crop_mode="center", mean=list(mean), std=list(std),
        num_classes=num_classes,
        first_conv=(base.first_conv if base else None) or ("patch_embed.stem.0" if name in _STEMS else "patch_embed.proj"),
        classifier=(base.classifier if base else None) or "head", license="mit",
    )
    if class_names is not None and len(class_names) == num_classes:
        pretrained_cfg["label_names"] = list(class_names)
    return dict(architecture=architecture, num_classes=num_classes, model_args=model_args, pretrained_cfg=pretrained_cfg)


def stochastic_config(stochastic: bool | dict | LayerConfig | None) -> dict[str, Any] | None:
    """Normalise `stochastic=True | False | dict | LayerConfig` into the layer's full JSON form, or None for
    deterministic; a bad setting is a ValueError naming it (`stochvit.defaults.LayerConfig`)."""
    layer = LayerConfig.coerce(stochastic)
    return None if layer is None else layer.to_dict()


def create_model(name: str, stochastic: bool | dict | None = True, **timm_kwargs: Any) -> nn.Module:
    """`timm.create_model(name, **timm_kwargs)` with its MLPs made stochastic (unless `stochastic=False`)."""
    if timm_kwargs.get("pretrained") and not timm_kwargs.get("pretrained_cfg_overlay"):
        raise UserError(
            f"pretrained weights for {name} would be downloaded, and nothing is downloaded at run time: "
            "pass a local file, e.g. pretrained_cfg_overlay=dict(file='weights.safetensors') "
            "(or transfer from a local weights file: stochvit.eval.transfer)"
        )
    if name not in timm.list_models(name) and name not in timm.list_models():
        raise UserError(f"unknown timm model {name!r}")
    model = timm.create_model(name, **timm_kwargs)
    cfg = stochastic_config(stochastic)
    if cfg is not None:
        from .mlp import stochastify  # here, not above: mlp imports timm, whose import hook imports this module

        if stochastify(model, **cfg) == 0:
            raise ValueError(f"{name} has no timm Mlp to make stochastic")
    return model


class Normalized(nn.Module):
    """Wraps a timm model so it takes images in [0, 1]; normalisation is part of the model.

    Attacks, inversions and corruptions then all work in pixel space. Only `net`'s weights are saved.
    """

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)
