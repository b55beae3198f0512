"""The study driver: trains what is missing, survives SIGKILL at any moment, reuses finished work, refuses mismatches."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stochvit.cli import main
from stochvit.errors import UserError
from stochvit.suites.study import Settings, report, run
from stochvit.suites.study_runs import load_spec

SPEC = """
name = "mini"
seeds = [0, 1]
jobs = 2
[train]
data = "digits"
train_limit = 300
epochs = 3
batch_size = 64
eval_samples = 1
[methods.deterministic]
stochastic = false
[methods.stochastic]
[ensembles.ens]
members = "deterministic"
size = 2
[calibration]
samples = 2
shift_images = 60
comparisons = [["stochastic", "deterministic"], ["stochastic", "ens"]]
"""


def _mtimes(root: Path, pattern: str) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.glob(pattern)}


@pytest.mark.slow
def test_study_killed_mid_run_resumes_and_never_recomputes_finished_work(tmp_path):
    spec = tmp_path / "mini.toml"
    spec.write_text(SPEC)
    runs = tmp_path / "mini" / "runs"
    cmd = [sys.executable, "-m", "stochvit", "study", str(spec), "--n-boot", "200"]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 240
    while not list(runs.glob("*/checkpoint.pt")) and time.time() < deadline:  # a training run is mid-way
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    interrupted = [p.parent for p in runs.glob("*/checkpoint.pt") if not (p.parent / "summary.json").exists()]
    assert interrupted, "the driver was killed after every run had finished; the test needs a slower run"
    time.sleep(1.0)  # the trainings die with the driver (PR_SET_PDEATHSIG) before the restart takes their locks
    finished_before = _mtimes(runs, "*/summary.json")

    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resuming" in out.stdout
    for path, mtime in finished_before.items():
        assert Path(path).stat().st_mtime_ns == mtime  # finished runs were not retrained
    for run_dir in interrupted:  # the interrupted run continued: every epoch logged once
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [0, 1, 2]
    report_dir = tmp_path / "mini" / "report"
    study = json.loads((report_dir / "study.json").read_text())
    assert {r["status"] for r in study["plan"]} == {"finished"} and len(study["plan"]) == 4
    rows = study["comparisons"]["clean"]
    assert {(r["method"], r["baseline"]) for r in rows} >= {("stochastic", "deterministic"), ("stochastic (1 pass)", "ens")}
    assert all(r["low"] <= r["difference"] <= r["high"] and r["verdict"] in ("better", "worse", "no difference detected")
               for r in rows)
    assert (report_dir / "comparisons-shift.png").stat().st_size > 1000

    # a finished study only rebuilds its report, from Python with a Settings object
    trained = _mtimes(runs, "*/summary.json") | _mtimes(runs, "*/predictions-*.safetensors")
    result = run(Settings(spec, train=True, n_boot=200), log=lambda *_: None)
    report(result)
    assert _mtimes(runs, "*/summary.json") | _mtimes(runs, "*/predictions-*.safetensors") == trained
    assert result.seconds["train"] < 5 and result.regime["baseline"] == "deterministic"

    # a finished run trained with other settings than the spec is refused, not mixed in
    spec.write_text(SPEC.replace("epochs = 3", "epochs = 4"))
    with pytest.raises(UserError, match="other settings than the spec"):
        run(Settings(spec))


@pytest.mark.parametrize("body, message", [
    ("seeds = [0]\n[methods.a]\nlr = -1\n[calibration]\n", "lr"),
    ("seeds = [0, 0]\n[methods.a]\n", "seeds must be distinct"),
    ("colour = 1\n[methods.a]\n", "unknown keys"),
    ("[methods.a]\nlearning_rate = 1\n", "unknown settings"),
    ("[methods.a]\nseed = 3\n", "seeds come from the spec"),
    ("seeds = [0, 1]\n[methods.a]\nseeds = [1, 1]\n", "method 'a'.*seeds must be distinct"),
    ("seeds = [0, 1]\n[methods.a]\nseeds = 1\n", "method 'a'.*seeds must be distinct"),
    ("seeds = [0, 1, 2]\n[methods.a]\nseeds = [0]\n[ensembles.e]\nmembers = 'a'\n", "2..1 members"),
    ("[methods.a]\n[calibration]\ncomparisons = [['a', 'b']]\n", "unknown method"),
    ("[methods.a\n", "not valid TOML"),
    ("[methods.a]\n[robustness]\nepsilon = [0.1]\n", r"\[robustness\] has unknown settings \['epsilon'\]"),
    ("[methods.a]\n[robustness]\nsteps = 0\n", "steps=0 must be >= 1"),
    ("[methods.a]\n[robustness]\neps = ['8/0']\n", "eps '8/0'"),
    ("[methods.a]\n[privacy]\nmethods = ['b']\n", r"methods \['b'\] are not methods"),
    ("[methods.a]\n[privacy]\ncomparisons = [['a + noise 2', 'a']]\nnoise_baseline = [1.0]\n", "unknown method"),
    ("[methods.a]\n[privacy.attack]\ndecoder_step = 3\n", r"\[privacy.attack\]"),
    ("[methods.a]\n[compare.t]\nfolder = 'r'\ncomparisons = []\n", r"\[compare.t\] needs `runs`"),
    ("[methods.a]\n[compare.t]\nfolder = 'r'\ncomparisons = []\nruns = {x = 'x-{sed}'}\n", r"uses \['sed'\]"),
    ("[methods.a]\n[compare.t]\nfolder = 'r'\ncomparisons = [['x', 'y']]\nruns = {x = 'x'}\n", "unknown run label"),
    ("[methods.a]\n[compare.t]\nfolder = 'r'\ncomparisons = []\nruns = {x = 'x'}\nmetrics = ['f1']\n", "metrics"),
    ("[methods.a]\n[[verdicts]]\nclaim = 'c'\n", "needs exactly the keys"),
    ("[methods.a]\n[[verdicts]]\nclaim = 'c'\nregime = 'r'\nfrom = 'robustness'\nmethod = 'a'\nbaseline = 'a'\n"
     "metric = 'm'\n", "not a section of this spec"),
    ("[methods.a]\n[methods.b]\n[calibration]\n[[verdicts]]\nclaim = 'c'\nregime = 'r'\nfrom = 'calibration/clean'\n"
     "method = 'a'\nbaseline = 'b'\nmetric = 'ece'\n", "compares no 'a' with 'b'"),
    ("[methods.a]\n[methods.b]\n[calibration]\n[[verdicts]]\nclaim = 'c'\nregime = 'r'\nfrom = 'calibration/clean'\n"
     "method = 'b'\nbaseline = 'a'\nmetric = 'ECE'\n", "has no metric 'ECE'"),
    ("[methods.a]\n[compare.t]\nfolder = 'r'\ncomparisons = []\nruns = {x = 'x'}\nseeds = [1, 1]\n",
     r"\[compare.t\]: seeds must be distinct"),
])
def test_bad_specs_are_refused_naming_the_problem(tmp_path, body, message):
    spec = tmp_path / "s.toml"
    spec.write_text(body)
    with pytest.raises(UserError, match=message):
        load_spec(spec)


def test_cli_turns_a_bad_spec_into_one_line_and_status_2(tmp_path, capsys):
    assert main(["study", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "missing").exists()


def test_shipped_specs_load():
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "studies"
    digits = load_spec(root / "digits.toml")
    assert len(digits.seeds) == 10 and set(digits.methods) >= {"deterministic", "stochastic"}
    cifar = load_spec(root / "cifar10.toml")
    assert cifar.train["augment"] == "none" and cifar.train["train_limit"] >= 10_000 and len(cifar.seeds) >= 3


def test_a_method_may_train_fewer_seeds_than_the_spec(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text("seeds = [0, 1, 2]\n[methods.a]\n[methods.b]\nseeds = [0]\nlr = 2e-3\n")
    s = load_spec(spec)
    assert s.runs() == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
    assert s.seeds_of("b") == (0,) and s.config("b", 0).lr == 2e-3 and "seeds" not in s.methods["b"]


SUITE_SPEC = """
name = "suites"
seeds = [0, 1]
jobs = 2
[train]
data = "digits"
train_limit = 600
epochs = 3
warmup_epochs = 0
batch_size = 16
augment = "none"
eval_samples = 1
[methods.deterministic]
stochastic = false
[methods.stochastic]
[robustness]
attacks = ["eot-pgd", "aa-rand"]
eps = ["2/255", "8/255"]
n_examples = 16
steps = 2
eot = 2
passes = 2
batch_size = 16
sanity = false
n_boot = 100
[privacy]
comparisons = [["stochastic", "deterministic"], ["deterministic + noise 0.5", "deterministic"]]
split_blocks = "1"
attacks = ["decoder"]
noise_baseline = [0.5]
n_victims = 6
aux_limit = 48
samples = 1
[privacy.attack]
decoder_steps = 3
decoder_width = 8
decoder_batch = 16
"""


@pytest.fixture(scope="module")
def suite_study(tmp_path_factory):
    """A trained 2 x 2 study (3 short epochs, ~0.2 test accuracy) with tiny [robustness] and [privacy] sections."""
    root = tmp_path_factory.mktemp("suites")
    spec = root / "suites.toml"
    spec.write_text(SUITE_SPEC)
    from stochvit.train import train

    study = load_spec(spec)  # trained in this process (the driver's subprocesses are the test above's business)
    for m, s in study.runs():
        train(study.config(m, s), out=study.run_dir(m, s), quiet=True)
    return spec


def _counting(monkeypatch, module, name: str, fail_at: int | None = None) -> list:
    """Count the calls of module.name; with fail_at, the call of that number fails midway (a killed study)."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == fail_at:
            raise KeyboardInterrupt("killed mid-suite")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_study_suites_are_cached_paired_by_seed_and_resumed(suite_study, monkeypatch):
    import numpy as np

    from stochvit.eval.stats import Scores, compare
    from stochvit.suites import privacy, robustness

    runs = suite_study.parent / "suites" / "runs"
    quiet = lambda *_: None  # noqa: E731
    # jobs = 1: the suites run in this process, where the counters see them (jobs = 2: the test below)
    # killed while writing the second run's robustness report: nothing half-written is left to be mistaken for a result
    with monkeypatch.context() as m:
        _counting(m, robustness, "plot_grid", fail_at=2)
        with pytest.raises(KeyboardInterrupt):
            run(Settings(suite_study, n_boot=200, jobs=1), log=quiet)
    assert len(list(runs.glob("*/study-robustness-*/robustness.json"))) == 1
    first = _mtimes(runs, "*/study-robustness-*/robustness.json")
    with monkeypatch.context() as m:  # restarted: only the three unfinished runs are attacked
        attacked, inverted = _counting(m, robustness, "evaluate_robustness"), _counting(m, privacy, "evaluate_privacy")
        result = run(Settings(suite_study, n_boot=200, jobs=1), log=quiet)
    assert len(attacked) == 3 and len(inverted) == 4
    assert all(_mtimes(runs, "*/study-robustness-*/robustness.json")[p] == t for p, t in first.items())
    cached = _mtimes(runs, "*/study-*/*.json")
    assert len(cached) == 16  # 4 runs x 2 suites x (report + settings.json)
    with monkeypatch.context() as m:  # a finished study only rebuilds its report
        attacked, inverted = _counting(m, robustness, "evaluate_robustness"), _counting(m, privacy, "evaluate_privacy")
        again = run(Settings(suite_study, train=False, n_boot=200, jobs=1), log=quiet)
    assert attacked == [] and inverted == [] and _mtimes(runs, "*/study-*/*.json") == cached
    assert [r.as_dict() for r in again.suites["robustness"]["comparisons"]] == \
        [r.as_dict() for r in result.suites["robustness"]["comparisons"]]

    def per_image(method: str, seed: int, suite: str) -> dict:
        return json.loads(next((runs / f"{method}-seed{seed}").glob(f"study-{suite}-*/{suite}.json")).read_text())

    rows = {(r.method, r.metric): r for r in result.suites["robustness"]["comparisons"]}
    assert set(rows) == {("stochastic", m) for m in ("clean accuracy", "robust accuracy 2/255", "robust accuracy 8/255")}
    for (method, metric), row in rows.items():
        eps = None if metric == "clean accuracy" else metric.split()[-1]
        examples = [[per_image(m, s, "robustness")["per_example"] for s in (0, 1)] for m in (method, "deterministic")]
        sides = [[p["clean"] if eps is None else p["worst_case"][eps] for p in side] for side in examples]
        assert row.difference == pytest.approx(np.mean([np.mean(a) - np.mean(b) for a, b in zip(*sides)]), abs=1e-12)
        direct = compare([Scores.per_image(v) for v in sides[0]], [Scores.per_image(v) for v in sides[1]], metric,
                         higher_is_better=True, n_boot=200)
        assert (row.low, row.high, row.seeds) == (direct.low, direct.high, (2, 2)) and "per-seed paired" in row.interval
    rows = {(r.method, r.metric): r for r in result.suites["privacy"]["comparisons"]}
    assert set(rows) == {(m, f"decoder {k} k=1") for m in ("stochastic", "deterministic + noise 0.5") for k in ("PSNR", "SSIM")}
    row = rows["deterministic + noise 0.5", "decoder PSNR k=1"]
    noisy, clean = ([next(e for e in per_image("deterministic", s, "privacy")["entries"] if e["sigma"] == sigma)
                     ["attacks"]["decoder"]["per_image"]["psnr"] for s in (0, 1)] for sigma in (0.5, 0.0))
    assert row.difference == pytest.approx(np.mean([np.mean(a) - np.mean(b) for a, b in zip(noisy, clean)]), abs=1e-9)
    assert not row.higher_is_better and (row.verdict == "better") == (row.high < 0)  # lower PSNR: leaks less

    out = report(result)
    text = (out / "study.md").read_text()
    assert "## Robustness" in text and "## Privacy" in text and "**Lower is better**" in text
    assert (out / "robustness.png").stat().st_size > 1000 and (out / "privacy.png").stat().st_size > 1000
    saved = json.loads((out / "study.json").read_text())["suites"]
    assert saved["privacy"]["comparisons"][0]["interval"] == result.suites["privacy"]["comparisons"][0].interval


