"""The architecture's contracts: one command-line vocabulary, a light `--help`, and every suite callable from Python."""

from __future__ import annotations

import argparse
import json
import os
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
PRECISION = BATCH = SAMPLING  # wherever a model runs; study takes both from its spec
SUITES = ("evaluate", "demo", "calibration", "robustness", "privacy", "federated", "transfer", "study")
# where a model runs in this process: federated's clients and a study's trainings pick their own device
DEVICE = ("train", "evaluate", "demo", "calibration", "robustness", "privacy", "transfer")
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
            if option in ("-h", "--help") or action.default is argparse.SUPPRESS:  # print-and-exit actions
                continue
            assert action.help, f"{name} {option} has no help text"
            shown = Formatter("x")._get_help_string(action)
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # a switch: off unless given
                assert "%(default)" not in shown, f"{name} {option}: a switch's stored default would read as 'on'"
                continue
            assert "%(default)" in shown, f"{name} {option}: default not shown"
        help_text = p.format_help()
        assert "(default:" in help_text
        assert "--out" in flags, name
        for concept in ("--samples", "--seed"):
            assert (concept in flags) == (name in SAMPLING), (name, concept)
        assert ("--precision" in flags) == (name in PRECISION), name
        assert ("--batch-size" in flags and "-b" in flags) == (name in BATCH), name
        assert "--threads" in flags, name  # every subcommand runs a model
        assert ("--device" in flags) == (name in DEVICE), name
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


