"""Every suite's typed settings, and the base of its result: `run(Settings(...))` from Python is what the command line does.

Kept apart from the suites themselves, and free of torch, so that the command line takes its defaults from these
dataclasses (one place) and still prints `--help` at once. Each suite module re-exports its class as `Settings`.
One convention for every suite: `run(settings) -> result`, a dataclass derived from `Result` holding `out` (where the
suite wrote) and its key numbers; where reporting is a separate step (study), `report(result, out)` writes it.
Output rule: a report on runs goes into the first run directory it reads, in a file or folder named by the suite
(and, for evaluate, its settings) unless `out` says otherwise; a command that makes runs (train, federated, transfer,
demo) writes them under `out`. An existing report made with other settings is refused unless `overwrite` is set.
`device` ("cpu", "cuda", "cuda:N"; None: CUDA when available) says where the model runs; like `out`, it is not part
of the settings a report is compared by.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..defaults import SEVERITIES, AttackConfig

if TYPE_CHECKING:
    from ..train import TrainConfig

ROBUSTNESS_ATTACKS = ("fgsm", "pgd", "eot-pgd", "apgd-ce", "apgd-dlr", "aa-rand", "square", "transfer")
ROBUSTNESS_DEFAULT_ATTACKS = ROBUSTNESS_ATTACKS[:-1]  # transfer needs a surrogate
LINF_EPS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
L2_EPS = (0.1, 0.25, 0.5, 1.0)
PRIVACY_ATTACKS = ("decoder", "optimization")


def record(settings: Any) -> dict:
    """The settings as the JSON a report keeps of them (paths as strings, tuples as lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in asdict(settings).items() if k not in ("out", "overwrite", "quiet", "device")}


@dataclass
class Result:
    """What every suite's `run(settings)` returns: `out`, where it wrote (a report folder, a run directory, or the
    evaluation's JSON file; None only when that file could not be written), and in each subclass the key numbers."""

    out: Path | None