def test_suites_measure_side_by_side_with_jobs(suite_study, tmp_path):
    """jobs = 2: each run's missing report is measured in its own process, two at a time, with a log each; a second
    call finds every report cached and starts nothing."""
    import shutil

    from stochvit.suites.study_runs import measure_missing
    from stochvit.suites.study_suites import cache_folder, cached_report

    spec_path = tmp_path / "suites.toml"
    spec_path.write_text(SUITE_SPEC)
    for run_dir in (suite_study.parent / "suites" / "runs").iterdir():  # the trained runs, without their reports
        shutil.copytree(run_dir, tmp_path / "suites" / "runs" / run_dir.name, ignore=shutil.ignore_patterns("study-*"))
    spec = load_spec(spec_path)
    assert spec.jobs == 2 and spec.path == spec_path
    claim = spec.suites["robustness"]
    walls = measure_missing(spec, claim, log=lambda *_: None)
    assert sorted(walls) == sorted(f"robustness-{m}-seed{s}" for m, s in spec.runs())
    assert all((spec.out / "logs" / f"{name}.log").exists() for name in walls)
    for m, s in spec.runs():
        assert (cache_folder(claim, spec.run_dir(m, s)) / "robustness.json").exists()
        assert cached_report(claim, spec.run_dir(m, s), log=None)["n_examples"] == 16
    assert measure_missing(spec, claim, log=lambda *_: None) == {}


