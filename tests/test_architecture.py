"""The architecture's contracts: one command-line vocabulary, a light `--help`, and every suite callable from Python."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stochvit.cli import build_parser, main
from stochvit.cli.common import Formatter
from stochvit.errors import UserError
from stochvit.train import TrainConfig, train

SAMPLING = ("train", "evaluate", "demo", "calibration", "robustness", "privacy", "federated", "transfer")
# where a model runs for predictions or training; robustness and privacy differentiate through the model (attacks,
# inversion), which they do in fp32 on purpose, so they take no --precision
PRECISION = ("train", "evaluate", "demo", "calibration", "federated", "transfer")
BATCH = ("train", "evaluate", "demo", "calibration", "robustness", "federated", "transfer")
OLD_ALIASES = {"train": ["--eval-samples"], "federated": ["--eval-samples"], "transfer": ["--eval-samples", "--mode",
               "--stochastic"], "robustness": ["--passes"], "privacy": ["--passes", "--blocks"]}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def visible(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in p._actions if a.help is not argparse.SUPPRESS for o in a.option_strings}


def test_every_subcommand_shares_one_vocabulary_and_shows_its_defaults():
    commands = subcommands()
    assert set(commands) == {*SAMPLING, "study"}
    dests: dict[str, set[str]] = {}
    for name, p in commands.items():
        flags = visible(p)
        assert p.formatter_class is Formatter, name
        for option, action in flags.items():
            dests.setdefault(option, set()).add(action.dest)
            if option in ("-h", "--help"):
                continue
            assert action.help, f"{name} {option} has no help text"
            shown = Formatter("x")._get_help_string(action)
            assert "%(default)" in shown, f"{name} {option}: default not shown"
        help_text = p.format_help()
        assert "(default:" in help_text
        assert "--out" in flags, name
        for concept in ("--samples", "--seed"):
            assert (concept in flags) == (name in SAMPLING), (name, concept)
        assert ("--precision" in flags) == (name in PRECISION), name
        assert ("--batch-size" in flags and "-b" in flags) == (name in BATCH), name
        for old in ("--eval-samples", "--passes", "--mode" if name == "transfer" else "--passes"):
            assert old not in flags, f"{name} shows the old spelling {old}"
        for old in OLD_ALIASES.get(name, []):  # hidden, still accepted
            assert old in p._option_string_actions, (name, old)
    # the same flag means the same setting everywhere
    assert all(len(d) == 1 for d in dests.values()), {k: v for k, v in dests.items() if len(v) > 1}
    assert dests["--samples"] == {"samples"} and dests["--seed"] == {"seed"}
    assert "--split-blocks" in visible(commands["privacy"]) and "--blocks" not in visible(commands["privacy"])
    assert "--transfer-mode" in visible(commands["transfer"]) and "--stochastic-target" in visible(commands["transfer"])


def test_old_flag_spellings_still_parse_to_the_new_settings():
    p = build_parser()
    assert p.parse_args(["robustness", "r", "--passes", "3"]).samples == 3
    assert p.parse_args(["privacy", "r", "--blocks", "1,last", "--passes", "2"]).split_blocks == "1,last"
    a = p.parse_args(["transfer", "--from", "r", "--out", "o", "--mode", "linear-probe", "--stochastic", "off",
                      "--eval-samples", "2"])
    assert (a.transfer_mode, a.stochastic_target, a.samples) == ("linear-probe", "off", 2)
    assert p.parse_args(["train", "--eval-samples", "4"]).samples == 4


def test_layer_flags_take_the_library_defaults():
    from stochvit.defaults import DEFAULT_STOCHASTIC

    for name in ("train", "federated", "transfer"):
        a = build_parser().parse_args([name] + (["--from", "r", "--out", "o"] if name == "transfer" else
                                                ["--out", "o"] if name == "federated" else []))
        assert {k: getattr(a, k) for k in DEFAULT_STOCHASTIC} == DEFAULT_STOCHASTIC, name


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_help_imports_neither_torch_nor_timm_nor_flower():
    names = ["", *subcommands()]
    code = ("import sys\nfrom stochvit.cli import main\n"
            f"for name in {names!r}:\n"
            "    try:\n        main([name, '--help'] if name else ['--help'])\n    except SystemExit as e:\n"
            "        assert e.code == 0, (name, e.code)\n"
            "print('HEAVY', sorted(m for m in ('torch', 'timm', 'flwr', 'torchvision') if m in sys.modules))\n")
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout[-300:]


def test_version(capsys):
    import stochvit

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"stochvit {stochvit.__version__}"


def test_federated_without_the_extra_says_how_to_install_it(tmp_path):
    """Flower missing (simulated: a None entry in sys.modules makes its import fail): one line and exit 2; --help works."""
    hide = "import sys\nsys.modules['flwr'] = None\nfrom stochvit.cli import main\n"
    done = _python(hide + f"sys.exit(main(['federated', '--out', {str(tmp_path / 'fed')!r}]))")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "stochvit[federated]"' in lines[0], done.stderr
    assert not (tmp_path / "fed").exists()
    done = _python(hide + "sys.exit(main(['federated', '--help']))")
    assert done.returncode == 0 and "--clients" in done.stdout, done.stderr


# -- every suite from Python, with its Settings ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A deterministic and a stochastic digits run, one short epoch each (seconds)."""
    tmp = tmp_path_factory.mktemp("tiny")
    return {name: train(TrainConfig(epochs=1, train_limit=300, eval_samples=2, stochastic=stochastic), out=tmp / name,
                        quiet=True) for name, stochastic in (("det", None), ("sto", True))}


