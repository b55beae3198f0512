"""Training: resume after SIGKILL is bit-identical, NaN loss stops cleanly, run directories are complete and safe."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stochvit.cli import main
from stochvit.errors import UserError
from stochvit.runs import load_run
from stochvit.suites.evaluate import evaluate
from stochvit.train import TrainConfig, _lr_lambda, train

RUN_FILES = ("config.json", "model.safetensors", "checkpoint.pt", "metrics.jsonl", "summary.json", "curves.png")


# a training in its own process, SIGKILLed right after optimiser step N through train()'s on_step hook
KILLED_TRAINING = """
import json, os, signal, sys
from stochvit.train import TrainConfig, train
settings, out, kill_at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
train(TrainConfig(**settings), out=out, quiet=True,
      on_step=lambda step: step == kill_at and os.kill(os.getpid(), signal.SIGKILL))
"""


def killed_training(settings: dict, out: Path, kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLED_TRAINING, json.dumps(settings), str(out), str(kill_at)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


def error_line(err: str, command: str = "train") -> str:
    """The CLI's message: exactly one line `stochvit <command>: error: ...`, last on stderr, and no traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in err
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith(f"stochvit {command}: error: "), err
    return errors[0]


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch_ends_with_identical_weights(tmp_path, capsys):
    # 200 training images at batch 50: 4 steps per epoch; global step 7 is inside the second epoch
    args = ["train", "--epochs", "3", "--train-limit", "200", "--batch-size", "50", "--eval-samples", "1", "--seed", "7"]
    full = tmp_path / "full"
    assert main([*args, "--out", str(full)]) == 0

    run = tmp_path / "killed"  # the same settings (the full run's, as the command line resolved them), killed at step 7
    killed = killed_training(json.loads((full / "config.json").read_text())["train"], run, kill_at=7)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "summary.json").exists() and not (run / "model.safetensors").exists()
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [0]
    epoch0 = torch.load(run / "checkpoint.pt", weights_only=True)
    assert epoch0["epoch"] == 0

    assert main(["train", "--resume", str(run)]) == 0
    assert (full / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes(), "resumed weights differ"
    rows = [[json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, run)]
    assert [r["epoch"] for r in rows[1]] == [0, 1, 2]
    for key in ("train_loss", "train_accuracy", "val_nll", "lr"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key
    summaries = [json.loads((d / "summary.json").read_text()) for d in (full, run)]
    assert summaries[0]["test"] == summaries[1]["test"]
    # the resumed run really trained on: its final weights moved away from the epoch-0 checkpoint it started from
    final = load_file(str(run / "model.safetensors"))
    assert not torch.equal(final["blocks.0.mlp.fc1.weight"], epoch0["model"]["net.blocks.0.mlp.fc1.weight"])


def test_nan_loss_exits_2_and_leaves_no_finished_run(tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(["train", "--lr", "1e30", "--epochs", "2", "--train-limit", "100", "--eval-samples", "1", "--out", str(out)])
    line = error_line(capsys.readouterr().err)
    assert code == 2
    assert "loss became nan" in line and "--lr" in line, line
    assert not out.exists(), "a run that failed before its first checkpoint removes what it wrote"
    with pytest.raises(UserError, match="does not exist"):
        load_run(out)


@pytest.mark.parametrize("kind", ["deterministic", "stochastic"])
def test_run_directory_is_complete_and_rebuilds_the_model(digits_runs, kind):
    run = digits_runs[kind]
    for name in RUN_FILES:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert not list(run.glob(".*.tmp")), "no temporary files left behind"
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run / "config.json").read_text())
    assert {"model", "stochastic", "data", "train", "versions"} <= set(config)
    assert (config["stochastic"] is None) == (kind == "deterministic")
    assert config["versions"]["torch"] == torch.__version__
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(config["train"]["epochs"]))
    assert all(math.isfinite(r["train_loss"]) for r in rows) and rows[-1]["train_loss"] < rows[0]["train_loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.8  # chance is 0.1; the fixture trains the digits recipe for 20 epochs (~0.94)
    assert summary["test"]["samples"] == (1 if kind == "deterministic" else 4)

    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)  # no code can run
    assert ckpt["epoch"] == config["train"]["epochs"] - 1
    weights = load_file(str(run / "model.safetensors"))
    assert weights.keys() == {k.removeprefix("net.") for k in ckpt["model"]}
    assert all(torch.equal(weights[k], ckpt["model"][f"net.{k}"]) for k in weights), "final weights = last checkpoint"

    loaded = load_run(run)
    assert not loaded.model.training
    assert all(torch.equal(v, weights[k]) for k, v in loaded.model.net.state_dict().items())


def test_deterministic_run_reevaluates_to_its_summary(digits_runs):
    run = load_run(digits_runs["deterministic"])
    result = evaluate(run, samples=3)
    assert result["samples"] == 1
    assert result["single_pass"]["accuracy"]["mean"] == run.summary["test_accuracy"]


