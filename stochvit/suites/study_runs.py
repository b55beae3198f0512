"""A study: methods x seeds trained under one budget, then measured and compared with confidence intervals.

A TOML spec names the data and budget (`[train]`, any `TrainConfig` field), the methods (each a set of overrides
of it), the seeds, the ensembles and the claims to measure. The driver

1. trains every (method, seed) that is missing, resumes every interrupted one from its last checkpoint, and
   reuses every finished one (a finished run whose settings differ from the spec is refused, never mixed in);
2. caches each run's per-pass predictions (val, test, and a shifted test set) in the run directory, named by
   their settings, so that a second call only rebuilds the report;
3. runs the `[robustness]` and `[privacy]` suites on the finished runs of their methods, `jobs` runs side by side,
   each run's report cached in its directory (`stochvit.suites.study_suites`);
4. compares runs trained elsewhere (`[compare.NAME]`: a benchmark script's transfer or federated runs) from their
   cached predictions (`stochvit.suites.study_external`);
5. writes the report: per claim, each method against its baselines with differences, 95% intervals
   (`stochvit.eval.stats`) and verdicts, plus the plots, and the `[[verdicts]]` rows as one headline table
   (`stochvit.suites.study_verdicts`).

Everything is written atomically per run or per file, so the driver can be killed at any moment and started again.
Relative paths in a spec (data, out) are relative to the spec file's folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..procs import child_dies_with_parent
from ..train import TrainConfig
from .study_external import ExternalClaim, parse_external
from .study_suites import SUITES, SuiteClaim, parse_claim
from .study_verdicts import Verdict, parse_verdicts

# settings that do not change what a run learns, so a finished run is reused even if they differ
UNMATCHED = {"workers", "eval_samples", "val_every", "data_dir"}


@dataclass(frozen=True)
class CalibrationClaim:
    """Calibration on clean and shifted test images: every method (and its temperature-scaled twin) vs baselines."""

    samples: int = 5  # K passes of each stochastic model (the deployed K-sample average)
    shift_images: int = 2000  # stratified test subset, each image under one (corruption, severity) cell
    temperature: bool = True  # add "<method> +TS" for every method and ensemble
    metrics: tuple[str, ...] = ("ece", "nll", "accuracy", "brier")
    comparisons: tuple[tuple[str, str], ...] = ()  # (method, baseline); empty: every method vs the first method


@dataclass(frozen=True)
class Ensemble:
    members: str  # a method; its seeds are the members
    size: int = 3


@dataclass
class StudySpec:
    name: str
    out: Path
    seeds: tuple[int, ...]
    train: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    ensembles: dict[str, Ensemble] = field(default_factory=dict)
    calibration: CalibrationClaim | None = None
    suites: dict[str, SuiteClaim] = field(default_factory=dict)  # [robustness], [privacy]
    external: dict[str, ExternalClaim] = field(default_factory=dict)  # [compare.NAME]: runs trained elsewhere
    verdicts: list[Verdict] = field(default_factory=list)  # [[verdicts]]: the headline table
    jobs: int = 1  # trainings (and suite measurements) side by side
    threads: int = 1  # OpenMP threads per training or measurement
    path: Path | None = None  # the spec file (what the measuring processes read again)
    precision: str = "auto"  # of the evaluation
    method_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)  # a method's own `seeds` (default: all)

    def seeds_of(self, method: str) -> tuple[int, ...]:
        """The seeds a method is trained with: its own `seeds = [...]`, else the spec's."""
        return self.method_seeds.get(method, self.seeds)

    def config(self, method: str, seed: int) -> TrainConfig:
        cfg = TrainConfig(**{**self.train, **self.methods[method], "seed": seed})
        cfg.validate()
        return cfg

    def run_dir(self, method: str, seed: int) -> Path:
        return self.out / "runs" / f"{method}-seed{seed}"

    def runs(self) -> list[tuple[str, int]]:
        return [(m, s) for m in self.methods for s in self.seeds_of(m)]


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    seeds = tuple(value) if isinstance(value, list) else ()
    if not seeds or len(set(seeds)) != len(seeds) or not all(type(s) is int and s >= 0 for s in seeds):
        raise UserError(f"{where}: seeds must be distinct non-negative integers, got {value!r}")
    return seeds


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a TOML study spec (every error names the spec and the offending key)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"study spec {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"study spec {path} is not valid TOML: {e}") from None
    where = f"study spec {path}"
    known = {"name", "out", "seeds", "train", "methods", "ensembles", "calibration", *SUITES, "compare", "verdicts", "jobs",
             "threads", "precision"}
    if unknown := set(raw) - known:
        raise UserError(f"{where}: unknown keys {sorted(unknown)}; expected {sorted(known)}")
    train = dict(raw.get("train", {}))
    names = {f.name for f in fields(TrainConfig)}
    if bad := set(train) - names:
        raise UserError(f"{where}: [train] has unknown settings {sorted(bad)}")
    if "data" in train and train["data"].startswith("imagefolder:"):
        folder = Path(train["data"].split(":", 1)[1])
        if not folder.is_absolute():
            train["data"] = "imagefolder:" + os.path.relpath(path.parent / folder)
    methods = {m: dict(body) for m, body in raw.get("methods", {}).items()}
    if not methods:
        raise UserError(f"{where}: no [methods.NAME] tables")
    seeds = _seeds(raw.get("seeds", [0]), where)
    method_seeds = {m: _seeds(body.pop("seeds"), f"{where}: method {m!r}") for m, body in methods.items() if "seeds" in body}
    for m, overrides in methods.items():
        if bad := set(overrides) - names:
            raise UserError(f"{where}: method {m!r} has unknown settings {sorted(bad)}")
        if "seed" in overrides:
            raise UserError(f"{where}: method {m!r} sets seed; seeds come from the spec's `seeds`")
    ensembles = {}
    for e, body in raw.get("ensembles", {}).items():
        ens = Ensemble(**body)
        n = len(method_seeds.get(ens.members, seeds))
        if ens.members not in methods or not 2 <= ens.size <= n:
            raise UserError(f"{where}: ensemble {e!r} needs a known method and 2..{n} members")
        ensembles[e] = ens
    calibration = _calibration_claim(raw["calibration"], where) if "calibration" in raw else None
    suites = {s: parse_claim(s, raw[s], list(methods), where) for s in SUITES if s in raw}
    if not isinstance(raw.get("compare", {}), dict):
        raise UserError(f"{where}: `compare` must hold [compare.NAME] tables")
    external = {}
    for n, body in raw.get("compare", {}).items():
        at = f"{where}: [compare.{n}]"
        external[n] = parse_external(n, dict(body), path.parent, _seeds(body.get("seeds", [0]), at), at)
    spec = StudySpec(name=raw.get("name", path.stem), out=path.parent / raw.get("out", path.stem), seeds=seeds, train=train,
                     methods=methods, ensembles=ensembles, calibration=calibration, suites=suites, jobs=int(raw.get("jobs", 1)),
                     threads=int(raw.get("threads", 1)), precision=raw.get("precision", "auto"),
                     method_seeds=method_seeds, path=path, external=external)
    for m, s in spec.runs():
        spec.config(m, s)  # every run's settings are valid before anything is trained
    if calibration is not None:
        known_methods = _calibration_methods(spec)
        for pair in calibration.comparisons:
            if len(pair) != 2 or not set(pair) <= set(known_methods):
                raise UserError(f"{where}: comparison {list(pair)} names an unknown method; known: {known_methods}")
    spec.verdicts = parse_verdicts(raw.get("verdicts", []), _sections(spec), where)
    return spec


