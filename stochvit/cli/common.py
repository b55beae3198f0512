"""The flags every subcommand shares, with one name per concept and defaults from the library.

One vocabulary: `--samples` is always the number of stochastic passes, `--seed` always seeds what a command samples,
`--precision` and `-b/--batch-size` go wherever a model runs, `--threads` and `--device` say where it runs, `--out` is
where outputs go and `--overwrite` allows replacing a report made with other settings. Old spellings stay accepted as
hidden aliases. Nothing here imports torch: `--help` prints at once.

`-c/--config FILE.yaml` (every command; timm's convention, and timm's way: the file's values become the parser's
defaults, so flags on the command line override them) and `args.yaml`, the resolved flags a run directory keeps,
which `--config` reads back. The file's values go through each flag's own type and choices.
"""

from __future__ import annotations

import argparse
import difflib
import math
from pathlib import Path
from typing import Any

from ..defaults import DEFAULT_STOCHASTIC, DISTRIBUTIONS, POSITIONS, PRECISIONS, SHARINGS, SPECS_HELP, recipe_help
from ..errors import UserError
from ..tracking import EVAL_METRICS, LOGGERS


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except a plain switch's: `--no-train`'s stored default (True) would read as "on"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def add_command(sub: argparse._SubParsersAction, name: str, help: str, description: str | None = None,
                ) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description or help, formatter_class=Formatter)
    p.add_argument("-c", "--config", default=None, metavar="FILE.yaml",
                   help="read this command's settings from YAML (keys: the flags' names, e.g. batch_size or batch-size; "
                        "a run's own args.yaml works); flags given on the command line override the file")
    return p


def alias(p: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, dest: str, **kwargs: Any) -> None:
    """An old spelling of a flag, still accepted and hidden from --help."""
    p.add_argument(old, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


# -- values --------------------------------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def name_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}, got {text!r}")
        return names
    return parse


def parse_eps(text: str) -> float:
    """"8/255" or "0.03" -> float."""
    t = text.strip()
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(t)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"cannot read epsilon {text!r}: write e.g. 8/255 or 0.03") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"epsilon {text!r} must be a finite number >= 0")
    return value


def eps_list(text: str) -> list[float]:
    values = [parse_eps(t) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one epsilon, e.g. 1/255,2/255,4/255,8/255")
    return sorted(set(values))


# -- shared flags --------------------------------------------------------------------------------------------------

def add_data_args(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default, help=f"dataset: {SPECS_HELP}" + ("" if default else "; None: the run's own"))
    g.add_argument("--data-dir", default=None, help="folder holding torchvision dataset files (cifar10/cifar100/svhn)")


def add_split_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data split")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split (keep fixed across runs)")
    g.add_argument("--train-limit", type=int, default=None, help="keep a stratified subset of this many training images")
    g.add_argument("--img-size", type=int, default=None, help="resize imagefolder images to this size")


def add_layer_args(g: argparse._ArgumentGroup, what: str = "") -> None:
    """The stochastic layer's settings; defaults are the library's (`stochvit.defaults.DEFAULT_STOCHASTIC`)."""
    d = DEFAULT_STOCHASTIC
    g.add_argument("--kind", default=d["kind"], choices=tuple(DISTRIBUTIONS), help=f"diagonal scale or full random matrix{what}")
    g.add_argument("--distribution", default=d["distribution"], choices=sorted({x for v in DISTRIBUTIONS.values() for x in v}),
                   help="distribution of the sampled parameters")
    g.add_argument("--low", type=float, default=d["low"], help="lower end of the scale range (diagonal kind)")
    g.add_argument("--high", type=float, default=d["high"], help="upper end of the scale range (diagonal kind)")
    g.add_argument("--sharing", default=d["sharing"], choices=SHARINGS,
                   help="image: one draw per image shared by its tokens (token-consistent)")
    g.add_argument("--position", default=d["position"], choices=POSITIONS, help="where the layer sits in the MLP")
    g.add_argument("--blocks", type=int_list, default=d["blocks"], help="only these block indices, e.g. 0,1,2 (None: all)")


