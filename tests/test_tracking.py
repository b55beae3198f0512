"""Tracking and configuration as timm and Lightning users expect (issue 18, section 2): TensorBoard scalars,
model_best.safetensors by a validation metric, `-c/--config FILE.yaml` and the args.yaml every run keeps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml

import stochvit.train as train_module
from stochvit.cli import main
from stochvit.runs import read_metrics
from stochvit.tracking import BEST_FILE, BestCheckpoint
from stochvit.train import TrainConfig, load_checkpoint, train

# 6 epochs of 100 digits without augmentation (5 s): the validation NLL, accuracy and ECE each peak at another epoch
# than the last on this machine, so keeping the last weights would fail the checks below
SMALL = dict(epochs=6, train_limit=100, batch_size=50, eval_samples=2, warmup_epochs=0, lr=3e-3, augment="none")
TRAIN_ARGS = ["train", "--epochs", "2", "--train-limit", "100", "-b", "50", "--samples", "2", "--warmup-epochs", "0",
              "--augment", "none"]


def _recording(monkeypatch, stop_at: int | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Record the timm model's weights at each checkpoint; with `stop_at`, be killed instead of writing that epoch's
    checkpoint (after its metrics row, TensorBoard scalars and model_best were written)."""
    weights: dict[int, dict[str, torch.Tensor]] = {}
    save = train_module.save_checkpoint

    def recording_save(path, model, opt, sched, epoch, best=None):
        if epoch == stop_at:
            raise KeyboardInterrupt
        weights[epoch] = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
        save(path, model, opt, sched, epoch, best)

    monkeypatch.setattr(train_module, "save_checkpoint", recording_save)
    return weights


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> tuple[Path, dict]:
    """The SMALL run with TensorBoard logging, and the weights of each of its epochs."""
    pytest.importorskip("tensorboard", reason='the tensorboard extra: pip install "stochvit[tensorboard]"')
    mp = pytest.MonkeyPatch()
    weights = _recording(mp)
    try:
        path = train(TrainConfig(**SMALL, log="tensorboard"), out=tmp_path_factory.mktemp("tb") / "run", quiet=True)
    finally:
        mp.undo()
    return path, weights


def _scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's rows as TensorBoard stores them: float32 values, step = epoch, train_x -> train/x."""
    rows = read_metrics(path)
    tags = {"train_loss": "train/loss", "train_accuracy": "train/accuracy", "lr": "lr",
            **{f"val_{k}": f"val/{k}" for k in ("accuracy", "nll", "ece", "brier")}}
    return {tag: [(r["epoch"], float(np.float32(r[key]))) for r in rows] for key, tag in tags.items()}


def test_tensorboard_scalars_are_the_metrics_rows(tracked):
    path, _ = tracked
    scalars = _scalars(path)
    for tag, expected in _expected_scalars(path).items():
        assert scalars[tag] == expected, tag
    assert [s for s, _ in scalars["epoch_seconds"]] == list(range(SMALL["epochs"]))


def test_resumed_run_logs_each_epoch_once_and_keeps_its_best(tracked, tmp_path, monkeypatch):
    """Killed after epoch 3's scalars and before its checkpoint: the resumed run trains epoch 3 again, and TensorBoard
    (purge_step) shows it once; the best so far comes back from checkpoint.pt, so model_best matches an unbroken run."""
    reference, _ = tracked
    out = tmp_path / "run"
    _recording(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**SMALL, log="tensorboard"), out=out, quiet=True)
    assert [s for s, _ in _scalars(out)["train/loss"]] == [0, 1, 2, 3]  # epoch 3 logged, its checkpoint not written
    assert load_checkpoint(out)["epoch"] == 2 and "best" in load_checkpoint(out)
    monkeypatch.undo()
    train(resume=out, quiet=True)
    scalars, expected = _scalars(out), _scalars(reference)
    assert scalars.keys() == expected.keys()
    assert all([s for s, _ in scalars[tag]] == list(range(SMALL["epochs"])) for tag in scalars)  # every epoch once
    for tag in _expected_scalars(reference):  # the metrics (not the timings) are bit-exact on CPU
        assert scalars[tag] == expected[tag], tag
    ref, got = (safetensors.torch.load_file(p / BEST_FILE) for p in (reference, out))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    summary = lambda p: json.loads((p / "summary.json").read_text())["best"]  # noqa: E731
    assert summary(out) == summary(reference)


@pytest.mark.parametrize("metric, pick", [("nll", np.argmin), ("accuracy", np.argmax)])
def test_model_best_holds_the_epoch_with_the_best_validation(metric, pick, tracked, tmp_path, monkeypatch):
    if metric == "nll":
        path, weights = tracked
    else:
        weights = _recording(monkeypatch)
        path = train(TrainConfig(**SMALL, eval_metric=metric), out=tmp_path / "run", quiet=True)
    rows = read_metrics(path)
    values = [r[f"val_{metric}"] for r in rows]
    best = int(pick(values))  # the first of ties, as BestCheckpoint keeps the earlier epoch
    stored = safetensors.torch.load_file(path / BEST_FILE)
    assert stored.keys() == weights[best].keys() and all(torch.equal(stored[k], weights[best][k]) for k in stored)
    with safetensors.safe_open(path / BEST_FILE, "pt") as f:
        assert f.metadata()["epoch"] == str(best)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["best"]["epoch"] == best and summary["best"]["value"] == values[best]
    assert summary["best"]["metric"] == f"val_{metric}" and summary["best"]["val"][metric] == values[best]
    assert summary["metrics_for"].startswith(f"test and val: model.safetensors, the final weights (epoch {len(rows) - 1})")
    mode = "min" if metric == "nll" else "max"
    assert (f"`model_best.safetensors` holds epoch {best} (counting from 0), the best val_{metric} ({values[best]:.4f}; "
            f"{mode}imum over the validated epochs from 0)") in (path / "README.md").read_text()


