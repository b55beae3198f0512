"""`stochvit federated`: flags -> `suites.federated.Settings` -> `run` (needs the federated extra; --help does not)."""

from __future__ import annotations

import argparse
import importlib

from ..errors import UserError
from ..suites.settings import FederatedSettings as S
from ..suites.settings import default
from .common import (
    add_command,
    add_data_args,
    add_model_args,
    add_out,
    add_runtime,
    add_split_args,
    add_tracking_args,
    unused_dir,
    write_args_yaml,
)
from .train import add_optimisation_args, train_config_from_args

EXTRA = ("flwr", "tomli_w")  # what `pip install "stochvit[federated]"` brings


class PrintAppPath(argparse.Action):
    """`--print-app-path`: the installed Flower app directory (for `flwr run`), printed at parse time like --version,
    so neither --out nor the federated extra is needed."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from ..federated.launch import APP_DIR  # stdlib only: no flwr, no torch

        print(APP_DIR)
        parser.exit()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "federated", "federated training (FedAvg on Flower) across simulated clients, IID or label-skewed",
                    "Federated averaging of a deterministic or stochastic ViT over N clients with IID or Dirichlet(alpha) "
                    "label-skewed partitions, simulated with Flower. Writes a normal run directory (evaluate, calibration, "
                    "robustness and privacy accept it) plus metrics.jsonl / rounds.png per round and partition.json / .png. "
                    'Needs the federated extra: pip install "stochvit[federated]".')
    p.add_argument("--print-app-path", action=PrintAppPath, help="print the installed Flower app directory and exit "
                   '(for your own SuperLink: flwr run "$(stochvit federated --print-app-path)" CONNECTION)')
    add_data_args(p)
    add_split_args(p)
    add_model_args(p)
    g = p.add_argument_group("federation")
    g.add_argument("--clients", type=int, default=default(S, "clients"), help="number of clients (simulated SuperNodes)")
    g.add_argument("--rounds", type=int, default=default(S, "rounds"), help="FedAvg rounds")
    g.add_argument("--local-epochs", type=int, default=default(S, "local_epochs"), help="local epochs per round on each client")
    g.add_argument("--partition", default=default(S, "partition"), help="iid | dirichlet:ALPHA (label skew; smaller ALPHA, "
                   "more skew; at least 10 samples per client, as flwr-datasets; dirichlet:ALPHA:balanced adds its "
                   "self-balancing) | shard:N (N label shards per client, McMahan et al.)")
    g.add_argument("--server-lr", type=float, default=default(S, "server_lr"),
                   help="server learning rate on the clients' averaged update (FedAvgM; 1.0 with momentum 0 is FedAvg)")
    g.add_argument("--server-momentum", type=float, default=default(S, "server_momentum"),
                   help="server momentum on the averaged update (FedAvgM, Hsu et al. 2019; 0 is FedAvg), in [0, 1)")
    g.add_argument("--fraction-train", type=float, default=default(S, "fraction_train"),
                   help="fraction of clients sampled per round")
    g.add_argument("--fraction-evaluate", type=float, default=default(S, "fraction_evaluate"),
                   help="fraction of clients that evaluate the global model on local held-out data (0 skips)")
    g.add_argument("--min-clients", type=int, default=None, help="fewest clients per round (None: min(2, clients))")
    g.add_argument("--cpus-per-client", type=int, default=default(S, "cpus_per_client"),
                   help="CPU cores reserved per simulated client (an integer)")
    g.add_argument("--timeout", type=float, default=default(S, "timeout"), help="give up (and stop the run) after this "
                   "many seconds")
    add_optimisation_args(p, federated=True)
    add_tracking_args(p, best=False)
    add_out(p, None, "run directory to create (must be new or empty); required unless --resume")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its last finished round, with its own settings (other flags "
                        "are refused, except --cpus-per-client, --timeout and --threads)")
    # testing hook (the reliability tests' fault injection), hidden from --help
    p.add_argument("--fail-from-round", type=int, default=0, help=argparse.SUPPRESS)
    add_runtime(p, device=False)  # the clients and the server pick their own device
    p.set_defaults(func=command)


def require_extra() -> None:
    """One line naming the extra when Flower (or tomli_w) is missing, instead of a traceback from deep in the suite."""
    for name in EXTRA:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in EXTRA:
                raise UserError(f'the federated suite needs {e.name}: pip install "stochvit[federated]"') from None
            raise


def settings_from_args(a: argparse.Namespace) -> S:
    return S(a.out, train_config_from_args(a), clients=a.clients, rounds=a.rounds, local_epochs=a.local_epochs,
             partition=a.partition, server_lr=a.server_lr, server_momentum=a.server_momentum,
             fraction_train=a.fraction_train, fraction_evaluate=a.fraction_evaluate, min_clients=a.min_clients,
             cpus_per_client=a.cpus_per_client, timeout=a.timeout, fail_from_round=a.fail_from_round)


def command(a: argparse.Namespace) -> None:
    from .train import flags_given_with

    if a.resume:
        ignored = flags_given_with(a, "federated", keep=("resume", "cpus_per_client", "timeout", "threads"))
        if ignored:
            raise UserError(f"--resume continues a run with its own settings and directory; remove {', '.join(ignored)} "
                            "(only --cpus-per-client, --timeout and --threads may change)")
        require_extra()
        from ..suites.federated import resume

        resume(a.resume, a.cpus_per_client, a.timeout)
        return
    if not a.out:
        raise UserError("--out is required (the run directory to create), or --resume RUN_DIR")
    require_extra()
    from ..suites.federated import run
    from ..tracking import check_logger

    check_logger(a.log)  # before any Flower process starts

    fresh = unused_dir(a.out)
    run(settings_from_args(a))
    if fresh:  # a failed federated run leaves no config.json, so args.yaml only beside a finished one
        write_args_yaml(a.out, a)