def test_threads_take_effect_inside_a_run_and_bad_values_are_one_line(tmp_path, capsys, monkeypatch):
    """`--threads N` is what torch uses while the command works (and what it hands to its child processes)."""
    import torch

    import stochvit.train

    seen = []
    inner = stochvit.train.train_one_epoch

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return inner(*args, **kwargs)

    monkeypatch.setattr(stochvit.train, "train_one_epoch", spy)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # restored after the test: set_threads exports them
        monkeypatch.setenv(name, "1")
    before = torch.get_num_threads()
    want = 3 if before != 3 else 2
    try:
        assert main(["train", "--epochs", "1", "--warmup-epochs", "0", "--train-limit", "100", "--eval-samples", "1",
                     "--threads", str(want), "--out", str(tmp_path / "r")]) == 0
        assert seen == [want] and os.environ["OMP_NUM_THREADS"] == str(want)
    finally:
        torch.set_num_threads(before)
    seen.clear()
    monkeypatch.delenv("OMP_NUM_THREADS")  # no --threads, no OMP_NUM_THREADS: the digits model trains on one thread
    torch.set_num_threads(2)
    try:
        assert main(["train", "--epochs", "1", "--warmup-epochs", "0", "--train-limit", "100", "--eval-samples", "1",
                     "--out", str(tmp_path / "r1")]) == 0
        assert seen == [1]
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    for bad in ("0", "-2"):
        assert main(["evaluate", str(tmp_path / "r"), "--threads", bad]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"stochvit evaluate: error: --threads={bad}: must be an integer >= 1"], lines
    assert torch.get_num_threads() == before


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", DEVICE)
def test_device_cuda_without_cuda_is_one_line(name, tmp_path, capsys):
    out = str(tmp_path / "r")
    argv = {"train": ["train", "--out", out], "demo": ["demo", "--out", out],
            "transfer": ["transfer", "--from", "vit_tiny_patch4_32", "--out", out]}.get(name, [name, str(tmp_path)])
    assert main([*argv, "--device", "cuda"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stochvit {name}: error: --device=cuda: CUDA is not available here"), lines
    assert "use --device=cpu" in lines[0] and not (tmp_path / "r").exists()
    assert main([*argv, "--device", "gpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"stochvit {name}: error: --device=gpu: expected cpu, cuda or cuda:N"]


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


def test_every_suite_module_follows_one_convention():
    """`Settings` and `run(settings) -> result`, a `Result` dataclass with `out` and the key numbers; `report(result, out)`
    only where reporting is a separate step (study)."""
    import dataclasses
    import importlib
    import inspect
    import typing

    from stochvit.suites.settings import Result

    for name in SUITES:
        module = importlib.import_module(f"stochvit.suites.{name}")
        assert dataclasses.is_dataclass(module.Settings), name
        params = list(inspect.signature(module.run).parameters.values())
        assert typing.get_type_hints(module.run)[params[0].name] is module.Settings, name
        assert all(p.default is not inspect.Parameter.empty for p in params[1:]), name
        result = typing.get_type_hints(module.run)["return"]
        assert dataclasses.is_dataclass(result) and issubclass(result, Result) and result is not Result, name
        assert [f.name for f in dataclasses.fields(result)][0] == "out" and len(dataclasses.fields(result)) > 1, name
        assert hasattr(module, "report") == (name == "study"), name


def test_evaluate_from_python_is_seeded_and_refuses_to_overwrite_other_settings(tiny, tmp_path):
    from stochvit.suites import evaluate

    run = shutil.copytree(tiny["sto"], tmp_path / "sto")
    first = evaluate.run(evaluate.Settings(run, samples=3, seed=1))
    again = evaluate.run(evaluate.Settings(run, samples=3, seed=1))
    assert first.out == again.out == run / "eval-digits-test-on-k3-seed1.json"
    assert json.loads(first.out.read_text()) == first.report
    assert first.report["single_pass"] == again.report["single_pass"]  # the same command gives the same numbers
    other = evaluate.run(evaluate.Settings(run, samples=3, seed=2))
    assert other.report["single_pass"] != first.report["single_pass"]
    with pytest.raises(UserError, match="other settings"):
        evaluate.run(evaluate.Settings(run, samples=3, seed=1, batch_size=7))
    evaluate.run(evaluate.Settings(run, samples=3, seed=1, batch_size=7, overwrite=True))
    assert json.loads(first.out.read_text())["settings"]["batch_size"] == 7


def test_calibration_and_demo_from_python(tiny, tmp_path, capsys):
    from stochvit.suites import calibration, demo

    cal = calibration.run(calibration.Settings([tiny["det"], tiny["sto"]], samples=2, n_boot=100, out=tmp_path / "cal",
                                               quiet=True))
    assert cal.out == tmp_path / "cal" and json.loads((cal.out / "calibration.json").read_text()) == cal.report
    assert cal.report["samples"] == 2
    assert {"calibration.md", "settings.json", "reliability.png"} <= {p.name for p in cal.out.iterdir()}
    with pytest.raises(UserError, match="other settings"):
        calibration.run(calibration.Settings([tiny["det"], tiny["sto"]], samples=3, n_boot=100, out=cal.out, quiet=True))
    (tmp_path / "demo").mkdir()
    for name, src in (("deterministic", "det"), ("stochastic", "sto")):  # finished runs are reused: no training here
        shutil.copytree(tiny[src], tmp_path / "demo" / name)
    capsys.readouterr()
    d = demo.run(demo.Settings(tmp_path / "demo", samples=2, shift=False))
    assert d.out == tmp_path / "demo" / "calibration"
    assert d.runs == [tmp_path / "demo" / n for n in ("deterministic", "stochastic")]
    assert json.loads((d.out / "calibration.json").read_text()) == d.report
    # the closing summary: each difference with the report's paired 95% interval and verdict, and what it covers
    printed = capsys.readouterr().out.split("Stochastic (K=2 average) vs deterministic")[1]
    rows = [c for c in d.report["comparisons"]["clean"]
            if c["method"] == "stochastic" and c["metric"] in ("accuracy", "nll", "ece")]
    assert len(rows) == 3
    for c in rows:
        title = {"nll": "NLL", "ece": "ECE"}.get(c["metric"], c["metric"])
        line = next(x for x in printed.splitlines() if x.split()[1:2] == [title])
        assert f"{c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]  {c['verdict']}" in line
        assert c["low"] <= c["difference"] <= c["high"]
    assert "one seed per model" in printed and "test-image sampling only" in printed


def test_robustness_and_privacy_from_python(tiny, tmp_path):
    from stochvit.defaults import AttackConfig
    from stochvit.suites import privacy, robustness

    r = robustness.run(robustness.Settings(tiny["sto"], attacks=["fgsm", "pgd"], eps=[8 / 255], steps=2, eot=1, passes=2,
                                           n_examples=20, sanity=False, n_boot=100, out=tmp_path / "rob"))
    assert set(r.report["attacks"]) == {"fgsm", "pgd"} and r.out == tmp_path / "rob"
    assert json.loads((r.out / "robustness.json").read_text())["settings"]["precision"] == "fp32"  # the default
    p = privacy.run(privacy.Settings([tiny["det"], tiny["sto"]], split_blocks="1", attacks=["decoder"], noise_baseline=[0.5],
                                     n_victims=4, aux_limit=64, samples=2,
                                     attack=AttackConfig(decoder_steps=5, decoder_width=8), out=tmp_path / "pri"))
    assert {e["kind"] for e in p.report["entries"]} == {"deterministic", "stochastic"} and p.out == tmp_path / "pri"
    assert json.loads((p.out / "privacy.json").read_text())["settings"] == p.report["settings"]


def _recording_load_run(monkeypatch, module) -> set:
    """Patch `module.load_run` to hook each loaded model's patch embedding: the dtypes its forward passes produced."""
    from stochvit import runs

    seen: set = set()

    def load_run(path):
        run = runs.load_run(path)
        run.model.net.patch_embed.proj.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
        return run

    monkeypatch.setattr(module, "load_run", load_run)
    return seen


def test_robustness_and_privacy_run_in_bf16_from_the_command_line(tiny, tmp_path, monkeypatch):
    """--precision bf16 reaches the model's forward passes (gradients taken through the autocast); fp32 stays the default."""
    import warnings

    import torch

    from stochvit.suites import privacy, robustness

    warnings.simplefilter("ignore")  # bf16 on a CPU without native support warns that it is emulated (slow, still bf16)
    seen = _recording_load_run(monkeypatch, robustness)
    common = ["--attacks", "fgsm,pgd", "--eps", "8/255", "--steps", "2", "--eot", "1", "--samples", "2", "--n-examples", "20",
              "--no-sanity", "--n-boot", "100"]
    assert main(["robustness", str(tiny["det"]), *common, "--out", str(tmp_path / "fp32")]) == 0
    assert seen == {torch.float32}
    seen.clear()
    assert main(["robustness", str(tiny["det"]), *common, "--precision", "bf16", "-b", "8", "--out", str(tmp_path / "bf16")]) == 0
    assert seen == {torch.bfloat16}
    fp32, bf16 = (json.loads((tmp_path / n / "robustness.json").read_text()) for n in ("fp32", "bf16"))
    assert bf16["settings"]["precision"] == "bf16" and bf16["settings"]["batch_size"] == 8
    assert fp32["per_example"]["index"] == bf16["per_example"]["index"]  # the same examples, attacked in bf16
    assert abs(fp32["clean"]["mean"] - bf16["clean"]["mean"]) <= 0.15
    seen = _recording_load_run(monkeypatch, privacy)
    assert main(["privacy", str(tiny["sto"]), "--split-blocks", "1", "--attacks", "decoder,optimization",
                 "--noise-baseline", "", "--n-victims", "4", "--aux-limit", "32", "--samples", "2", "--decoder-steps", "3",
                 "--decoder-width", "8", "--opt-steps", "3", "--precision", "bf16", "-b", "16",
                 "--out", str(tmp_path / "pri")]) == 0
    assert seen == {torch.bfloat16}
    result = json.loads((tmp_path / "pri" / "privacy.json").read_text())
    assert result["settings"]["precision"] == "bf16" and result["settings"]["batch_size"] == 16
    psnr = result["entries"][0]["attacks"]["optimization"]["psnr"]["mean"]
    assert psnr == psnr and psnr > 0  # a finite reconstruction from gradients taken through bf16 features


def test_transfer_and_study_from_python(tiny, tmp_path, monkeypatch):
    from stochvit.suites import study, transfer

    t = transfer.run(transfer.Settings(str(tiny["det"]), tmp_path / "tr", data="digits:classes=5-9",
                                       transfer_mode="linear-probe", stochastic_target="add",
                                       train=dict(epochs=1, train_limit=100, eval_samples=1)))
    config = json.loads((t.out / "config.json").read_text())
    assert config["model"]["kwargs"]["num_classes"] == 5 and config["stochastic"]["low"] == 0.5
    assert t.summary == json.loads((t.out / "summary.json").read_text()) and (t.out / "transfer.md").exists()
    spec = tmp_path / "s.toml"
    spec.write_text('name = "s"\nseeds = [0]\n[train]\ndata = "digits"\ntrain_limit = 100\nepochs = 1\neval_samples = 1\n'
                    '[methods.deterministic]\nstochastic = false\n[methods.stochastic]\n[calibration]\nsamples = 2\n'
                    'shift_images = 40\n')
    result = study.run(study.Settings(spec, n_boot=100), log=lambda *a: None)
    assert result.out == tmp_path / "s"
    out = study.report(result)
    assert out == result.out / "report" and (out / "study.md").exists()
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"study.json", "study.md", "settings.json", "comparisons-clean.png"} <= set(files)

    def fail(path, rows, title):  # a failure mid-report: study.json is written, a plot is not
        raise RuntimeError("plot failed")

    monkeypatch.setattr(study, "forest_plot", fail)
    for target in (out, tmp_path / "fresh"):
        with pytest.raises(RuntimeError, match="plot failed"):
            study.report(result, target)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # the previous report, untouched
    assert not (tmp_path / "fresh").exists()
    assert [p for d in (tmp_path, result.out) for p in d.iterdir() if "partial" in p.name] == []  # nor half-written siblings


def test_a_failed_transfer_leaves_nothing_half_written(tiny, tmp_path, monkeypatch):
    """Failing while preparing leaves no directory; failing at transfer.md leaves the run unfinished (no summary.json)
    and resumable into a complete one."""
    from stochvit.eval import transfer as engine
    from stochvit.suites import transfer

    settings = transfer.Settings(str(tiny["det"]), tmp_path / "tr", data="digits:classes=5-9", transfer_mode="linear-probe",
                                 train=dict(epochs=1, train_limit=100, eval_samples=1))

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(engine, "write_json", broken)  # the new run's config.json, after its initial weights
    with pytest.raises(RuntimeError, match="disk full"):
        transfer.run(settings)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(engine, "report", broken)  # the transfer's report, at the end of training
    with pytest.raises(RuntimeError, match="disk full"):
        transfer.run(settings)
    out = tmp_path / "tr"
    assert (out / "checkpoint.pt").exists() and not (out / "summary.json").exists() and not (out / "transfer.md").exists()
    monkeypatch.undo()
    train(resume=out, quiet=True)
    assert (out / "summary.json").exists() and "# Transfer run tr" in (out / "transfer.md").read_text()


@pytest.mark.slow
def test_federated_from_python(tmp_path):
    pytest.importorskip("flwr")
    from stochvit.suites import federated

    r = federated.run(federated.Settings(tmp_path / "fed", TrainConfig(train_limit=200, eval_samples=1), clients=2,
                                         rounds=1))
    assert r.out == tmp_path / "fed" and r.summary == json.loads((r.out / "summary.json").read_text())


# -- the committed run directories still load and predict ----------------------------------------------------------

# runs committed with their weights (the transfer and federated benchmarks' runs are committed without: their reports
# read cached predictions)
COMMITTED = sorted(p.parent for p in (Path(__file__).resolve().parents[1] / "benchmarks" / "runs").glob("*/*/summary.json")
                   if (p.parent / "model.safetensors").exists())


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



@pytest.mark.slow
def test_a_committed_run_evaluates_to_its_recorded_test_metrics(cifar_dir, tmp_path):
    """`stochvit evaluate` with today's code on a committed deterministic fp32 run (its data path relative to the repo,
    as committed) gives the test metrics its summary.json recorded when it was trained."""
    from stochvit.cli import main

    run = Path(__file__).resolve().parents[1] / "benchmarks" / "runs" / "cifar10-overconfident" / "deterministic-fp32"
    recorded = json.loads((run / "summary.json").read_text())["test"]["single_pass"]
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run), "--samples", "1", "--precision", "fp32", "--out", str(out)]) == 0
    now = json.loads(out.read_text())["single_pass"]
    for key in ("accuracy", "nll", "brier", "ece"):
        assert now[key]["mean"] == pytest.approx(recorded[key]["mean"], abs=1e-5), key


