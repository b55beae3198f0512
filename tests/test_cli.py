"""The `stochvit` command end to end on digits: train, evaluate, --help, and bad inputs (exit 2, one line, no traceback)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision.io import encode_png, write_file

from stochvit.cli import build_parser, main
from stochvit.models import create_model

QUICK = ["--epochs", "2", "--train-limit", "200", "--batch-size", "50", "--eval-samples", "2"]


def error_line(err: str, command: str) -> str:
    """The CLI's message: exactly one line `stochvit <command>: error: ...`, last on stderr, and no traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert "Traceback" not in err
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith(f"stochvit {command}: error: "), err
    return errors[0]


def fails(capsys, argv: list[str], *fragments: str) -> str:
    """Run the CLI in-process and check it exits 2 with one clear line containing every fragment."""
    code = main(argv)
    line = error_line(capsys.readouterr().err, argv[0])
    assert code == 2, line
    for f in fragments:
        assert f in line, (f, line)
    return line


@pytest.fixture
def run_copy(digits_runs, tmp_path):
    """A private copy of the stochastic digits run, free to be evaluated into or broken."""
    return Path(shutil.copytree(digits_runs["stochastic"], tmp_path / "run"))


def rgb_folder(root: Path, size: int = 32, per_class: int = 10) -> Path:
    g = torch.Generator().manual_seed(0)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            write_file(str(root / f"class{c}" / f"{i}.png"), encode_png(torch.randint(0, 256, (3, size, size), dtype=torch.uint8,
                                                                                      generator=g)))
    return root


# -- help ---------------------------------------------------------------------------------------


def subcommands() -> list[str]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(action.choices)


def test_every_subcommand_has_help(capsys):
    names = subcommands()
    assert {"train", "evaluate"} <= set(names)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    for name in names:
        assert name in top
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: stochvit {name}"), out[:200]
        assert len(out.splitlines()) > 3, f"{name} --help says almost nothing"
    train_help = main_help("train", capsys)
    for flag in ("--data", "--model", "--stochastic", "--no-stochastic", "--kind", "--distribution", "--low", "--high",
                 "--sharing", "--position", "--epochs", "--batch-size", "--lr", "--seed", "--out", "--resume", "--precision"):
        assert flag in train_help, flag
    assert "--samples" in main_help("evaluate", capsys) and "--mode" in main_help("evaluate", capsys)


