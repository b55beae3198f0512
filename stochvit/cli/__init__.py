"""The `stochvit` command: one entry point, a subcommand per job.

The only place that knows argparse. Each module here turns one subcommand's flags into its suite's typed
`Settings` (stochvit.suites) and calls `run`; the suites themselves load on demand, so `--help` does not import
torch. User mistakes raise `UserError` (a `ValueError`), printed here as one line with exit status 2.

    common.py   the shared vocabulary: --data, layer flags, --samples, --seed, --precision, -b/--batch-size, --out
    train.py    train          evaluate.py  evaluate       demo.py       demo
    calibration.py, robustness.py, privacy.py, federated.py, transfer.py, study.py: the suites of the same names
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import UserError
from . import calibration, demo, evaluate, federated, privacy, robustness, study, train, transfer

COMMANDS = (train, evaluate, demo, calibration, robustness, privacy, federated, transfer, study)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stochvit", description=__doc__.splitlines()[0].rstrip(":"))
    parser.add_argument("--version", action="version", version=f"stochvit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"stochvit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stochvit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