def layer_from_args(a: argparse.Namespace) -> dict:
    return {k: getattr(a, k) for k in DEFAULT_STOCHASTIC}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and stochastic layer")
    g.add_argument("--model", default=None, help=f"timm model name ({recipe_help('model')})")
    g.add_argument("--act", default="gelu", choices=("gelu", "relu"), help="MLP activation")
    g.add_argument("--drop-rate", type=float, default=0.0, help="dropout rate in the MLPs and projections")
    g.add_argument("--mc-dropout", action="store_true", help="keep dropout on at inference (MC dropout baseline)")
    g.add_argument("--stochastic", action=argparse.BooleanOptionalAction, default=True, help="use stochastic MLP layers")
    add_layer_args(g)


def add_samples(g, default: int, what: str = "stochastic passes averaged", old: tuple[str, ...] = ()) -> None:
    g.add_argument("--samples", type=int, default=default, help=f"K {what} (deterministic models use 1)")
    for name in old:
        alias(g, name, "samples", type=int)


def add_seed(g, what: str) -> None:
    g.add_argument("--seed", type=int, default=0, help=f"seeds {what}: the same command gives the same numbers")


def add_precision(g, default: str = "auto", what: str = "") -> None:
    """`what`: what the precision applies to, where that is not simply every forward pass of the model."""
    g.add_argument("--precision", default=default, choices=PRECISIONS,
                   help=(f"{what}. " if what else "") +
                   "auto: bf16 autocast on CUDA, and on CPUs with native bf16 for models >= 128 wide; else fp32")


def add_batch_size(g, default: int | None, what: str = "images per forward pass") -> None:
    g.add_argument("-b", "--batch-size", type=int, default=default, help=what)


def add_runtime(p: argparse.ArgumentParser, device: bool = True) -> None:
    """`--threads` (every command that runs a model) and `--device` (those that run it in this process), checked by the
    library (`stochvit.precision.set_threads`, `resolve_device`) so that a bad value is one line."""
    g = p.add_argument_group("runtime")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads of this process and of the processes it starts (None: 1 to train the digits "
                        "models, which gain nothing from a second thread; otherwise torch's default, one per core; "
                        "OMP_NUM_THREADS is honoured); 1 degrades gracefully when other jobs share the cores")
    if device:
        g.add_argument("--device", default=None, metavar="cpu|cuda|cuda:N",
                       help="where the model runs (None: cuda when available, else cpu)")


def add_out(p, default: str | None, what: str, required: bool = False) -> None:
    p.add_argument("--out", default=default, required=required, help=what)


def add_overwrite(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing report made with other settings (otherwise refused)")


def add_tracking_args(p: argparse.ArgumentParser, best: bool = True) -> None:
    g = p.add_argument_group("tracking")
    g.add_argument("--log", default=None, choices=LOGGERS, help="also log the per-epoch metrics to RUN_DIR/tensorboard/ "
                   '(needs pip install "stochvit[tensorboard]"); metrics.jsonl and metrics.csv are always written')
    if best:
        g.add_argument("--eval-metric", default="nll", choices=tuple(EVAL_METRICS),
                       help="validation metric that picks model_best.safetensors (nll and ece: lowest; accuracy: highest)")


# -- --config FILE.yaml and args.yaml -------------------------------------------------------------------------------

CONFIG_SKIP = ("help", "config", "func", "command")  # not settings: never read from, nor written to, a config file


def _config_value(parser: argparse.ArgumentParser, action: argparse.Action, value: Any) -> Any:
    """A YAML value as the flag would parse it: through its type (str(value), as typed on a command line) and choices.

    A list is the flag's comma-separated form (`blocks: [0, 1]` is `--blocks 0,1`), or its several values (nargs).
    """
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise argparse.ArgumentError(action, f"expected true or false, got {value!r}")
        return value
    if action.nargs == "?" and value == action.const:  # the flag given alone, e.g. --shift
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)

    def one(v: Any) -> Any:
        if isinstance(v, (list, dict)):
            raise argparse.ArgumentError(action, f"expected a single value, got {v!r}")
        converted = parser._get_value(action, v if isinstance(v, str) else str(v))
        parser._check_value(action, converted)
        return converted

    def occurrence(v: Any) -> Any:
        if many:
            return [one(x) for x in (v if isinstance(v, list) else [v])]
        return one(",".join(map(str, v)) if isinstance(v, list) else v)

    if isinstance(action, argparse._AppendAction):
        return [occurrence(v) for v in (value if isinstance(value, list) else [value])]
    return occurrence(value)