def main_help(name: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([name, "--help"])
    return capsys.readouterr().out


# -- end to end -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_end_to_end_through_the_installed_command(tmp_path):
    exe = shutil.which("stochvit")
    command = [exe] if exe else [sys.executable, "-m", "stochvit.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, "train", *QUICK, "--out", "run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "run: run" in done.stdout and "test accuracy" in done.stdout
    for name in ("config.json", "model.safetensors", "checkpoint.pt", "metrics.jsonl", "summary.json", "curves.png"):
        assert (tmp_path / "run" / name).is_file(), name
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert f"{summary['test_accuracy']:.4f}" in done.stdout
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["epochs"] == 2 and config["train"]["train_limit"] == 200
    assert config["stochastic"]["kind"] == "diagonal" and config["stochastic"]["sharing"] == "image"


def test_train_flags_reach_the_run_config(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "1", "--train-limit", "100", "--eval-samples", "1", "--kind", "full", "--distribution",
            "orthogonal", "--position", "output", "--blocks", "0,2", "--act", "relu", "--seed", "3", "--fused", "--out", str(out)]
    assert main(argv) == 0
    assert "test accuracy" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["stochastic"] == dict(kind="full", distribution="orthogonal", low=0.5, high=1.5, sharing="image",
                                        position="output", blocks=[0, 2])
    assert config["model"]["kwargs"]["act_layer"] == "relu" and config["train"]["seed"] == 3 and config["train"]["fused"]
    from stochvit.runs import load_run

    net = load_run(out).model.net
    kinds = [getattr(getattr(b.mlp, "stochastic", None), "kind", None) for b in net.blocks]
    assert kinds == ["full", None, "full", None]


@pytest.mark.parametrize("kind", ["stochastic", "deterministic"])
def test_evaluate_writes_json_and_prints_a_table(digits_runs, tmp_path, capsys, kind):
    run = Path(shutil.copytree(digits_runs[kind], tmp_path / "run"))
    assert main(["evaluate", str(run), "--samples", "3"]) == 0
    out = capsys.readouterr().out
    k = 3 if kind == "stochastic" else 1  # a deterministic model is evaluated with one pass
    path = run / f"eval-digits-test-on-k{k}-seed0.json"
    assert path.is_file() and str(path) in out
    result = json.loads(path.read_text())
    assert result["samples"] == k and result["data"] == "digits" and result["split"] == "test"
    for metric in ("accuracy", "nll", "brier", "ece"):
        assert metric in out
        single, avg = result["single_pass"][metric], result["mc_average"][metric]
        assert 0 <= single["mean"] and 0 <= avg and single["std"] >= 0
        if metric in ("accuracy", "ece"):
            assert single["mean"] <= 1 and avg <= 1
    assert result["mc_average"]["accuracy"] > 0.2  # chance is 0.1
    if kind == "deterministic":
        assert result["single_pass"]["accuracy"]["std"] == 0
        assert result["mc_average"]["accuracy"] == result["single_pass"]["accuracy"]["mean"]


def test_evaluate_modes_and_val_split(run_copy, capsys):
    assert main(["evaluate", str(run_copy), "--samples", "4", "--mode", "mean", "--split", "val"]) == 0
    mean = json.loads((run_copy / "eval-digits-val-mean-k1-seed0.json").read_text())
    assert mean["samples"] == 1 and mean["mode"] == "mean" and mean["split"] == "val"
    assert main(["evaluate", str(run_copy), "--samples", "4", "--mode", "off"]) == 0
    off = json.loads((run_copy / "eval-digits-test-off-k1-seed0.json").read_text())
    assert off["samples"] == 1 and off["single_pass"]["accuracy"]["std"] == 0


# -- bad inputs: exit 2, one line, no traceback -----------------------------------------------------


def test_missing_data_path(tmp_path, capsys):
    fails(capsys, ["train", *QUICK, "--data", f"imagefolder:{tmp_path / 'nowhere'}", "--out", str(tmp_path / "r")],
          "does not exist")
    assert not (tmp_path / "r").exists()


def test_unknown_dataset(tmp_path, capsys):
    fails(capsys, ["train", *QUICK, "--data", "imagenet-22k", "--out", str(tmp_path / "r")], "unknown dataset", "imagenet-22k")
    assert not (tmp_path / "r").exists()


def test_low_above_high(tmp_path, capsys):
    fails(capsys, ["train", *QUICK, "--low", "2", "--high", "1", "--out", str(tmp_path / "r")], "low=2.0")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag", ["--epochs", "--batch-size", "--lr"])
def test_zero_is_refused_not_replaced_by_the_recipe_default(tmp_path, capsys, flag):
    fails(capsys, ["train", flag, "0", "--out", str(tmp_path / "r")], f"invalid {flag}=0")
    assert not (tmp_path / "r").exists()


def test_other_invalid_layer_settings(tmp_path, capsys):
    fails(capsys, ["train", *QUICK, "--kind", "full", "--sharing", "token", "--out", str(tmp_path / "a")], "sharing")
    fails(capsys, ["train", *QUICK, "--kind", "full", "--distribution", "bernoulli", "--out", str(tmp_path / "b")],
          "distribution")
    fails(capsys, ["train", *QUICK, "--blocks", "0,9", "--out", str(tmp_path / "c")], "blocks")


def test_wrong_channels_for_the_model(run_copy, tmp_path, capsys):
    folder = rgb_folder(tmp_path / "rgb32")
    fails(capsys, ["evaluate", str(run_copy), "--data", f"imagefolder:{folder}", "--samples", "1"], "channels 3", "expects 1")
    assert not list(run_copy.glob("eval-*.json"))


def test_images_smaller_than_a_patch(tmp_path, capsys):
    folder = rgb_folder(tmp_path / "rgb2", size=2)
    fails(capsys, ["train", "--data", f"imagefolder:{folder}", "--model", "vit_tiny_patch4_32", "--out", str(tmp_path / "r")],
          "smaller than", "patches")
    assert not (tmp_path / "r").exists()


def test_truncated_checkpoint(run_copy, capsys):
    weights = run_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    fails(capsys, ["evaluate", str(run_copy)], "cannot read weights")


def test_checkpoint_from_another_architecture(run_copy, capsys):
    other = create_model("vit_tiny_patch4_32", stochastic=False)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(run_copy / "model.safetensors"))
    fails(capsys, ["evaluate", str(run_copy)], "do not fit the model")


def test_non_empty_out(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    fails(capsys, ["train", *QUICK, "--out", str(tmp_path)], "not empty", "--resume")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_config_that_is_not_json(run_copy, capsys):
    (run_copy / "config.json").write_text("{ this is not json")
    fails(capsys, ["evaluate", str(run_copy)], "config.json", "not valid JSON")


def test_run_directory_problems(run_copy, tmp_path, capsys):
    fails(capsys, ["evaluate", str(tmp_path / "no-run")], "does not exist")
    fails(capsys, ["evaluate", str(run_copy), "--samples", "0"], "--samples")
    fails(capsys, ["train", "--resume", str(run_copy)], "already finished")
    (run_copy / "summary.json").unlink()
    fails(capsys, ["evaluate", str(run_copy)], "did not finish", "--resume")


def test_bad_input_through_a_real_process(tmp_path):
    """The same contract outside pytest: stderr holds one line and the exit status is 2."""
    done = subprocess.run([sys.executable, "-m", "stochvit.cli", "train", "--data", "nope", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stochvit train: error: unknown dataset 'nope'; expected digits"), lines
    assert not (tmp_path / "r").exists()


def test_init_weights_start_training_from_a_run(run_copy, tmp_path, capsys):
    """`--init-weights RUN_DIR` starts from that run's weights: at a vanishing learning rate they come back unchanged."""
    from safetensors.torch import load_file

    out = tmp_path / "finetuned"
    assert main(["train", *QUICK, "--epochs", "1", "--lr", "1e-12", "--init-weights", str(run_copy), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["init_weights"] == str(run_copy / "model.safetensors")
    before, after = load_file(str(run_copy / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        if "running_" in k or "num_batches_tracked" in k:  # the stem's BatchNorm statistics move in training at any lr
            continue
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-6)


def test_init_weights_that_do_not_fit(tmp_path, capsys):
    other = create_model("vit_tiny_patch4_32", stochastic=False)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    fails(capsys, ["train", *QUICK, "--init-weights", str(weights), "--out", str(tmp_path / "r")], "do not fit the model")
    assert not (tmp_path / "r").exists()
    fails(capsys, ["train", *QUICK, "--init-weights", str(tmp_path / "nope"), "--out", str(tmp_path / "r")],
          "--init-weights", "no such run directory")