def calibration_pairs(spec: StudySpec, names: list[str]) -> list[tuple[str, str]]:
    """The calibration comparisons: the spec's, each also for the single pass of a random method (when `names`,
    the report's predictors, has one); by default every method against the first."""
    claim = spec.calibration
    if claim.comparisons:
        return [*claim.comparisons, *((f"{m} (1 pass)", b) for m, b in claim.comparisons if f"{m} (1 pass)" in names)]
    base = next(iter(spec.methods))
    return [(m, base) for m in names if m != base]


def _sections(spec: StudySpec) -> dict[str, tuple[set[tuple[str, str]], tuple[str, ...] | None]]:
    """What a verdict may come `from`: each section of the report, the (method, baseline) pairs it compares and its
    metrics (None for the suites, whose metric names follow from their settings: robust accuracy 8/255, ...)."""
    out: dict[str, tuple[set[tuple[str, str]], tuple[str, ...] | None]] = {}
    if spec.calibration is not None:
        names = _calibration_methods(spec)
        pairs = set(calibration_pairs(spec, [*names, *(f"{m} (1 pass)" for m in names)]))
        out |= {f"calibration/{c}": (pairs, spec.calibration.metrics) for c in ("clean", "shift")}
    out |= {name: (set(claim.comparisons), None) for name, claim in spec.suites.items()}
    return out | {f"compare/{name}": (set(c.comparisons), c.metrics) for name, c in spec.external.items()}


