"""Issue 17 (reliability): no silent wrong results, no tracebacks for user mistakes, no half-written runs."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_png, write_file

from stochvit.cli import main
from stochvit.data import load_data
from stochvit.errors import UserError
from stochvit.runs import atomic_write_bytes, run_lock
from stochvit.train import TrainConfig, train


def _keys(images: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in images}


def make_folder(root: Path, classes: dict[str, int], size: int = 8, seed: int = 0) -> Path:
    """Class folders of random PNGs; each image differs, so its bytes identify it across splits."""
    g = torch.Generator().manual_seed(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
            write_file(str(root / name / f"{i:03d}.png"), encode_png(img))
    return root


# --- symlinked folders and duplicated files -------------------------------------------------------------------


def test_symlink_loop_is_not_followed_and_splits_stay_disjoint(tmp_path, capsys):
    """The issue's exact case: 24 images in T/a, T/b and `ln -s .. T/a/up` once gave 984 samples."""
    root = make_folder(tmp_path / "T", {"a": 12, "b": 12})
    os.symlink("..", root / "a" / "up")
    data = load_data(f"imagefolder:{root}")
    assert sum(data.describe()["sizes"].values()) == 24
    assert data.class_names == ["a", "b"]
    keys = [_keys(getattr(data, s).images) for s in ("train", "val", "test")]
    assert sum(len(k) for k in keys) == 24, "every image once"
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    err = capsys.readouterr().err
    assert "not following 1 symlinked folder" in err and "up" in err


@pytest.mark.parametrize("how", ["symlinked_file", "hard_link", "class_linked_to_class", "same_file_in_two_splits"])
def test_a_file_reached_twice_is_refused(tmp_path, how):
    if how == "same_file_in_two_splits":
        make_folder(tmp_path / "train", {"a": 12, "b": 12})
        make_folder(tmp_path / "test", {"a": 2, "b": 2}, seed=1)
        os.link(tmp_path / "train" / "a" / "000.png", tmp_path / "test" / "a" / "dup.png")
        root, dup = tmp_path, "dup.png"
    else:
        root = make_folder(tmp_path / "T", {"a": 12, "b": 12})
        if how == "symlinked_file":
            os.symlink(root / "a" / "000.png", root / "b" / "zzz.png")
            dup = "zzz.png"
        elif how == "hard_link":
            os.link(root / "a" / "000.png", root / "b" / "zzz.png")
            dup = "zzz.png"
        else:
            os.symlink("a", root / "c")  # a top-level class folder that is a link to another class
            dup = "c"
    with pytest.raises(UserError, match=f"{dup}.* is the same file as .*remove the duplicate"):
        load_data(f"imagefolder:{root}")


# --- class indices of val/ and test/ come from train/ ---------------------------------------------------------


def test_val_lacking_a_class_keeps_the_train_folders_labels(tmp_path):
    """S/train/{a,b,c} with S/val/{a,c}: the val images of c were labelled b."""
    make_folder(tmp_path / "train", {"a": 10, "b": 10, "c": 10}, seed=0)
    make_folder(tmp_path / "val", {"a": 3, "c": 4}, seed=1)
    make_folder(tmp_path / "test", {"c": 2}, seed=2)
    data = load_data(f"imagefolder:{tmp_path}")
    assert data.class_names == ["a", "b", "c"]
    assert sorted(data.val.labels.tolist()) == [0] * 3 + [2] * 4
    assert data.test.labels.tolist() == [2, 2]
    # each val image of c carries c's label: match the decoded images to the files of val/c
    c_files = {tmp_path / "val" / "c" / f"{i:03d}.png" for i in range(4)}
    from torchvision.io import decode_image
    c_keys = {decode_image(str(f)).numpy().tobytes() for f in c_files}
    assert {img.numpy().tobytes() for img, y in zip(data.val.images, data.val.labels) if y == 2} == c_keys


@pytest.mark.parametrize("split", ["val", "test"])
def test_split_with_a_class_train_lacks_is_refused_before_decoding(tmp_path, split, monkeypatch):
    make_folder(tmp_path / "train", {"a": 10, "b": 10})
    make_folder(tmp_path / split, {"a": 2, "b": 2, "zebra": 2}, seed=1)
    import stochvit.data

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded images before checking the class folders")

    monkeypatch.setattr(stochvit.data, "_decode_folder", no_decoding)
    with pytest.raises(UserError, match=f"{split} has class folder.*zebra.*train"):
        load_data(f"imagefolder:{tmp_path}")


