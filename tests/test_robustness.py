"""`stochvit robustness` end to end, its sanity report on a gradient-masked model, and adversarial training."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from test_attacks import Quantized

from stochvit.cli import main
from stochvit.cli.common import eps_list, parse_eps
from stochvit.runs import Run, load_run, read_json
from stochvit.suites.robustness import Settings, evaluate_robustness, markdown


def test_parse_eps():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps(" 0.03 ") == pytest.approx(0.03)
    assert eps_list("8/255,1/255,8/255") == pytest.approx([1 / 255, 8 / 255])
    for bad in ("x/255", "1/0", "-1", "nan", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            eps_list(bad)


@pytest.mark.slow
def test_cli_end_to_end_on_digits(digits_runs, tmp_path, capsys):
    out = tmp_path / "rob"
    args = ["robustness", str(digits_runs["stochastic"]), "--eps", "8/255,32/255", "--steps", "3", "--eot", "2",
            "--square-queries", "15", "--n-examples", "24", "--passes", "3", "--surrogate", str(digits_runs["deterministic"]),
            "--out", str(out)]
    assert main(args) == 0
    for name in ("robustness.json", "robustness.md", "robust_accuracy.png", "adversarial_examples.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(tmp_path.glob(".rob.tmp-*"))  # no half-written folder left behind
    r = json.loads((out / "robustness.json").read_text())
    assert r["randomized"] and r["n_examples"] == 24 and r["norm"] == "linf"
    assert "all 3 passes" in r["rule"]
    assert set(r["attacks"]) == {"fgsm", "pgd", "eot-pgd", "apgd-ce", "apgd-dlr", "aa-rand", "square", "transfer"}
    for per in r["attacks"].values():
        assert list(per) == ["8/255", "32/255"]
        for cell in per.values():
            assert 0 <= cell["all_pass"] <= cell["mean"] <= r["clean"]["mean"] + 1e-9  # all-pass is the stricter rule
    for lb, cell in r["worst_case"].items():
        assert cell["mean"] <= min(per[lb]["mean"] for per in r["attacks"].values()) + 1e-9
    assert r["worst_case"]["32/255"]["mean"] <= r["worst_case"]["8/255"]["mean"]
    assert [c["status"] for c in r["sanity"]] and all(c["status"] in ("PASS", "FLAG") for c in r["sanity"])
    assert len(r["sanity"]) == 5
    md = (out / "robustness.md").read_text()
    assert "**Rule.**" in md and "## Sanity report" in md and "| **worst case** |" in md
    assert "Robustness of" in capsys.readouterr().out
    # a transfer attack without a surrogate is a user mistake (exit 2), not a traceback
    assert main(["robustness", str(digits_runs["stochastic"]), "--attacks", "transfer", "--out", str(tmp_path / "x")]) == 2
    assert main(["robustness", str(tmp_path / "missing")]) == 2




def test_sanity_report_flags_gradient_masking(digits_runs):
    run = load_run(digits_runs["deterministic"])
    s = dict(eps=[0.15], attacks=["pgd", "square"], steps=5, queries=150, n_examples=40, passes=1)
    torch.manual_seed(0)
    masked = Run(run.path, run.config, Quantized(run.model), run.summary)
    result, _ = evaluate_robustness(masked, Settings(**s), quiet=True)
    status = {c["check"]: c["status"] for c in result["sanity"]}
    assert status["white-box is not weaker than the black-box Square attack"] == "FLAG", result["sanity"]
    assert status["EOT is not weaker than no EOT"] == "SKIP"
    assert "not trustworthy" in markdown(result)
    honest, _ = evaluate_robustness(run, Settings(**s), quiet=True)  # same model, gradients intact
    status = {c["check"]: c["status"] for c in honest["sanity"]}
    assert status["white-box is not weaker than the black-box Square attack"] == "PASS", honest["sanity"]
    assert status["accuracy falls as epsilon grows and reaches ~0 at a large epsilon"] == "PASS", honest["sanity"]


@pytest.mark.slow
@pytest.mark.parametrize("method,stochastic", [("pgd", True), ("fgsm-rs", False)])
def test_adversarial_training_runs_on_digits(tmp_path, method, stochastic):
    out = tmp_path / method
    steps = ["--adv-steps", "2"] if method == "pgd" else []  # fgsm-rs takes one step and refuses --adv-steps
    args = ["train", "--epochs", "2", "--train-limit", "200", "--eval-samples", "2", "--adv", method, "--adv-eps", "0.0627",
            *steps, "--out", str(out)] + ([] if stochastic else ["--no-stochastic"])
    assert main(args) == 0
    config = read_json(out / "config.json", "config")
    assert config["train"]["adv"] == dict(method=method, eps=0.0627, steps=2 if method == "pgd" else 7)
    assert (config["stochastic"] is not None) == stochastic
    assert (out / "summary.json").exists() and len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_attacks_skip_examples_no_clean_pass_gets_right():
    """Only `active` examples are attacked (and stay in the ball); the rest come back as their clean images."""
    from stochvit.suites.robustness import _run

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    x, y = torch.rand(6, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    active = torch.tensor([True, False, True, False, True, False])
    s = Settings(eps=[0.1], attacks=["pgd"], steps=5, batch_size=2)
    x_adv = _run("pgd", model, x, y, 0.1, s, active=active)
    assert torch.equal(x_adv[~active], x[~active])
    moved = (x_adv[active] - x[active]).abs()
    assert moved.amax() <= 0.1 + 1e-6 and moved.amax() > 0.05


def test_robust_accuracy_carries_intervals_from_kept_per_example_outcomes(tmp_path):
    from stochvit.eval.stats import Scores, interval
    from stochvit.suites.robustness import write_outputs
    from stochvit.train import TrainConfig, train

    run = load_run(train(TrainConfig(epochs=2, eval_samples=2), out=tmp_path / "stoch", quiet=True))
    s = Settings(eps=[2 / 255, 16 / 255, 64 / 255], attacks=["fgsm", "pgd"], steps=3, n_examples=80, passes=3,
                 sanity=False, n_boot=300)
    result, grid = evaluate_robustness(run, s, quiet=True)
    per = result["per_example"]
    assert len(per["index"]) == 80 and len(per["clean"]) == 80
    assert set(per) == {"index", "clean", "fgsm", "pgd", "worst_case"}
    cells = [("clean", None, result["clean"])] + [(a, lb, c) for a, v in result["attacks"].items() for lb, c in v.items()]
    cells += [("worst_case", lb, c) for lb, c in result["worst_case"].items()]
    for name, lb, cell in cells:
        outcome = torch.tensor(per[name] if lb is None else per[name][lb], dtype=torch.float64)
        assert len(outcome) == 80 and outcome.mean().item() == pytest.approx(cell["mean"], abs=1e-6)
        assert (outcome == 1).double().mean().item() == pytest.approx(cell["all_pass"], abs=1e-6)
        for key, values in (("mean", outcome), ("all_pass", (outcome == 1).double())):
            lo, hi = cell["ci"][key]
            assert 0 <= lo <= cell[key] + 1e-9 <= hi + 2e-9 <= 1 + 2e-9, (name, lb, key)
            assert [lo, hi] == pytest.approx(list(interval(Scores.per_image(values), n_boot=300)))
            if 0.1 < cell[key] < 0.9:
                assert hi - lo > 0.05  # 80 examples: a real interval (about +-0.1 at 0.5)
    md = markdown(result)
    assert "95% intervals: percentile bootstrap over the 80 attacked examples (300 resamples)" in md
    wc = result["worst_case"]["16/255"]
    assert "| **worst case (all-pass)** |" in md and f"{wc['mean']:.3f} [{wc['ci']['mean'][0]:.3f}, " in md
    out = write_outputs(result, grid, tmp_path / "rob", s.passes)
    assert json.loads((out / "robustness.json").read_text())["per_example"]["index"] == per["index"]
    assert (out / "robust_accuracy.png").stat().st_size > 0