def read_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """A YAML file's settings for `parser`, keyed by the flags' dests (dashes or underscores), parsed like the flags.

    An unreadable or invalid file, an unknown key or a bad value is one UserError line naming the file and the key.
    """
    import yaml

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"--config {path} is not valid YAML ({getattr(e, 'problem', None) or e}{where})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must be a mapping of settings (key: value), not a {type(data).__name__}")
    actions = {}
    for a in parser._actions:  # the visible flag of each dest, not its hidden old spellings
        if a.dest not in CONFIG_SKIP and a.dest != argparse.SUPPRESS and (a.dest not in actions or a.help != argparse.SUPPRESS):
            actions[a.dest] = a
    spellings = {o[2:].replace("-", "_"): a.dest for a in parser._actions if a.dest in actions
                 for o in a.option_strings if o.startswith("--")}  # old spellings too: eval_samples -> samples
    settings = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        dest = dest if dest in actions else spellings.get(dest, dest)
        if dest not in actions:
            close = difflib.get_close_matches(dest, actions, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(sorted(actions))}"
            raise UserError(f"--config {path}: unknown setting {key!r}{hint}")
        try:
            settings[dest] = _config_value(parser, actions[dest], value)
        except argparse.ArgumentError as e:
            raise UserError(f"--config {path}: {key}: {e.message}") from None
    return settings


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `stochvit COMMAND ...`, with `-c/--config FILE.yaml` as timm's train.py does it: read the file first, make
    its values the command's defaults (`set_defaults`), then parse the command line, whose flags win."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("command", nargs="?")
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if known.config and known.command in commands:
        sub = commands[known.command]
        try:
            settings = read_config(known.config, sub)
        except UserError as e:
            e.prog = sub.prog  # main's one line: "stochvit train: error: --config ..."
            raise
        sub.set_defaults(**settings)
        for a in sub._actions:  # a required flag (--out, --from, RUN_DIR...) may come from the file
            if a.dest in settings and settings[a.dest] is not None:
                a.required = False
    return parser.parse_args(argv)


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v) if isinstance(v, Path) else v


def args_yaml(a: argparse.Namespace) -> str:
    """The resolved flags of a command as YAML, read back by `--config` to the same settings."""
    import yaml

    values = {k: _plain(v) for k, v in vars(a).items() if k not in CONFIG_SKIP}
    return (f"# stochvit {a.command}: every flag of the command that made this run; rerun it with\n"
            f"# stochvit {a.command} --config args.yaml --out NEW_DIR (flags given there override the file)\n"
            + yaml.safe_dump(values, sort_keys=False, default_flow_style=False))


def unused_dir(path: str | Path) -> bool:
    """True for a path that is not there yet or an empty folder: a fresh run's directory, where args.yaml may go."""
    p = Path(path)
    return not p.exists() or (p.is_dir() and not any(p.iterdir()))


def write_args_yaml(out: str | Path, a: argparse.Namespace) -> None:
    """args.yaml into the run directory this command created (it holds config.json), also when the run was stopped
    after its first epoch; never into a directory that was there before."""
    from ..runs import atomic_write_bytes

    out = Path(out)
    if (out / "config.json").is_file() and not (out / "args.yaml").exists():
        atomic_write_bytes(out / "args.yaml", args_yaml(a).encode())
