"""The `stochvit` command: one entry point, a subcommand per job.

The only place that knows argparse. Each module here turns one subcommand's flags into its suite's typed
`Settings` (stochvit.suites) and calls `run`; the suites themselves load on demand, so `--help` does not import
torch. User mistakes raise `UserError` (a `ValueError`), printed here as one line with exit status 2. Ctrl-C
(exit 130) and SIGTERM (`kill`, a scheduler or a session ending; exit 143) unwind the same way, so every command's
cleanup runs: a fresh run killed before its first checkpoint leaves nothing, a federated run only its logs.

    common.py   the shared vocabulary: --data, layer flags, --samples, --seed, --precision, -b/--batch-size, --out,
                and -c/--config FILE.yaml (every command) with the args.yaml that run directories keep
    train.py    train          evaluate.py  evaluate       demo.py       demo
    calibration.py, robustness.py, privacy.py, federated.py, transfer.py, study.py: the suites of the same names
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading

from .. import __version__
from ..defaults import default_threads, recipe_for
from ..errors import UserError
from . import calibration, demo, evaluate, federated, privacy, robustness, study, train, transfer
from .common import parse_args

COMMANDS = (train, evaluate, demo, calibration, robustness, privacy, federated, transfer, study)
# library parameter names whose flag has another name (TrainConfig.adv's keys are written as a Python caller sets them)
PARAMETERS = {"eval_samples": "samples", "passes": "samples", "queries": "square_queries",
              'adv["method"]': "adv", 'adv["eps"]': "adv_eps", 'adv["steps"]': "adv_steps"}


def in_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """A library message (naming parameters: `epochs=0`, `split_blocks`, `out`) in the command's flags (`--epochs=0`).

    The library speaks Python, so a Python caller reads its own argument names; the command line's user reads flags.
    """
    flags = {a.dest: max(a.option_strings, key=len) for a in parser._actions
             if a.option_strings and a.help is not argparse.SUPPRESS}  # not the hidden old spellings
    names = {**{d: d for d in flags}, **{k: v for k, v in PARAMETERS.items() if v in flags}}

    def flag(m: re.Match) -> str:
        return flags[names[m.group(1)]] + m.group(2)

    dotted = "|".join(sorted((re.escape(n) for n in names if "_" in n or "[" in n), key=len, reverse=True))
    plain = "|".join(sorted((re.escape(n) for n in names if "_" not in n and "[" not in n), key=len, reverse=True))
    if dotted:  # an underscored identifier (or a dict key, adv["steps"]) is a parameter wherever it stands
        message = re.sub(rf"(?<![\w./-])({dotted})()(?!\w)", flag, message)
    if plain:  # a plain word only as `name=value`
        message = re.sub(rf"(?<![\w./-])({plain})(=)", flag, message)
    return re.sub(r"\b(new|another) out\b", r"\1 --out", message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stochvit", description=__doc__.splitlines()[0].rstrip(":"))
    parser.add_argument("--version", action="version", version=f"stochvit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, like Ctrl-C's KeyboardInterrupt (whose handlers it reaches too)."""


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        return _main(argv)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parse_args(parser, argv)  # with -c/--config FILE.yaml: the file's settings, then the flags
    except UserError as e:  # a config file's problem, in its own words (its keys are the flags' dests)
        print(f"{getattr(e, 'prog', 'stochvit')}: error: {e}", file=sys.stderr)
        return 2
    try:
        threads = getattr(args, "threads", None)
        if threads is None and args.command in ("train", "demo") and not getattr(args, "resume", None) \
                and "OMP_NUM_THREADS" not in os.environ:  # small models train fastest on one thread (defaults.py)
            model = getattr(args, "model", None) or recipe_for(getattr(args, "data", None) or "digits")["model"]
            threads = default_threads(model)
        if threads is not None:
            from ..precision import set_threads

            set_threads(threads)
        args.func(args)
    except UserError as e:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        print(f"stochvit {args.command}: error: {in_flags(str(e), sub)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"stochvit {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