def test_runs_trained_elsewhere_are_compared_and_verdicts_tabled(suite_study, tmp_path):
    """[compare.NAME] pairs run folders by seed (here the trained study's own runs, one seed missing on one side) and
    [[verdicts]] picks rows into verdicts.md, the same numbers as the comparison; a missing comparison says so."""
    from stochvit.suites.compare_runs import RunPredictions, compare_runs

    runs = suite_study.parent / "suites" / "runs"
    spec_path = suite_study.parent / "elsewhere.toml"  # out = the trained study's folder, so its runs are reused
    trained = SUITE_SPEC.split("[robustness]")[0].replace('name = "suites"', 'name = "elsewhere"\nout = "suites"')
    spec_path.write_text(trained + f"""
[compare.trained]
about = "The study's own runs, as if trained by a script."
folder = "{runs}"
seeds = [0, 1, 2]
samples = 2
comparisons = [["stoch", "det"], ["stoch", "nowhere"]]
[compare.trained.runs]
stoch = "stochastic-seed{{seed}}"
det = "deterministic-seed{{seed}}"
nowhere = "missing{{seed_suffix}}"
[[verdicts]]
claim = "the layer keeps accuracy"
regime = "digits, 3 epochs"
from = "compare/trained"
method = "stoch"
baseline = "det"
metric = "accuracy"
[[verdicts]]
claim = "against nothing"
regime = "-"
from = "compare/trained"
method = "stoch"
baseline = "nowhere"
metric = "accuracy"
""")
    result = run(Settings(spec_path, train=False, n_boot=200), log=lambda *_: None)
    rows = result.external["trained"]
    assert [(r.method, r.baseline, r.metric, r.seeds) for r in rows] == \
        [("stoch", "det", m, (2, 2)) for m in ("accuracy", "nll", "ece")]  # seed 2 has no runs: left out
    direct = compare_runs([runs / f"stochastic-seed{s}" for s in (0, 1)], [runs / f"deterministic-seed{s}" for s in (0, 1)],
                          "stoch", "det", RunPredictions(2), n_boot=200)
    assert [r.as_dict() for r in rows] == [r.as_dict() for r in direct]
    assert all((runs / f"{m}-seed{s}" / "test-probs-K2-seed0.safetensors").exists()
               for m in ("stochastic", "deterministic") for s in (0, 1))
    out = report(result, tmp_path / "report")
    table = (out / "verdicts.md").read_text().splitlines()
    acc = rows[0]
    assert table[2] == (f"| the layer keeps accuracy | digits, 3 epochs | 2 vs 2 | {acc.difference:+.3f} [{acc.low:+.3f}, "
                        f"{acc.high:+.3f}] accuracy | {acc.verdict_text()} |")
    assert table[3] == "| against nothing | - | - | - | not measured yet |"
    text = (out / "study.md").read_text()
    assert "## Verdicts" in text and "## Trained (runs trained outside the study)" in text
    assert (out / "compare-trained.png").stat().st_size > 1000


def test_readme_verdict_table_is_the_cifar10_study_report():
    """README's headline table is report/verdicts.md of the CIFAR-10 study, verbatim (rebuilt by the spec)."""
    root = Path(__file__).resolve().parents[1]
    table = (root / "benchmarks" / "studies" / "cifar10" / "report" / "verdicts.md").read_text()
    readme = (root / "README.md").read_text()
    begin, end = "<!-- verdicts: benchmarks/studies/cifar10/report/verdicts.md -->\n", "<!-- /verdicts -->"
    assert begin in readme and end in readme
    assert readme.split(begin, 1)[1].split(end, 1)[0].strip() == table.strip()