def test_evaluate_from_python_is_seeded_and_refuses_to_overwrite_other_settings(tiny, tmp_path):
    from stochvit.suites import evaluate

    run = shutil.copytree(tiny["sto"], tmp_path / "sto")
    first, path = evaluate.run(evaluate.Settings(run, samples=3, seed=1))
    again, same = evaluate.run(evaluate.Settings(run, samples=3, seed=1))
    assert path == same == run / "eval-digits-test-on-k3-seed1.json"
    assert first["single_pass"] == again["single_pass"]  # the same command gives the same numbers
    other, _ = evaluate.run(evaluate.Settings(run, samples=3, seed=2))
    assert other["single_pass"] != first["single_pass"]
    with pytest.raises(UserError, match="other settings"):
        evaluate.run(evaluate.Settings(run, samples=3, seed=1, batch_size=7))
    evaluate.run(evaluate.Settings(run, samples=3, seed=1, batch_size=7, overwrite=True))
    assert json.loads(path.read_text())["settings"]["batch_size"] == 7


def test_calibration_and_demo_from_python(tiny, tmp_path):
    from stochvit.suites import calibration, demo

    out = calibration.run(calibration.Settings([tiny["det"], tiny["sto"]], samples=2, n_boot=100, out=tmp_path / "cal",
                                               quiet=True))
    report = json.loads((out / "calibration.json").read_text())
    assert report["samples"] == 2 and {"calibration.md", "settings.json", "reliability.png"} <= {p.name for p in out.iterdir()}
    with pytest.raises(UserError, match="other settings"):
        calibration.run(calibration.Settings([tiny["det"], tiny["sto"]], samples=3, n_boot=100, out=out, quiet=True))
    (tmp_path / "demo").mkdir()
    for name, src in (("deterministic", "det"), ("stochastic", "sto")):  # finished runs are reused: no training here
        shutil.copytree(tiny[src], tmp_path / "demo" / name)
    folder = demo.run(demo.Settings(tmp_path / "demo", samples=2, shift=False))
    assert folder == tmp_path / "demo" / "calibration" and (folder / "calibration.json").exists()


def test_robustness_and_privacy_from_python(tiny, tmp_path):
    from stochvit.defaults import AttackConfig
    from stochvit.suites import privacy, robustness

    result, out = robustness.run(robustness.Settings(tiny["sto"], attacks=["fgsm", "pgd"], eps=[8 / 255], steps=2, eot=1,
                                                     passes=2, n_examples=20, sanity=False, n_boot=100,
                                                     out=tmp_path / "rob"))
    assert set(result["attacks"]) == {"fgsm", "pgd"} and (out / "robustness.json").exists()
    result, out = privacy.run(privacy.Settings([tiny["det"], tiny["sto"]], split_blocks="1", attacks=["decoder"],
                                               noise_baseline=[0.5], n_victims=4, aux_limit=64, samples=2,
                                               attack=AttackConfig(decoder_steps=5, decoder_width=8), out=tmp_path / "pri"))
    assert {e["kind"] for e in result["entries"]} == {"deterministic", "stochastic"} and (out / "privacy.json").exists()