def _calibration_claim(body: dict, where: str) -> CalibrationClaim:
    body = dict(body)
    body["comparisons"] = tuple(tuple(c) for c in body.get("comparisons", ()))
    body["metrics"] = tuple(body.get("metrics", CalibrationClaim.metrics))
    try:
        return CalibrationClaim(**body)
    except TypeError as e:
        raise UserError(f"{where}: [calibration]: {e}") from None


def _calibration_methods(spec: StudySpec) -> list[str]:
    base = [*spec.methods, *spec.ensembles]
    ts = [f"{m} +TS" for m in base] if spec.calibration and spec.calibration.temperature else []
    return base + ts


# -- training -------------------------------------------------------------------------------------------

def run_status(spec: StudySpec, method: str, seed: int) -> str:
    """"finished", "partial" (a checkpoint or config to resume from) or "missing"; refuses a mismatched finished run."""
    path = spec.run_dir(method, seed)
    if not (path / "config.json").exists():
        return "missing"
    stored = json.loads((path / "config.json").read_text())["train"]
    want = asdict(spec.config(method, seed))
    differ = sorted(k for k in want if k not in UNMATCHED and _canonical(k, stored.get(k, want[k])) != _canonical(k, want[k]))
    if differ:
        raise UserError(f"run {path} was trained with other settings than the spec ({', '.join(differ)}); "
                        "move it away or restore the spec")
    return "finished" if (path / "summary.json").exists() else "partial"


def _canonical(key: str, value: Any) -> Any:
    """An imagefolder spec by its resolved folder, so that one folder spelled two ways still matches."""
    if key == "data" and isinstance(value, str) and value.startswith("imagefolder:"):
        return "imagefolder:" + str(Path(value.split(":", 1)[1]).resolve())
    return value


def _train_command(spec: StudySpec, method: str, seed: int, status: str) -> list[str]:
    path = str(spec.run_dir(method, seed))
    if status == "partial":
        return [sys.executable, "-m", "stochvit.suites.study_runs", "resume", path]
    return [sys.executable, "-m", "stochvit.suites.study_runs", "train", json.dumps(asdict(spec.config(method, seed))), path]


def train_missing(spec: StudySpec, log=print) -> dict[str, float]:
    """Train what is missing, `spec.jobs` at a time with `spec.threads` threads each. Returns wall seconds per run."""
    todo = [(f"{m}-seed{s}", "resuming" if status == "partial" else "training", _train_command(spec, m, s, status))
            for m, s in spec.runs() if (status := run_status(spec, m, s)) != "finished"]
    return side_by_side(spec, todo, "training run(s)", log)


def measure_missing(spec: StudySpec, claim: SuiteClaim, log=print) -> dict[str, float]:
    """Run `claim`'s suite on every finished run that lacks its cached report, `spec.jobs` at a time with
    `spec.threads` threads each, each in its own process like the trainings. Returns wall seconds per run.
    With one job it does nothing: `study_suites.measure` then measures them in this process, one after another."""
    from .study_suites import cache_folder, finished_runs

    if spec.jobs <= 1:
        return {}
    todo = [(f"{claim.suite}-{m}-seed{s}", "measuring",
             [sys.executable, "-m", "stochvit.suites.study_runs", "measure", str(spec.path), claim.suite, str(run_dir)])
            for m, s, run_dir in finished_runs(spec, claim)
            if not (cache_folder(claim, run_dir) / f"{claim.suite}.json").exists()]
    return side_by_side(spec, todo, f"{claim.suite} measurement(s)", log)