def default(cls: type, name: str) -> Any:
    """A Settings field's default, for the command line's flags."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not MISSING else f.default


@dataclass
class EvaluateSettings:
    run_dir: str | Path
    data: str | None = None  # another dataset spec; default: the run's own data and split
    data_dir: str | None = None
    samples: int = 10  # K stochastic passes
    mode: str = "on"  # stochastic layers: sample (on), expectation (mean), identity (off)
    split: str = "test"  # test | val | all (every image of another dataset, `data`)
    seed: int = 0  # seeds the stochastic passes: the same settings give the same numbers
    precision: str = "auto"
    batch_size: int = 256
    out: str | Path | None = None  # default: RUN_DIR/eval-<data>-<split>-<mode>-k<K>-seed<S>.json
    overwrite: bool = False
    device: str | None = None  # cpu | cuda | cuda:N (None: cuda when available)


@dataclass
class DemoSettings:
    out: str | Path = "runs/demo"
    samples: int = 10
    shift: bool = True
    seed: int = 0  # training seed of both runs and the calibration suite's seed
    precision: str = "auto"
    batch_size: int = 256  # of the calibration predictions
    overwrite: bool = False
    device: str | None = None  # cpu | cuda | cuda:N (None: cuda when available)


@dataclass
class CalibrationSettings:
    run_dirs: list[str | Path]
    ensembles: list[list[str | Path]] = field(default_factory=list)
    data: str | None = None
    data_dir: str | None = None
    samples: int = 10
    shift: bool | str = False  # True: stochvit's corruptions; "cifar10c:PATH" / "cifar100c:PATH": the released files
    corruptions: tuple[str, ...] | None = None  # None: the original 8 built-in (15 standard for the files); ("all",)
    severities: tuple[int, ...] = SEVERITIES
    shift_limit: int | None = None
    seed: int = 0
    precision: str = "auto"
    batch_size: int = 256
    n_boot: int = 1000
    out: str | Path | None = None  # default: FIRST_RUN_DIR/calibration
    overwrite: bool = False
    quiet: bool = False
    device: str | None = None  # cpu | cuda | cuda:N (None: cuda when available)


@dataclass
class RobustnessSettings:
    run_dir: str | Path | None = None
    data: str | None = None
    data_dir: str | None = None
    surrogate: str | Path | None = None
    norm: str = "linf"
    eps: list[float] = field(default_factory=lambda: list(LINF_EPS))
    attacks: list[str] = field(default_factory=lambda: list(ROBUSTNESS_DEFAULT_ATTACKS))
    eot: int = 20
    steps: int = 100
    restarts: int = 1
    queries: int = 1000
    passes: int = 10  # fresh stochastic passes for the final robust accuracy (the command line's --samples)
    n_examples: int = 1000
    batch_size: int = 250
    precision: str = "fp32"  # autocast of every forward pass of the model (and surrogate), gradient passes included
    seed: int = 0
    sanity: bool = True
    n_boot: int = 1000  # bootstrap resamples of the 95% intervals
    out: str | Path | None = None  # default: RUN_DIR/robustness-NORM
    overwrite: bool = False
    device: str | None = None  # cpu | cuda | cuda:N (None: cuda when available)
    eps_cascade: bool = True  # build each epsilon on the smaller ones' outcome (never raises a robust accuracy)


@dataclass
class PrivacySettings:
    run_dirs: list[str | Path]
    data: str | None = None
    data_dir: str | None = None
    split_blocks: str = "1,mid,last"  # split points: block counts (0..depth) or first/mid/last
    attacks: list[str] = field(default_factory=lambda: list(PRIVACY_ATTACKS))
    noise_baseline: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])
    n_victims: int = 32
    aux_limit: int | None = None
    samples: int = 5  # single passes averaged for the accuracy of random models
    attack: AttackConfig = field(default_factory=AttackConfig)
    seed: int = 0
    precision: str = "fp32"  # autocast of the victim model's forward passes (the decoder attack trains in fp32)
    batch_size: int = 512  # images per forward pass of the victim model
    out: str | Path | None = None  # default: FIRST_RUN_DIR/privacy
    overwrite: bool = False
    device: str | None = None  # cpu | cuda | cuda:N (None: cuda when available)


@dataclass
class FederatedSettings:
    out: str | Path
    train: TrainConfig | dict = field(default_factory=dict)  # the clients' training settings (TrainConfig or its fields)
    clients: int = 5
    rounds: int = 10
    local_epochs: int = 1
    partition: str = "iid"  # iid | dirichlet:ALPHA[:balanced] | shard:N
    server_lr: float = 1.0  # FedAvgM on the server: 1.0 and momentum 0.0 are plain FedAvg
    server_momentum: float = 0.0
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_clients: int | None = None  # default: min(2, clients)
    cpus_per_client: int = 1
    timeout: float = 86400.0
    fail_from_round: int = 0  # testing hook: every client's training fails from this round on (0: never)


@dataclass
class TransferSettings:
    source: str  # a run directory or a timm model name
    out: str | Path
    weights: str | None = None
    data: str = "digits"
    transfer_mode: str = "finetune"
    stochastic_target: str = "keep"
    layer: dict | None = None  # the stochastic layer for stochastic_target="add" (default: the default layer)
    backbone_lr_scale: float = 1.0
    train: dict = field(default_factory=dict)  # TrainConfig fields (epochs, lr, seed, ...); absent: the transfer recipe
    device: str | None = None  # cpu | cuda | cuda:N (None: cuda when available)


@dataclass(frozen=True)
class StudySettings:
    spec: str | Path
    train: bool = True  # train what is missing first; False reports on the runs finished so far (a progress report)
    n_boot: int = 2000
    jobs: int | None = None  # trainings and suite measurements side by side (None: the spec's `jobs`); 1 leaves a core free