# -- a checkpoint written by the code before the restructuring still resumes, bit-exactly ---------------------------

OLD_CHECKPOINT = Path(__file__).resolve().parent / "data" / "old_checkpoint"
OLD_CHECKPOINT_CPU = "AuthenticAMD"  # the fixture's reference run was recorded on an AMD EPYC


def _cpu_vendor() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("vendor_id"))
    except (OSError, StopIteration):
        return "unknown"


def test_old_checkpoint_resumes_bit_exactly(tmp_path, monkeypatch):
    """tests/data/old_checkpoint/run: killed mid-epoch 1 by the code of commit 82d1682 (make.py says how); resumed
    now, it must end with the weights, schedule and test metrics of the same run that the old code let finish.

    Bit for bit on the CPU kind that recorded the reference. Another vendor's fp32 kernels round differently, and
    AdamW's normalised steps carry that rounding into the weights (on an Intel Xeon: up to 7e-4 of a tensor's own
    change over the resumed epochs), so there each tensor must land within 1% of its change and the metrics within
    1e-4: a wrong resume (another batch order, a reset optimiser or schedule) moves them by a large part of it.
    Same-machine bit-exactness of resume is test_train.py's kill-and-resume test."""
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

    exact = _cpu_vendor() == OLD_CHECKPOINT_CPU
    same = (lambda a, b: a == b) if exact else (lambda a, b: a == pytest.approx(b, rel=1e-4, abs=1e-6))
    want, got = load_file(str(OLD_CHECKPOINT / "reference.safetensors")), load_file(str(run / "model.safetensors"))
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        diff = (tensor - got[name]).abs().max().item()
        change = (tensor - ckpt["model"][f"net.{name}"]).abs().max().item()  # what the resumed epochs did to it
        assert (diff == 0) if exact else (diff <= 0.01 * change), f"{name}: max difference {diff} (its change {change})"
    assert not torch.equal(got["blocks.0.mlp.fc1.weight"], ckpt["model"]["net.blocks.0.mlp.fc1.weight"])  # it trained

    rows = [[json.loads(r) for r in f.read_text().splitlines()]
            for f in (OLD_CHECKPOINT / "reference_metrics.jsonl", run / "metrics.jsonl")]
    assert [r["epoch"] for r in rows[1]] == [0, 1, 2]
    assert [r["lr"] for r in rows[0]] == [r["lr"] for r in rows[1]]  # the schedule is exact everywhere
    for key in ("train_accuracy", "val_nll", "val_accuracy", "val_ece"):
        assert same([r[key] for r in rows[1]], [r[key] for r in rows[0]]), key
    # the epoch's mean loss is now summed on the device in float32 (no host sync per step), the old code summed
    # Python floats: the same losses, rounded differently
    assert [r["train_loss"] for r in rows[1]] == pytest.approx([r["train_loss"] for r in rows[0]], rel=1e-6)
    reference = json.loads((OLD_CHECKPOINT / "reference_summary.json").read_text())
    assert same(_flat(json.loads((run / "summary.json").read_text())["test"]), _flat(reference["test"]))


def _flat(tree, prefix: str = "") -> dict:
    """A nested dict of numbers as {path: number}, for comparisons with a tolerance."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}/{i}").items()}
    return {prefix: tree}