def test_best_checkpoint_direction_ties_and_restore(tmp_path):
    model = torch.nn.Linear(2, 2)
    for metric, seq, expected in (("nll", [2.0, 1.5, 1.7, 1.5, 1.6], 1), ("ece", [0.1, 0.2, 0.05, 0.05], 2),
                                  ("accuracy", [0.5, 0.7, 0.6, 0.7], 1)):
        best = BestCheckpoint(metric)
        for epoch, v in enumerate(seq):
            best.update(tmp_path, model, epoch, {metric: v})
        assert (best.epoch, best.value) == (expected, seq[expected])
        assert BestCheckpoint.restore(best.state(), metric, 9) == best
    # an older checkpoint (no record) or another metric: candidates from the resumed epoch on
    assert BestCheckpoint.restore(None, "nll", 4) == BestCheckpoint("nll", since=4)
    assert BestCheckpoint.restore(best.state(), "nll", 4) == BestCheckpoint("nll", since=4)


def test_checkpoint_without_a_best_record_still_resumes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = dict(SMALL, epochs=2)
    _recording(monkeypatch, stop_at=1)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**cfg), out=out, quiet=True)
    monkeypatch.undo()
    ckpt = load_checkpoint(out)
    del ckpt["best"]  # as written before stochvit kept a best checkpoint
    torch.save(ckpt, out / "checkpoint.pt")
    train(resume=out, quiet=True)
    best = json.loads((out / "summary.json").read_text())["best"]
    assert (best["epoch"], best["since_epoch"]) == (1, 1) and (out / BEST_FILE).is_file()


def test_log_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    out = tmp_path / "run"
    assert main([*TRAIN_ARGS, "--log", "tensorboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['stochvit train: error: the TensorBoard logger needs the tensorboard package: '
                   'pip install "stochvit[tensorboard]"']
    assert not out.exists()


# -- --config FILE.yaml and args.yaml --------------------------------------------------------------------------------

def test_args_yaml_reproduces_the_run(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main([*TRAIN_ARGS, "--lr", "2e-3", "--blocks", "0,1", "--adv", "fgsm-rs", "--adv-eps", "2/255",
                 "--out", str(first)]) == 0
    args = yaml.safe_load((first / "args.yaml").read_text())
    assert args["blocks"] == [0, 1] and args["lr"] == 2e-3 and args["out"] == str(first) and "config" not in args
    assert main(["train", "--config", str(first / "args.yaml"), "--out", str(second)]) == 0
    configs = [json.loads((p / "config.json").read_text()) for p in (first, second)]
    assert configs[0]["train"] == configs[1]["train"] and configs[0] == configs[1]
    assert yaml.safe_load((second / "args.yaml").read_text()) == {**args, "out": str(second)}


def test_command_line_flags_override_the_file(tmp_path):
    from stochvit.cli import build_parser
    from stochvit.cli.common import parse_args

    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nbatch-size: 32\nkind: full\nblocks: [1, 2]\nadv_eps: 4/255\nstochastic: false\n"
                 "eval-samples: 6\n")  # an old spelling, as on the command line
    a = parse_args(build_parser(), ["train", "-c", str(f), "--epochs", "3"])
    assert (a.epochs, a.batch_size, a.kind, a.blocks, a.adv_eps, a.stochastic) == (3, 32, "full", [1, 2], 4 / 255, False)
    assert a.samples == 6
    assert parse_args(build_parser(), ["train", "--epochs", "3"]).batch_size is None  # the file changed nothing else
    f.write_text("run_dirs: [a, b]\nsamples: 3\n")  # a required positional may come from the file
    a = parse_args(build_parser(), ["calibration", "-c", str(f), "--samples", "5"])
    assert (a.run_dirs, a.samples) == (["a", "b"], 5)


@pytest.mark.parametrize("text, message", [
    ("epochs: 2\nbatch_sise: 3\n", "unknown setting 'batch_sise'; did you mean 'batch_size'?"),
    ("epochs: [2\n", "is not valid YAML (expected ',' or ']', but got '<stream end>' at line 2, column 1)"),
    ("epochs: 1.5\n", "epochs: invalid int value: '1.5'"),
    ("kind: bogus\n", "kind: invalid choice: 'bogus' (choose from 'diagonal', 'full')"),
    ("- epochs\n", "must be a mapping of settings (key: value), not a list"),
])
def test_bad_config_files_are_one_line_and_exit_2(text, message, tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    out = tmp_path / "run"
    assert main(["train", "-c", str(f), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"stochvit train: error: --config {f}") and err[0].endswith(message)
    assert not out.exists()