def test_checkpoints_load_without_executing_code(digits_runs, tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(digits_runs["deterministic"] / "config.json", run)
    torch.save(dict(model=Payload()), run / "checkpoint.pt")
    with pytest.raises(UserError, match="checkpoint.pt"):
        train(resume=run, quiet=True)
    assert not marker.exists()
    good = (digits_runs["deterministic"] / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(good[: len(good) // 3])
    with pytest.raises(UserError, match="checkpoint.pt"):
        train(resume=run, quiet=True)


def test_resume_refuses_finished_and_missing_runs(digits_runs, tmp_path):
    with pytest.raises(UserError, match="already finished"):
        train(resume=digits_runs["stochastic"])
    with pytest.raises(UserError, match="not a run directory"):
        train(resume=tmp_path / "nothing-here")


@pytest.mark.parametrize("overrides,name", [  # the library names its parameters; the CLI turns them into flags
    (dict(epochs=0), "epochs=0"), (dict(lr=-1.0), "lr=-1.0"), (dict(batch_size=0), "batch_size=0"),
    (dict(stochastic=dict(low=2.0, high=1.0)), "low"), (dict(stochastic=dict(kind="full", sharing="token")), "sharing"),
    (dict(mc_dropout=True), "drop_rate"),
])
def test_invalid_training_settings_are_user_errors(tmp_path, overrides, name):
    with pytest.raises(UserError, match=name) as refused:
        train(TrainConfig(**overrides), out=tmp_path / "run")
    assert "--" not in str(refused.value)
    assert not (tmp_path / "run").exists()


def test_non_empty_out_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        train(TrainConfig(epochs=1), out=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


RECIPE_FIELDS = ("model", "epochs", "batch_size", "lr")


def test_recipes_resolve_by_data_and_explicit_values_win():
    from stochvit.defaults import RECIPES

    def recipe(cfg: TrainConfig) -> tuple:
        return tuple(getattr(cfg, k) for k in RECIPE_FIELDS)

    assert recipe(TrainConfig(data="cifar10").resolved()) == ("vit_tiny_patch4_32", 10, 128, 1e-3)
    assert recipe(TrainConfig().resolved()) == ("vit_digits_convstem_8", 60, 32, 3e-3 / 2**0.5)
    assert recipe(TrainConfig(data="digits:classes=5-9").resolved()) == recipe(TrainConfig().resolved())  # the parent's
    assert recipe(TrainConfig(data="imagefolder:/x:classes=0-1").resolved()) == tuple(RECIPES["default"][k]
                                                                                     for k in RECIPE_FIELDS)
    explicit = TrainConfig(data="cifar10", model="vit_small_patch4_32", epochs=3, lr=5e-4)
    assert recipe(explicit.resolved()) == ("vit_small_patch4_32", 3, 128, 5e-4)
    assert explicit.model == "vit_small_patch4_32" and explicit.batch_size is None  # resolved() returns a copy
    explicit.validate()  # validation resolves in place: what a run's config.json records
    assert recipe(explicit) == ("vit_small_patch4_32", 3, 128, 5e-4)


@pytest.mark.parametrize("data", ["digits", "cifar10", "svhn:classes=0-4", "imagefolder:/x"])
def test_the_command_line_and_python_resolve_the_same_config(data):
    from stochvit.cli import build_parser
    from stochvit.cli.train import train_config_from_args

    cli = train_config_from_args(build_parser().parse_args(["train", "--data", data]))
    python = TrainConfig(data=data)
    cli.validate()
    python.validate()
    assert cli == python
    assert None not in (getattr(cli, k) for k in RECIPE_FIELDS)


def test_schedule_warms_up_linearly_then_follows_a_cosine():
    f = _lr_lambda(total_steps=100, warmup_steps=10)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))
    assert _lr_lambda(50, 0)(0) == pytest.approx(1.0)


def test_ddp_on_cpu_with_torchrun(tmp_path):
    """`torchrun -m stochvit train` runs two gloo processes; rank 0 alone writes one finished run and reports it."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "stochvit", "train", "--data", "digits", "--epochs", "1", "--train-limit", "256",
                           "--eval-samples", "2", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("test accuracy") == 1
    run = load_run(out)
    assert run.config["train"]["train_limit"] == 256
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "summary.json").exists() and (out / "model.safetensors").exists()


def test_val_every_validates_on_schedule_and_after_the_last_epoch(tmp_path):
    out = tmp_path / "sparse"
    assert main(["train", "--epochs", "3", "--val-every", "2", "--train-limit", "100", "--eval-samples", "1",
                 "--out", str(out)]) == 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [("val_nll" in r) for r in rows] == [False, True, True]
    assert (out / "curves.png").stat().st_size > 0
    assert main(["train", "--val-every", "0", "--out", str(tmp_path / "bad")]) == 2