def side_by_side(spec: StudySpec, todo: list[tuple[str, str, list[str]]], what: str, log=print) -> dict[str, float]:
    """Run the (name, verb, argv) child processes `spec.jobs` at a time, OMP_NUM_THREADS=`spec.threads`, each logging
    to spec.out/logs/NAME.log; a child dies with the driver. Returns wall seconds per name; raises if any failed."""
    todo = list(todo)
    (spec.out / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads))
    running: list[tuple[subprocess.Popen, str, float, Any]] = []
    walls: dict[str, float] = {}
    failed = []
    while todo or running:
        while todo and len(running) < max(1, spec.jobs):
            name, verb, argv = todo.pop(0)
            log(f"study {spec.name}: {verb} {name}")
            logf = open(spec.out / "logs" / f"{name}.log", "a")  # noqa: SIM115 (closed when the child ends)
            proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=child_dies_with_parent)  # SIGKILL of the driver: none left
            running.append((proc, name, time.perf_counter(), logf))
        time.sleep(0.5)
        for item in list(running):
            proc, name, t0, logf = item
            if proc.poll() is None:
                continue
            running.remove(item)
            logf.close()
            walls[name] = time.perf_counter() - t0
            if proc.returncode != 0:
                failed.append(name)
                log(f"study {spec.name}: {name} failed (exit {proc.returncode}); see {spec.out / 'logs' / (name + '.log')}")
            else:
                log(f"study {spec.name}: {name} finished in {walls[name]:.0f} s")
    if failed:
        raise UserError(f"{len(failed)} {what} failed: {', '.join(failed)}; fix and start the study again")
    return walls


def _worker(argv: list[str]) -> int:
    """`python -m stochvit.suites.study_runs train CONFIG_JSON OUT | resume OUT | measure SPEC SUITE RUN_DIR`: one
    training, or one run's suite report, run by the driver."""
    from ..train import train
    from .study_suites import cached_report

    try:
        if argv[0] == "train":
            train(TrainConfig(**json.loads(argv[1])), out=argv[2], quiet=True)
        elif argv[0] == "measure":
            cached_report(load_spec(argv[1]).suites[argv[2]], Path(argv[3]))
        else:
            train(resume=argv[1], quiet=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# -- predictions ----------------------------------------------------------------------------------------

def shift_set(test, images: int, seed: int = 0):
    """A stratified subset of the test set, each image corrupted by one (corruption, severity) cell, cells balanced.

    One mixed set instead of every cell on every image: the same coverage of the 8 x 5 grid, at 1/40 of the cost,
    and every run sees the very same corrupted images (paired comparisons). The 8 kinds are frozen
    (`ORIGINAL_CORRUPTIONS`), not every built-in kind: runs cache their predictions on this very set.
    """
    import numpy as np
    from sklearn.model_selection import train_test_split

    from ..data import ImageSet
    from ..eval.corruptions import ORIGINAL_CORRUPTIONS, SEVERITIES, corrupt, to_uint8

    idx = np.arange(len(test))
    if images < len(test):
        idx = np.sort(train_test_split(idx, train_size=images, stratify=test.labels.numpy(), random_state=seed)[0])
    x, y = test.subset(idx).tensors()
    cells = [(c, s) for c in ORIGINAL_CORRUPTIONS for s in SEVERITIES]
    cell_of = np.random.default_rng(seed).permutation(len(idx)) % len(cells)
    out = torch.empty_like(x)
    for i, (c, s) in enumerate(cells):
        where = torch.from_numpy(np.flatnonzero(cell_of == i))
        if len(where):
            out[where] = corrupt(x[where], c, s, seed)
    return ImageSet(to_uint8(out), y.clone())


def cached_predictions(run_path: Path, data, shifted, samples: int, shift_images: int, precision: str) -> dict:
    """Per-pass probabilities on val, test and the shifted set, computed once and kept in the run directory."""
    from safetensors.torch import load_file, save

    from ..eval.calibration import log_probs
    from ..precision import default_device
    from ..predict import dataset_probs
    from ..runs import atomic_write_bytes, load_run

    path = run_path / f"predictions-K{samples}-shift{shift_images}.safetensors"
    if path.exists():
        return {k: v.float().softmax(-1) for k, v in load_file(str(path)).items()}
    run = load_run(run_path)
    model = run.model.to(default_device())
    out = {}
    for split, dataset in (("val", data.val), ("test", data.test), ("shift", shifted)):
        out[split] = dataset_probs(model, dataset, samples, precision=precision)[0]
    # log-probabilities in float16 (probabilities would underflow): ~1.2 MB a run at K=5, small enough to commit
    atomic_write_bytes(path, save({k: log_probs(v).half().contiguous() for k, v in out.items()}))
    return {k: v.float().softmax(-1) for k, v in load_file(str(path)).items()}


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