def test_transfer_and_study_from_python(tiny, tmp_path):
    from stochvit.suites import study, transfer

    path = transfer.run(transfer.Settings(str(tiny["det"]), tmp_path / "tr", data="digits:classes=5-9",
                                          transfer_mode="linear-probe", stochastic_target="add",
                                          train=dict(epochs=1, train_limit=100, eval_samples=1)))
    config = json.loads((path / "config.json").read_text())
    assert config["model"]["kwargs"]["num_classes"] == 5 and config["stochastic"]["low"] == 0.5
    spec = tmp_path / "s.toml"
    spec.write_text('name = "s"\nseeds = [0]\n[train]\ndata = "digits"\ntrain_limit = 100\nepochs = 1\neval_samples = 1\n'
                    '[methods.deterministic]\nstochastic = false\n[methods.stochastic]\n[calibration]\nsamples = 2\n'
                    'shift_images = 40\n')
    out = study.report(study.run(study.Settings(spec, n_boot=100), log=lambda *a: None))
    assert (out / "study.md").exists()


@pytest.mark.slow
def test_federated_from_python(tmp_path):
    pytest.importorskip("flwr")
    from stochvit.suites import federated

    path = federated.run(federated.Settings(tmp_path / "fed", TrainConfig(train_limit=200, eval_samples=1), clients=2,
                                            rounds=1))
    assert (path / "summary.json").exists()


# -- the committed run directories still load and predict ----------------------------------------------------------

COMMITTED = sorted(p.parent for p in (Path(__file__).resolve().parents[1] / "benchmarks" / "runs").glob("*/*/summary.json"))


@pytest.mark.parametrize("run_dir", COMMITTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_runs_still_load_and_predict(run_dir):
    import torch

    from stochvit.predict import predict_proba
    from stochvit.runs import load_run

    run = load_run(run_dir)
    k = run.config["model"]["kwargs"]
    x = torch.rand(4, k["in_chans"], k["img_size"], k["img_size"], generator=torch.Generator().manual_seed(0))
    probs = predict_proba(run.model, x, samples=2)
    assert probs.shape == (4, k["num_classes"]) and torch.allclose(probs.sum(1), torch.ones(4), atol=1e-4)



# -- a checkpoint written by the code before the restructuring still resumes, bit-exactly ---------------------------

OLD_CHECKPOINT = Path(__file__).resolve().parent / "data" / "old_checkpoint"


def test_old_checkpoint_resumes_bit_exactly(tmp_path, monkeypatch):
    """tests/data/old_checkpoint/run: killed mid-epoch 1 by the code of commit 82d1682 (make.py says how); resumed
    now, it must end with the weights, schedule and test metrics of the same run that the old code let finish."""
    import importlib.util

    import torch
    from safetensors.torch import load_file

    from stochvit.train import load_checkpoint

    spec = importlib.util.spec_from_file_location("old_checkpoint_make", OLD_CHECKPOINT / "make.py")
    make = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, make)  # timm's registry looks the entrypoint's module up there
    spec.loader.exec_module(make)
    make.register()  # the fixture's tiny ViT (a 2.5 MB digits checkpoint would be too large to commit)

    run = shutil.copytree(OLD_CHECKPOINT / "run", tmp_path / "run")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)  # the old file unpickles without running code
    assert ckpt["epoch"] == 0 and load_checkpoint(run)["epoch"] == 0
    assert train(resume=run, quiet=True) == run

    want, got = load_file(str(OLD_CHECKPOINT / "reference.safetensors")), load_file(str(run / "model.safetensors"))
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.equal(tensor, got[name]), f"{name}: max difference {(tensor - got[name]).abs().max().item()}"
    assert not torch.equal(got["blocks.0.mlp.fc1.weight"], ckpt["model"]["net.blocks.0.mlp.fc1.weight"])  # it trained

    rows = [[json.loads(r) for r in f.read_text().splitlines()]
            for f in (OLD_CHECKPOINT / "reference_metrics.jsonl", run / "metrics.jsonl")]
    assert [r["epoch"] for r in rows[1]] == [0, 1, 2]
    for key in ("lr", "train_accuracy", "val_nll", "val_accuracy", "val_ece"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key
    # the epoch's mean loss is now summed on the device in float32 (no host sync per step), the old code summed
    # Python floats: the same losses, rounded differently
    assert [r["train_loss"] for r in rows[1]] == pytest.approx([r["train_loss"] for r in rows[0]], rel=1e-6)
    reference = json.loads((OLD_CHECKPOINT / "reference_summary.json").read_text())
    assert json.loads((run / "summary.json").read_text())["test"] == reference["test"]
