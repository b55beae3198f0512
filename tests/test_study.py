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
    ("[methods.a]\n[calibration]\ncomparisons = [['a', 'b']]\n", "unknown method"),
    ("[methods.a\n", "not valid TOML"),
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
