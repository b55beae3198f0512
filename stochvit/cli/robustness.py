"""`stochvit robustness RUN_DIR`: flags -> `suites.robustness.Settings` -> `run`."""

from __future__ import annotations

import argparse

from ..defaults import NORMS
from ..suites.settings import L2_EPS, LINF_EPS, ROBUSTNESS_ATTACKS, default
from ..suites.settings import RobustnessSettings as S
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
    eps_list,
    name_list,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "robustness", "adaptive adversarial evaluation (EOT, APGD, AutoAttack-rand, Square, transfer) "
                    "with sanity checks",
                    "Attack a run in [0,1] pixel space with naive and adaptive attacks (EOT over the stochastic layers), "
                    "re-evaluate randomized models over several passes, and print a PASS/FLAG gradient-masking report.")
    p.add_argument("run_dir", help="finished run directory to attack")
    add_data_args(p, default=None)
    g = p.add_argument_group("threat model and attacks")
    g.add_argument("--norm", default=default(S, "norm"), choices=NORMS, help="threat model: l-inf or l2 ball around each image")
    g.add_argument("--eps", type=eps_list, default=None, help="comma-separated radii in [0,1] pixel units (None: "
                   f"{','.join(f'{round(e * 255)}/255' for e in LINF_EPS)} for linf, {','.join(map(str, L2_EPS))} for l2)")
    g.add_argument("--attacks", type=name_list(ROBUSTNESS_ATTACKS), default=None,
                   help=f"comma-separated subset of {','.join(ROBUSTNESS_ATTACKS)} (None: all but transfer; with "
                        "--surrogate, all)")
    g.add_argument("--eot", type=int, default=default(S, "eot"), help="passes averaged per gradient or Square query "
                   "(AutoAttack-rand: 20)")
    g.add_argument("--steps", type=int, default=default(S, "steps"), help="iterations of PGD/APGD (AutoAttack: 100)")
    g.add_argument("--restarts", type=int, default=default(S, "restarts"), help="random restarts of PGD/APGD")
    g.add_argument("--square-queries", type=int, default=default(S, "queries"), help="Square attack queries per example")
    g.add_argument("--surrogate", default=None, metavar="RUN_DIR", help="run directory of the transfer attack's surrogate model")
    g = p.add_argument_group("evaluation")
    g.add_argument("--n-examples", type=int, default=default(S, "n_examples"), help="test examples attacked (a seeded "
                   "random subset)")
    add_samples(g, default(S, "passes"), "fresh stochastic passes of the final robust accuracy", old=("--passes",))
    add_batch_size(g, default(S, "batch_size"), "images attacked together")
    add_precision(g, default(S, "precision"), "autocast of every forward pass of the model and the surrogate, the "
                  "attacks' gradient passes included (the losses stay fp32); the default fp32 is what earlier reports used")
    add_seed(g, "the attacked examples, the attacks' random starts and the stochastic passes")
    g.add_argument("--n-boot", type=int, default=default(S, "n_boot"), help="bootstrap resamples of the 95%% intervals")
    g.add_argument("--no-sanity", action="store_true", help="skip the sanity report (saves the long-run and large-eps attacks)")
    g.add_argument("--no-eps-cascade", action="store_true",
                   help="attack every example afresh at every epsilon (by default an example's result at an epsilon is the "
                        "lower of its result there and at the next smaller one, and one every pass got wrong at a smaller "
                        "epsilon is not attacked again: this never raises a robust accuracy and costs less)")
    add_out(p, None, "report folder (None: RUN_DIR/robustness-NORM)")
    add_overwrite(p)
    add_runtime(p)
    p.set_defaults(func=command)


def command(a: argparse.Namespace) -> None:
    from ..suites.robustness import DEFAULT_ATTACKS, Settings, markdown, run

    attacks = a.attacks or list(DEFAULT_ATTACKS) + (["transfer"] if a.surrogate else [])
    eps = a.eps or list(LINF_EPS if a.norm == "linf" else L2_EPS)
    r = run(Settings(a.run_dir, a.data, a.data_dir, a.surrogate, a.norm, eps, attacks, a.eot, a.steps, a.restarts,
                     a.square_queries, a.samples, a.n_examples, a.batch_size, a.precision, a.seed, not a.no_sanity,
                     a.n_boot, a.out, a.overwrite, a.device, eps_cascade=not a.no_eps_cascade))
    print(markdown(r.report))
    print(f"wrote {r.out}/robustness.json, robustness.md, robust_accuracy.png, adversarial_examples.png")