def test_val_or_test_without_train_is_refused(tmp_path):
    make_folder(tmp_path, {"a": 10, "b": 10})
    make_folder(tmp_path / "test", {"a": 2, "b": 2}, seed=1)
    with pytest.raises(UserError, match="no train/ folder"):
        load_data(f"imagefolder:{tmp_path}")


# --- one writer per run directory -----------------------------------------------------------------------------

QUICK = dict(epochs=1, train_limit=100, batch_size=50, eval_samples=1, warmup_epochs=0.5)


def _resumable_run(path: Path) -> Path:
    """A finished 1-epoch run made resumable again: its checkpoint is there, its summary is not."""
    train(TrainConfig(**QUICK), out=path, quiet=True)
    (path / "summary.json").unlink()
    return path


def test_a_second_writer_is_refused_while_the_lock_is_held(tmp_path):
    out = tmp_path / "run"
    with run_lock(out):
        with pytest.raises(UserError, match="in use by another stochvit process"):
            train(TrainConfig(**QUICK), out=out, quiet=True)
        assert [p.name for p in out.iterdir()] == [".lock"], "the refused run wrote nothing"
    assert (train(TrainConfig(**QUICK), out=out, quiet=True) / "summary.json").exists()  # free again


def test_resume_is_refused_while_locked_and_a_killed_holders_lock_does_not_block(tmp_path):
    run = _resumable_run(tmp_path / "run")
    with run_lock(run):
        with pytest.raises(UserError, match="in use"):
            train(resume=run, quiet=True)
    assert not (run / "summary.json").exists()
    # a process that took the lock and was SIGKILLed: its .lock stays, but the kernel released the flock
    code = ("import os, signal, sys; from stochvit.runs import run_lock\n"
            "with run_lock(sys.argv[1]):\n    os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(run)], timeout=120)
    assert proc.returncode == -signal.SIGKILL and (run / ".lock").exists()
    assert (train(resume=run, quiet=True) / "summary.json").exists()


def test_lock_is_released_after_an_error_inside(tmp_path):
    with pytest.raises(RuntimeError), run_lock(tmp_path):
        raise RuntimeError("boom")
    with run_lock(tmp_path):
        pass


# --- nothing half-written ---------------------------------------------------------------------------------------


def test_nan_loss_in_the_first_epoch_removes_the_run(tmp_path, capsys):
    out = tmp_path / "nan"
    args = ["train", "--lr", "1e30", "--epochs", "2", "--train-limit", "100", "--eval-samples", "1"]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "loss became nan at epoch 1" in err and "run directory was removed" in err, err
    assert not out.exists()
    given = tmp_path / "given"  # an empty --out the user made stays, empty
    given.mkdir()
    assert main([*args, "--out", str(given)]) == 2
    assert given.is_dir() and not list(given.iterdir())


def test_a_failure_after_the_first_checkpoint_stays_resumable(tmp_path, monkeypatch, capsys):
    real = torch.nn.CrossEntropyLoss
    steps = {"n": 0}

    class NanAfterTwoSteps(real):
        def forward(self, logits, y):
            steps["n"] += 1
            loss = super().forward(logits, y)
            return loss * float("nan") if steps["n"] > 2 else loss

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", NanAfterTwoSteps)
    out = tmp_path / "run"
    cfg = dict(epochs=2, train_limit=100, batch_size=50, eval_samples=1)  # 2 steps per epoch: NaN in epoch 2
    with pytest.raises(UserError, match="epoch 2.*stays resumable"):
        train(TrainConfig(**cfg), out=out, quiet=True)
    assert {"config.json", "metrics.jsonl", "checkpoint.pt"} <= {p.name for p in out.iterdir()}
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", real)
    assert json.loads((train(resume=out, quiet=True) / "summary.json").read_text())["epochs"] == 2


def test_a_failed_atomic_write_removes_its_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    real = Path.write_bytes

    def disk_full(self, data):
        real(self, data[:3])  # half written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(UserError, match="cannot write .*checkpoint.pt: No space left on device"):
        atomic_write_bytes(target, b"new contents")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert target.read_bytes() == b"old"


# --- flags refused before anything is written ------------------------------------------------------------------


@pytest.mark.parametrize("flags,named", [
    (["--weight-decay", "-1"], "--weight-decay=-1.0: must be a finite number >= 0"),
    (["--weight-decay", "nan"], "--weight-decay=nan: must be a finite number >= 0"),
    (["--seed", "-1"], "--seed=-1: must be an integer >= 0"),
    (["--seed", str(2**32)], "--seed=4294967296: must be an integer >= 0 and < 2**32"),
    (["--workers", "-1"], "--workers=-1: must be an integer >= 0"),
    (["--img-size", "-5"], "--img-size=-5: must be an integer >= 1"),
    (["--low=-1e308", "--high", "1e308"], "low=-1e+308: must be a finite number within"),
    (["--high", "inf"], "high=inf: must be a finite number"),
    (["--split-seed", "-1"], "--split-seed=-1: must be an integer >= 0"),
    (["--train-limit", "0"], "--train-limit=0: must be an integer >= 1"),
    (["--lr", "inf"], "--lr=inf: must be a finite number > 0"),
    (["--clip-grad", "-1"], "--clip-grad=-1.0: must be a finite number > 0"),
    (["--adv", "pgd", "--adv-steps", "-1", "--warmup-epochs", "0.5"], "--adv-steps=-1: must be an integer >= 1"),
    (["--adv", "pgd", "--adv-eps", "0", "--warmup-epochs", "0.5"], "--adv-eps=0.0: must be a number in (0, 1]"),
    (["--adv", "fgsm-rs", "--adv-eps", "2", "--warmup-epochs", "0.5"], "--adv-eps=2.0: must be a number in (0, 1]"),
    (["--model", "vit_tiny_patch4_32", "--kind", "full", "--distribution", "orthogonal", "--warmup-epochs", "0.5"],
     "distribution='orthogonal' at width 768 is refused for training on a CPU"),
])
def test_bad_flags_are_refused_naming_the_flag_and_nothing_is_written(tmp_path, capsys, flags, named):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--train-limit", "100", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert not out.exists()


def test_orthogonal_widths_up_to_the_limit_train_on_a_cpu():
    from stochvit.models import create_model
    from stochvit.train import ORTHOGONAL_CPU_MAX_WIDTH, check_trainable_width

    orthogonal = dict(kind="full", distribution="orthogonal")
    digits = create_model("vit_digits_patch2_8", stochastic=orthogonal)  # MLP width 256: the limit itself
    check_trainable_width(digits, torch.device("cpu"))
    check_trainable_width(create_model("vit_tiny_patch4_32", stochastic=dict(orthogonal, position="output")),
                          torch.device("cpu"))  # width 192
    wide = create_model("vit_tiny_patch4_32", stochastic=orthogonal)
    with pytest.raises(UserError, match=f"width 768 .* widths up to {ORTHOGONAL_CPU_MAX_WIDTH} train"):
        check_trainable_width(wide, torch.device("cpu"))
    check_trainable_width(wide, torch.device("cuda"))  # a GPU's batched QR is not refused


def test_a_resumed_config_with_wrong_types_is_refused(tmp_path):
    run = _resumable_run(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["train"]["epochs"] = "3"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="epochs=3: must be an integer"):
        train(resume=run, quiet=True)
    config["train"]["nonsense"] = 1
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="unknown.*nonsense"):
        train(resume=run, quiet=True)


