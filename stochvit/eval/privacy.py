"""Feature privacy in split inference: can a server reconstruct the input from stochastic ViT token features?

Threat model
------------
* Split inference. The device runs the patch embedding and the first k transformer blocks of the
  deployed ViT, including its stochastic layers, with its own random draws. The draws never leave
  the device: only the block-k token features (all tokens, class token included) are transmitted.
* The server runs the remaining blocks and the head. It is honest but curious (or an eavesdropper
  reads the channel) and tries to reconstruct the input image from the transmitted features.
* The attacker knows the architecture and, in the white-box setting, the weights. It can query the
  deployed feature extractor on auxiliary images of its own, disjoint from the victims' images; those
  queries get fresh draws, never the victim's. It does not see the victim's random draws.

How the API enforces it
-----------------------
`Device` is the victim side. It holds its own copy of the network (no module or parameter storage is
shared with anybody else) and its own random-number stream (`torch.random.fork_rng`), so its draws
neither come from nor advance the global RNG that attacker code uses. `Device.transmit` returns
detached copies of the features: no autograd graph, hence no saved draw, leaves the device.
`AttackerView` is everything an attacker gets: a separate white-box copy of the network, the split
point, auxiliary images and a query function bound to a *different* `Device` (the deployed software,
other draws). The attacks (`decoder_inversion`, `optimization_inversion`) take an `AttackerView` and
the observed features, nothing else, so no code path from an attack reaches the victim's draws.

Attacks
-------
* Decoder inversion (learning-based, black-box): an `InversionDecoder` is trained on (features,
  image) pairs of auxiliary images, the features coming from the deployed, stochastic extractor,
  then applied to the victims' features.
* Optimisation inversion (white-box): gradient descent on an input image, with a total-variation
  prior (kornia), to match the observed features. The attacker either samples its own draws at every
  step (mode "on") or uses the deterministic mean transform (mode "mean", `stochvit.layers.sampling`);
  the evaluator reports the better of the two (the one closer to the victims, which only the
  evaluator can know: a conservative, worst-case-for-privacy choice).

The standard defence for comparison adds Gaussian noise to the transmitted features (`Device`'s
`noise_std`); `split_accuracy` measures the full model's accuracy with that noise, so privacy curves
can be compared at matched utility. PSNR and SSIM come from torchmetrics.

Written by hand (no library provides them): the split of a timm ViT into device and server halves,
the decoder network and the optimisation loop; both attacks follow the feature-inversion literature
(Mahendran & Vedaldi 2015, He et al. 2019 "Model inversion attacks against collaborative inference").
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..defaults import SPLIT_NAMES, AttackConfig
from ..errors import UserError
from ..layers import is_random, random_modules, sampling
from ..models import Normalized
from ..precision import autocast
from .metrics import mc_metrics

BLOCK_NAMES = SPLIT_NAMES


# -- the split ------------------------------------------------------------------------------------
def depth(model: Normalized) -> int:
    """Number of transformer blocks of a wrapped timm ViT (a clear error for other models)."""
    net = getattr(model, "net", None)
    if net is None or not all(hasattr(net, a) for a in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head")):
        raise UserError("the privacy suite needs a timm VisionTransformer (patch_embed, blocks, norm, head) in a Normalized")
    return len(net.blocks)


def parse_blocks(text: str, n: int) -> list[int]:
    """'1,mid,last' -> split points k (number of device-side blocks), sorted and unique.

    Integers count blocks (0 = embedding only, n = all blocks); 'first' = 1, 'mid' = n // 2, 'last' = n.
    """
    named = {"first": 1, "mid": max(1, n // 2), "last": n}
    out = set()
    for token in (t.strip() for t in text.split(",") if t.strip()):
        if token in named:
            out.add(named[token])
            continue
        try:
            k = int(token)
        except ValueError:
            raise UserError(f"split_blocks: {token!r} is neither a block count nor one of {', '.join(BLOCK_NAMES)}") from None
        if not 0 <= k <= n:
            raise UserError(f"split_blocks: {k} is out of range for a model with {n} blocks (use 0..{n})")
        out.add(k)
    if not out:
        raise UserError("split_blocks is empty")
    return sorted(out)


def block_features(model: Normalized, x: torch.Tensor, k: int) -> torch.Tensor:
    """Token features (B, tokens, width) after the first k blocks of `model` on [0, 1] images (differentiable)."""
    net = model.net
    t = net.patch_embed((x - model.mean) / model.std)
    t = net.norm_pre(net.patch_drop(net._pos_embed(t)))
    for block in net.blocks[:k]:
        t = block(t)
    return t


def server_logits(model: Normalized, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """The server half: blocks k.., final norm and head, on transmitted features."""
    net = model.net
    for block in net.blocks[k:]:
        tokens = block(tokens)
    return net.forward_head(net.norm(tokens))


# -- the victim side ------------------------------------------------------------------------------
class Device:
    """The victim's device: runs the first `k` blocks with private draws and transmits only features.

    `noise_std` > 0 adds Gaussian noise of that (absolute) standard deviation to the transmitted
    features: the standard defence. `seed=None` seeds the private stream from OS entropy, as a real
    device would; pass a seed for reproducible experiments. `precision` is the autocast of its forward
    passes (`stochvit.precision`; the features are transmitted in fp32 either way), `batch_size` their size.
    """

    def __init__(self, model: Normalized, k: int, noise_std: float = 0.0, seed: int | None = None,
                 precision: str = "fp32", batch_size: int = 512) -> None:
        n = depth(model)
        if not 0 <= k <= n:
            raise ValueError(f"k={k} must be in 0..{n}")
        if noise_std < 0:
            raise ValueError(f"noise_std={noise_std} must be >= 0")
        self._model = copy.deepcopy(model).eval().requires_grad_(False)  # own modules: nobody else can hook them
        self.k, self.noise_std, self.precision, self.batch_size = k, float(noise_std), precision, batch_size
        self._where = next(self._model.parameters()).device
        seed = secrets.randbits(63) if seed is None else seed
        self._cpu_rng = torch.Generator().manual_seed(seed).get_state()
        self._cuda_rng = torch.Generator(self._where).manual_seed(seed).get_state() if self._where.type == "cuda" else None

    @contextmanager
    def _private_rng(self) -> Iterator[None]:
        """Draw from the device's own stream; the global RNG is left exactly as it was."""
        cuda = self._where.type == "cuda"
        with torch.random.fork_rng(devices=[self._where] if cuda else []):
            torch.set_rng_state(self._cpu_rng)
            if cuda:
                torch.cuda.set_rng_state(self._cuda_rng, self._where)
            try:
                yield
            finally:
                self._cpu_rng = torch.get_rng_state()
                if cuda:
                    self._cuda_rng = torch.cuda.get_rng_state(self._where)

    @torch.no_grad()
    def transmit(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """The features sent to the server for [0, 1] `images`: a detached copy, on the images' device."""
        out = []
        with self._private_rng():
            for chunk in images.split(batch_size or self.batch_size):
                with autocast(self.precision, self._where, self._model):
                    t = block_features(self._model, chunk.to(self._where), self.k)
                t = t.float()
                if self.noise_std > 0:
                    t = t + torch.randn_like(t) * self.noise_std
                out.append(t.detach().to(images.device, copy=True))
        return torch.cat(out)


# -- the attacker side ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AttackerView:
    """All an attacker gets: architecture and weights (its own copy), k, auxiliary images, query access.

    `query` runs the deployed extractor (a separate `Device`, other draws) on auxiliary images.
    `net` is None for a black-box attacker, who still knows the architecture (`patch`, `prefix` tokens).
    """

    net: Normalized | None
    k: int
    patch: int
    prefix: int
    aux: torch.Tensor
    query: Callable[[torch.Tensor], torch.Tensor]
    precision: str = "fp32"  # autocast of the white-box forward passes (autograd runs through it)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The attacker's own forward pass (its own draws), with gradients, for white-box attacks."""
        if self.net is None:
            raise UserError("this attack needs the weights (a white-box attacker view)")
        with autocast(self.precision, x.device, self.net):
            return block_features(self.net, x, self.k).float()


def attacker_view(model: Normalized, k: int, aux: torch.Tensor, noise_std: float = 0.0, white_box: bool = True,
                  seed: int | None = None, precision: str = "fp32", batch_size: int = 512) -> AttackerView:
    """The attacker's view of a deployment of `model` split after k blocks (noise defence `noise_std`); `precision`
    and `batch_size` are those of the model's forward passes."""
    deployed = Device(model, k, noise_std, seed, precision, batch_size)  # the software the attacker queries, not the victim's
    net = copy.deepcopy(model).eval().requires_grad_(False) if white_box else None
    patch = model.net.patch_embed.patch_size
    return AttackerView(net=net, k=k, patch=int(patch[0] if isinstance(patch, tuple) else patch),
                        prefix=int(model.net.num_prefix_tokens), aux=aux.detach().clone(), query=deployed.transmit,
                        precision=precision)


class InversionDecoder(nn.Module):
    """Maps block-k token features back to an image.

    A token-wise linear map to pixel patches (exact for an invertible patch embedding) plus a
    convolutional refinement over the token grid (recovers what attention spread across tokens).
    Features are standardised with auxiliary statistics first.
    """

    def __init__(self, width: int, grid: int, patch: int, chans: int, prefix: int, hidden: int = 128,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> None:
        super().__init__()
        self.grid, self.prefix = grid, prefix
        self.register_buffer("mu", torch.zeros(width) if mean is None else mean.clone())
        self.register_buffer("sd", torch.ones(width) if std is None else std.clone())
        self.linear = nn.Linear(width, chans * patch * patch)
        self.proj = nn.Conv2d(width, hidden, 1)
        self.body = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(),
        )
        self.out = nn.Conv2d(hidden, chans * patch * patch, 1)
        self.shuffle = nn.PixelShuffle(patch)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = (tokens[:, self.prefix:] - self.mu) / self.sd
        b, n, c = t.shape
        lin = self.linear(t).transpose(1, 2).reshape(b, -1, self.grid, self.grid)
        h = self.proj(t.transpose(1, 2).reshape(b, c, self.grid, self.grid))
        return self.shuffle(lin + self.out(h + self.body(h)))


def decoder_inversion(view: AttackerView, observed: torch.Tensor, cfg: AttackConfig | None = None,
                      progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Train an `InversionDecoder` on queried auxiliary features, then invert `observed`. Returns [0, 1] images."""
    cfg = cfg or AttackConfig()
    aux = view.aux
    probe = view.query(aux[: min(len(aux), 512)])
    width = probe.shape[-1]
    mean, std = probe.mean((0, 1)), probe.std((0, 1)).clamp_min(1e-6)
    dec = InversionDecoder(width, aux.shape[-1] // view.patch, view.patch, aux.shape[1], view.prefix, cfg.decoder_width,
                           mean, std).to(observed.device)
    opt = torch.optim.AdamW(dec.parameters(), lr=cfg.decoder_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.decoder_lr, total_steps=cfg.decoder_steps, pct_start=0.1)
    dec.train()
    for _ in range(cfg.decoder_steps):
        idx = torch.randint(len(aux), (min(cfg.decoder_batch, len(aux)),))
        x = aux[idx]
        feats = view.query(x).to(observed.device)  # fresh draws of the deployed extractor at every step
        loss = nn.functional.mse_loss(dec(feats), x.to(observed.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(1)
    dec.eval()
    with torch.no_grad():
        return torch.cat([dec(f) for f in observed.split(512)]).clamp(0, 1)



def optimization_inversion(view: AttackerView, observed: torch.Tensor, mode: str = "mean", cfg: AttackConfig | None = None,
                           progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """White-box inversion: images in [0, 1] whose block-k features match `observed`, under a TV prior.

    mode "on": the attacker samples its own draws at every step (matches the expected features);
    "mean": the deterministic mean transform. Images are optimised jointly but independently
    (the loss is a sum over images and Adam is element-wise). Starts from the mean auxiliary image.
    """
    from kornia.losses import total_variation

    if view.net is None:
        raise UserError("optimisation inversion needs the weights (a white-box attacker view)")
    cfg = cfg or AttackConfig()
    dev = observed.device
    x = view.aux.mean(0, keepdim=True).expand(len(observed), -1, -1, -1).clone().to(dev).requires_grad_(True)
    scale = observed.pow(2).mean().clamp_min(1e-12)
    pixels = x[0].numel()
    opt = torch.optim.Adam([x], lr=cfg.opt_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.opt_steps)
    with sampling(view.net, mode):
        for _ in range(cfg.opt_steps):
            feats = view.features(x)
            match = (feats - observed).pow(2).flatten(1).mean(1) / scale
            loss = (match + cfg.tv_weight * total_variation(x).sum(1) / pixels).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(0, 1)
            if progress is not None:
                progress(1)
    return x.detach()


def attacker_modes(view: AttackerView) -> list[str]:
    """Transforms the white-box attacker tries: its own draws and the mean transform, or just one if equal."""
    if view.net is None or not is_random(view.net):
        return ["mean"]
    full = any(getattr(m, "kind", None) == "full" for m in random_modules(view.net))
    return ["on"] if full else ["on", "mean"]


# -- metrics and utility --------------------------------------------------------------------------
def reconstruction_metrics(recon: torch.Tensor, original: torch.Tensor) -> dict[str, dict[str, float]]:
    """PSNR (dB) and SSIM of each reconstruction (torchmetrics, data range 1), mean ± std over images."""
    recon, original = recon.float().clamp(0, 1), original.float()
    per_image = dict(
        psnr=peak_signal_noise_ratio(recon, original, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        ssim=structural_similarity_index_measure(recon, original, data_range=1.0, reduction="none"),
    )
    return {k: dict(mean=v.mean().item(), std=v.std().item() if len(v) > 1 else 0.0) for k, v in per_image.items()}


def feature_rms(model: Normalized, images: torch.Tensor, k: int, precision: str = "fp32", batch_size: int = 512) -> float:
    """Root-mean-square of the clean block-k features: the unit of the relative noise levels."""
    feats = Device(model, k, seed=0, precision=precision).transmit(images, batch_size)
    return feats.pow(2).mean().sqrt().item()


@torch.no_grad()
def split_accuracy(model: Normalized, images: torch.Tensor, labels: torch.Tensor, k: int, noise_std: float = 0.0,
                   passes: int = 5, seed: int | None = None, batch_size: int = 512, precision: str = "fp32",
                   ) -> dict[str, float]:
    """Single-pass accuracy (mean ± std over passes) of the deployed split model, noise defence included."""
    device = Device(model, k, noise_std, seed, precision)
    server = model.eval()
    where = next(server.parameters()).device

    def probs_of(x: torch.Tensor) -> torch.Tensor:
        features = device.transmit(x, batch_size).to(where)
        with autocast(precision, where, server):
            return server_logits(server, features, k).float().softmax(-1).cpu()

    k_passes = passes if (noise_std > 0 or is_random(model)) else 1
    probs = torch.stack([torch.cat([probs_of(x) for x in images.split(batch_size)]) for _ in range(k_passes)])
    acc = mc_metrics(probs, labels.cpu())["single_pass"]["accuracy"]
    return dict(mean=acc["mean"], std=acc["std"], passes=k_passes)
