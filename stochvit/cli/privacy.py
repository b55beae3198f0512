"""`stochvit privacy RUN_DIR...`: flags -> `suites.privacy.Settings` -> `run`."""

from __future__ import annotations

import argparse

from ..defaults import AttackConfig
from ..suites.settings import PRIVACY_ATTACKS, default
from ..suites.settings import PrivacySettings as S
from .common import (
    add_batch_size,
    add_command,
    add_data_args,
    add_out,
    add_overwrite,
    add_precision,
    add_runtime,
    add_samples,
    add_seed,
    alias,
    float_list,
    name_list,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "privacy", "split-inference feature inversion: decoder and white-box attacks vs a noise baseline",
                    "Split inference: the device runs the first k blocks with its own stochastic draws and sends the "
                    "token features; an attacker reconstructs the victim's images from them. Pass the deterministic "
                    "baseline run next to the stochastic one: the noise baseline is built from deterministic runs, and the "
                    "matched-accuracy comparison needs both.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="finished run directories (e.g. a stochastic and a deterministic run)")
    add_data_args(p, default=None)
    g = p.add_argument_group("split and attacks")
    g.add_argument("--split-blocks", default=default(S, "split_blocks"),
                   help="split points: block counts (0..depth) or first/mid/last")
    alias(g, "--blocks", "split_blocks")
    g.add_argument("--attacks", type=name_list(PRIVACY_ATTACKS), default=",".join(PRIVACY_ATTACKS),
                   help="comma-separated subset of " + ",".join(PRIVACY_ATTACKS))
    g.add_argument("--noise-baseline", type=float_list, default=",".join(map(str, default(S, "noise_baseline"))),
                   help="Gaussian noise levels on deterministic runs' features, in units of the clean RMS ('' for none)")
    g.add_argument("--n-victims", type=int, default=default(S, "n_victims"), help="victim images from the test split")
    g.add_argument("--aux-limit", type=int, default=None, help="attacker's auxiliary images: at most this many training "
                   "images (None: all)")
    c = AttackConfig()
    g.add_argument("--decoder-steps", type=int, default=c.decoder_steps, help="decoder training steps")
    g.add_argument("--decoder-width", type=int, default=c.decoder_width, help="decoder channels")
    g.add_argument("--opt-steps", type=int, default=c.opt_steps, help="optimisation-inversion steps")
    g.add_argument("--tv-weight", type=float, default=c.tv_weight, help="total-variation prior weight")
    add_samples(g, default(S, "samples"), "single passes averaged for the accuracy of random models", old=("--passes",))
    add_seed(g, "the victims, the devices' draws and the attacks")
    add_precision(g, default(S, "precision"), "autocast of the victim model's forward passes: the devices' features, "
                  "the split accuracy and the white-box inversion's gradient passes (the attacker's decoder trains in "
                  "fp32); the default fp32 is what earlier reports used")
    add_batch_size(g, default(S, "batch_size"), "images per forward pass of the victim model")
    add_out(p, None, "report folder (None: FIRST_RUN_DIR/privacy)")
    add_overwrite(p)
    add_runtime(p)
    p.set_defaults(func=command)


def settings_from_args(a: argparse.Namespace) -> S:
    attack = AttackConfig(decoder_steps=a.decoder_steps, decoder_width=a.decoder_width, opt_steps=a.opt_steps,
                          tv_weight=a.tv_weight)
    return S(a.run_dirs, a.data, a.data_dir, a.split_blocks, a.attacks, a.noise_baseline, a.n_victims, a.aux_limit,
             a.samples, attack, a.seed, a.precision, a.batch_size, a.out, a.overwrite, a.device)


def command(a: argparse.Namespace) -> None:
    from ..suites.privacy import markdown, run

    r = run(settings_from_args(a))
    print(markdown(r.report) + f"\nwrote {r.out}/privacy.json, privacy.md, reconstructions.png, privacy_utility.png")