# --- --resume takes no settings ----------------------------------------------------------------------------------


def test_resume_with_settings_is_refused_naming_them(tmp_path, capsys):
    run = _resumable_run(tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    code = main(["train", "--resume", str(run), "--epochs", "5", "--lr", "1e-4", "--out", str(tmp_path / "other")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "remove --epochs, --out" in err, err
    assert sorted(p.name for p in run.iterdir()) == before and not (tmp_path / "other").exists()
    assert main(["train", "--resume", str(run), "--seed", "3"]) == 2
    assert "remove --seed" in capsys.readouterr().err
    assert main(["train", "--resume", str(run)]) == 0  # alone it continues the run
    assert (run / "summary.json").exists()


# --- NaN weights ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", ["all", "head_bias"])
def test_evaluating_nan_weights_warns_in_one_line(tmp_path, capsys, poison):
    from safetensors.torch import load_file, save_file

    run = train(TrainConfig(**QUICK), out=tmp_path / "run", quiet=True)
    assert main(["evaluate", str(run), "--samples", "2"]) == 0
    assert "warning" not in capsys.readouterr().err, "finite weights: no warning"
    weights = load_file(str(run / "model.safetensors"))
    for name, t in weights.items():
        if (poison == "all" and t.is_floating_point()) or name == "head.bias":  # not BatchNorm's integer counter
            t.fill_(float("nan"))
    save_file(weights, str(run / "model.safetensors"))
    assert main(["evaluate", str(run), "--samples", "2"]) == 0  # the table is still printed and written
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "100.0% of the model's outputs are NaN or infinite" in warnings[0], warnings
    assert "nll" in captured.out
    result = json.loads(next(run.glob("eval-*.json")).read_text())
    assert result["non_finite_fraction"] == 1.0


# --- --resume is bit-exact with data-loading workers -------------------------------------------------------------


def test_resume_with_workers_is_bit_exact_tensor_by_tensor(tmp_path):
    """`--workers 1`, SIGKILL at step 3 (in epoch 2), `--resume`: every tensor equals the uninterrupted run's.

    Persistent workers kept their augmentation RNG across epochs, so a resumed run once differed in all 56 tensors."""
    from safetensors.torch import load_file

    settings = dict(epochs=2, train_limit=100, batch_size=50, eval_samples=1, seed=5, workers=1, warmup_epochs=0.5)
    script = ("import json, os, signal, sys\nfrom stochvit.train import TrainConfig, train\n"
              "kill_at = int(sys.argv[3])\n"
              "train(TrainConfig(**json.loads(sys.argv[1])), out=sys.argv[2], quiet=True,\n"
              "      on_step=lambda step: step == kill_at and os.kill(os.getpid(), signal.SIGKILL))\n")

    def run(out: Path, kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script, json.dumps(settings), str(out), str(kill_at)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)

    assert run(tmp_path / "full", -1).returncode == 0
    killed = run(tmp_path / "killed", 3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["epoch"] == 0
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0
    full, resumed = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "killed"))
    assert full.keys() == resumed.keys() and len(full) > 40
    differ = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert differ == [], f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    rows = [[json.loads(r) for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("full", "killed")]
    assert [r["train_loss"] for r in rows[0]] == [r["train_loss"] for r in rows[1]]


# --- --resume of a damaged or edited run: one line, exit 2, before any training --------------------------------


@pytest.fixture(scope="module")
def one_epoch_left(tmp_path_factory) -> Path:
    """A run with its epoch-0 checkpoint and one epoch still to train: a 1-epoch run whose config.json now says
    2 epochs, its checkpoint's learning rate set to where the 2-epoch schedule is after epoch 0 (2 of 4 steps)."""
    from stochvit.train import _lr_lambda

    run = train(TrainConfig(**QUICK), out=tmp_path_factory.mktemp("resumable") / "run", quiet=True)
    (run / "summary.json").unlink()
    config = json.loads((run / "config.json").read_text())
    config["train"]["epochs"] = 2
    (run / "config.json").write_text(json.dumps(config))

    def two_epoch_schedule(ckpt):
        f = _lr_lambda(4, 1)  # 2 epochs of 2 steps, warmup 0.5 epochs
        for g in ckpt["optimizer"]["param_groups"]:
            g["lr"] = g["initial_lr"] * f(ckpt["scheduler"]["last_epoch"])
        ckpt["scheduler"]["_last_lr"] = [g["lr"] for g in ckpt["optimizer"]["param_groups"]]

    _edit_checkpoint(run / "checkpoint.pt", two_epoch_schedule)
    return run


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    path.write_text(json.dumps(edit(obj)))


def _edit_checkpoint(path: Path, edit) -> None:
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)


def _config_other_model(c):
    c["train"]["model"] = "vit_tiny_patch4_32"  # builds on 8x8 images, but is 192 wide, not 64
    return c


@pytest.mark.parametrize("damage,message", [
    (lambda r: _edit_json(r / "config.json", lambda c: {k: v for k, v in c.items() if k != "train"}), "no `train` settings"),
    (lambda r: (r / "config.json").write_text("[]"), "no `train` settings"),
    (lambda r: _edit_json(r / "config.json", _config_other_model), "checkpoint.pt does not fit the model in .*config.json"),
    (lambda r: _edit_checkpoint(r / "checkpoint.pt", lambda c: c["model"].update({"net.head.weight": torch.zeros(3, 64)})),
     "checkpoint.pt does not fit the model .*head.weight"),
    (lambda r: _edit_checkpoint(r / "checkpoint.pt", lambda c: c.pop("rng")), "checkpoint.pt lacks rng: not a stochvit"),
    (lambda r: (r / "checkpoint.pt").write_bytes(b""), r"checkpoint.pt is empty \(0 bytes\)"),
    (lambda r: (r / "metrics.jsonl").write_text((r / "metrics.jsonl").read_text()[:-30]),
     "metrics.jsonl line 1 is not a metrics row"),
    (lambda r: (r / "metrics.jsonl").unlink(), r"metrics.jsonl has rows for epochs \[\] but checkpoint.pt is at epoch 0"),
], ids=["no-train", "list", "config-other-model", "checkpoint-other-model", "no-rng", "empty-checkpoint",
        "truncated-metrics", "deleted-metrics"])
def test_a_damaged_run_is_refused_in_one_line_before_training(one_epoch_left, tmp_path, monkeypatch, capsys, damage,
                                                              message):
    import re
    import shutil

    run = Path(shutil.copytree(one_epoch_left, tmp_path / "run"))
    damage(run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}

    def no_training(*args, **kwargs):
        raise AssertionError("an epoch was trained before the damage was noticed")

    monkeypatch.setattr(torch.optim.AdamW, "step", no_training)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before, "nothing was rewritten"


def test_resume_of_a_file_is_refused_in_one_line(one_epoch_left, capsys):
    assert main(["train", "--resume", str(one_epoch_left / "config.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json: not a run directory" in err, err


def test_the_undamaged_copy_resumes(one_epoch_left, tmp_path):
    """The control for the damaged cases: the same copy, untouched, trains its second epoch and finishes."""
    import shutil

    run = Path(shutil.copytree(one_epoch_left, tmp_path / "run"))
    assert json.loads((train(resume=run, quiet=True) / "summary.json").read_text())["epochs"] == 2


# --- the NaN-loss way out: --resume with a lower --lr -----------------------------------------------------------


def test_nan_loss_later_in_a_run_is_resumed_with_a_lower_lr_bit_exactly(one_epoch_left, tmp_path, capsys):
    """A run whose first epoch survived a peak lr of 3e29 hits NaN in epoch 2. The message offers
    `--resume RUN --lr ...`; resumed with the lr the reference run had, it ends with the reference's weights."""
    import shutil

    from safetensors.torch import load_file

    reference = train(resume=shutil.copytree(one_epoch_left, tmp_path / "reference"), quiet=True)
    run = Path(shutil.copytree(one_epoch_left, tmp_path / "hot"))

    def hotter(ckpt):
        for g in ckpt["optimizer"]["param_groups"]:
            g["lr"], g["initial_lr"] = g["lr"] * 1e32, g["initial_lr"] * 1e32
        ckpt["scheduler"]["base_lrs"] = [b * 1e32 for b in ckpt["scheduler"]["base_lrs"]]

    _edit_checkpoint(run / "checkpoint.pt", hotter)
    _edit_json(run / "config.json", lambda c: {**c, "train": {**c["train"], "lr": 3e29}})
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "at epoch 2" in err and f"stochvit train --resume {run} --lr 3e+28" in err, err
    lr = json.loads((reference / "config.json").read_text())["train"]["lr"]  # the recipe's, which the reference ran at
    assert main(["train", "--resume", str(run), "--lr", repr(lr)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["lr"] == lr and config["lr_changes"] == [dict(epoch=1, old=3e29, new=lr)]
    want, got = (load_file(str(d / "model.safetensors")) for d in (reference, run))
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    capsys.readouterr()
    unfinished = Path(shutil.copytree(one_epoch_left, tmp_path / "again"))
    assert main(["train", "--resume", str(unfinished), "--lr", "nan"]) == 2  # checked like a fresh --lr
    assert capsys.readouterr().err.strip() == "stochvit train: error: invalid --lr=nan: must be a finite number > 0"


# --- output paths: refused up front, temp files never left, a computed table always shown ------------------------


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert len([e for e in err if "error:" in e]) == 1 and "error:" in err[-1] and "Traceback" not in "".join(err), err
    return err[-1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    return train(TrainConfig(**QUICK), out=tmp_path_factory.mktemp("finished") / "run", quiet=True)


@pytest.mark.parametrize("where", ["file", "proc", "sys"])
def test_an_unwritable_out_is_refused_before_the_data_is_loaded(tmp_path, monkeypatch, capsys, where):
    """A file, a path under /proc, and read-only sysfs (this machine runs tests as root, where chmod does not stop
    writes, so /sys stands in for a read-only mount)."""
    import stochvit.train

    out = {"file": tmp_path / "f", "proc": Path("/proc/stochvit-test/run"), "sys": Path("/sys/stochvit-test")}[where]
    if where == "file":
        out.write_text("keep me")
    monkeypatch.setattr(stochvit.train, "load_data", lambda *a, **k: pytest.fail("loaded the data first"))
    assert main(["train", "--epochs", "1", "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert ("is a file, not a directory" if where == "file" else "cannot write in") in err, err
    if where == "file":
        assert out.read_text() == "keep me"


def test_a_full_disk_during_training_leaves_no_temp_file_and_no_run(tmp_path, monkeypatch, capsys):
    real = Path.write_bytes

    def full_at_checkpoint(self, data):
        if self.name == ".checkpoint.pt.tmp":
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_at_checkpoint)
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--train-limit", "100", "--samples", "1", "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert "checkpoint.pt: No space left on device" in err, err
    assert not out.exists(), "the run failed before its first checkpoint: nothing is left, temp files included"


def test_evaluate_on_a_read_only_run_still_prints_its_table(finished_run, monkeypatch, capsys):
    real = Path.write_bytes

    def read_only(self, data):
        if self.parent == finished_run:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(self, data)

    before = sorted(p.name for p in finished_run.iterdir())
    monkeypatch.setattr(Path, "write_bytes", read_only)
    assert main(["evaluate", str(finished_run), "--samples", "2"]) == 0
    captured = capsys.readouterr()
    assert "nll" in captured.out and "accuracy" in captured.out and "wrote" not in captured.out
    warnings = [line for line in captured.err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "Read-only file system" in warnings[0] and "not saved" in warnings[0], warnings
    assert sorted(p.name for p in finished_run.iterdir()) == before


def test_calibration_out_at_a_file_is_refused(finished_run, tmp_path, capsys):
    f = tmp_path / "report"
    f.write_text("keep me")
    assert main(["calibration", str(finished_run), "--samples", "2", "--out", str(f)]) == 2
    assert "is a file" in _one_error_line(capsys) and f.read_text() == "keep me"


def test_privacy_with_blocks_out_of_range_leaves_nothing(finished_run, tmp_path, capsys):
    out = tmp_path / "privacy"
    assert main(["privacy", str(finished_run), "--blocks", "99", "--out", str(out)]) == 2
    assert "99 is out of range" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == [], "no report folder and no resume folder"


# --- clear errors -------------------------------------------------------------------------------------------------


def test_evaluate_of_a_file_names_its_run_directory(finished_run, capsys):
    assert main(["evaluate", str(finished_run / "config.json")]) == 2
    assert f"is a file; give the run directory that holds it ({finished_run})" in _one_error_line(capsys)


def test_evaluate_mode_mean_of_a_full_kind_run_is_one_line(tmp_path, capsys):
    run = train(TrainConfig(**QUICK, stochastic=dict(kind="full", distribution="gaussian")), out=tmp_path / "full",
                quiet=True)
    assert main(["evaluate", str(run), "--mode", "mean", "--samples", "2"]) == 2
    assert "mode='mean' is undefined for kind='full'" in _one_error_line(capsys)
    assert main(["evaluate", str(run), "--mode", "off", "--samples", "2"]) == 0


def test_empty_blocks_is_refused_in_one_line(tmp_path, capsys):
    assert main(["train", "--blocks", "", "--out", str(tmp_path / "run")]) == 2
    assert "blocks is empty" in _one_error_line(capsys) and not (tmp_path / "run").exists()


def test_model_safetensors_that_is_a_directory(finished_run, tmp_path, capsys):
    import shutil

    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    (run / "model.safetensors").unlink()
    (run / "model.safetensors").mkdir()
    assert main(["evaluate", str(run)]) == 2
    assert "model.safetensors is a directory, not a .safetensors or .pth file" in _one_error_line(capsys)


def test_init_weights_reads_a_plain_pth_like_the_run_directory(finished_run, tmp_path, capsys):
    """A .pth state dict (weights_only) starts training from the same weights as the run directory it came from."""
    from safetensors.torch import load_file

    pth = tmp_path / "weights.pth"
    torch.save(load_file(str(finished_run / "model.safetensors")), pth)
    args = ["train", "--epochs", "1", "--train-limit", "100", "--samples", "1", "--warmup-epochs", "0.5"]
    assert main([*args, "--init-weights", str(finished_run), "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--init-weights", str(pth), "--out", str(tmp_path / "b")]) == 0
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    torch.save({"model": load_file(str(finished_run / "model.safetensors")), "opt": TrainConfig()}, pth)  # an object
    assert main([*args, "--init-weights", str(pth), "--out", str(tmp_path / "c")]) == 2
    assert "refusing to load" in _one_error_line(capsys) and not (tmp_path / "c").exists()


def test_a_one_class_folder_is_refused_before_decoding(tmp_path, monkeypatch, capsys):
    import stochvit.data

    make_folder(tmp_path / "one", {"a": 20})
    monkeypatch.setattr(stochvit.data, "_decode_folder", lambda *a, **k: pytest.fail("decoded before checking"))
    with pytest.raises(UserError, match="has only one class folder .a.; a classifier needs at least two"):
        load_data(f"imagefolder:{tmp_path / 'one'}")
    monkeypatch.undo()
    out = tmp_path / "run"
    assert main(["train", "--data", f"imagefolder:{tmp_path / 'one'}", "--model", "vit_digits_patch2_8",
                 "--out", str(out)]) == 2
    assert "only one class folder" in _one_error_line(capsys) and not out.exists()


def test_bmp_ppm_and_tiff_decode_to_their_pixels_and_a_broken_one_is_named(tmp_path):
    """torchvision lists these as image files but cannot decode them: PIL does, pixel for pixel."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = {}
    for cls, ext in (("a", "bmp"), ("b", "ppm"), ("c", "tif")):
        (tmp_path / "T" / cls).mkdir(parents=True)
        for i in range(10):
            arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "T" / cls / f"{i}.{ext}")
            pixels[arr.tobytes()] = cls
    data = load_data(f"imagefolder:{tmp_path / 'T'}")
    images = torch.cat([data.train.images, data.val.images, data.test.images])
    labels = torch.cat([data.train.labels, data.val.labels, data.test.labels])
    got = {img.permute(1, 2, 0).numpy().tobytes(): data.class_names[y] for img, y in zip(images, labels)}
    assert got == pixels
    (tmp_path / "T" / "a" / "0.bmp").write_bytes(b"BM not really")
    with pytest.raises(UserError, match=r"cannot decode image .*0\.bmp"):
        load_data(f"imagefolder:{tmp_path / 'T'}")


def test_a_resumed_transfer_writes_its_transfer_md(finished_run, tmp_path, capsys):
    """A transfer interrupted after `prepare` (or mid-training) is finished by `stochvit train --resume`: the trainer
    itself writes transfer.md, as a transfer that ran through writes it."""
    from stochvit.eval.transfer import prepare

    out = prepare(str(finished_run), tmp_path / "t", data="digits:classes=0-4", mode="linear-probe", epochs=1,
                  train_limit=60, eval_samples=1)
    assert not (out / "transfer.md").exists()
    assert main(["train", "--resume", str(out)]) == 0
    text = (out / "transfer.md").read_text()
    assert "linear-probe" in text and str(finished_run) in text


@pytest.mark.parametrize("flags, message", [
    (["--adv-eps", "0.01"], "--adv-eps set adversarial training's budget; add --adv"),
    (["--adv-steps", "3"], "--adv-steps set adversarial training's budget; add --adv"),
    (["--adv", "fgsm-rs", "--adv-steps", "3"], "--adv-steps counts PGD steps"),
])
def test_adversarial_budget_without_its_method_is_refused(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--epochs", "1", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()  # refused before anything is written
