"""`stochvit robustness` end to end, its sanity report on a gradient-masked model, and adversarial training."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from test_attacks import Quantized

from stochvit.cli import main
from stochvit.runs import Run, load_run, read_json
from stochvit.suites.robustness import Settings, eps_list, evaluate_robustness, markdown, parse_eps


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
    args = ["train", "--epochs", "2", "--train-limit", "200", "--eval-samples", "2", "--adv", method, "--adv-eps", "0.0627",
            "--adv-steps", "2", "--out", str(out)] + ([] if stochastic else ["--no-stochastic"])
    assert main(args) == 0
    config = read_json(out / "config.json", "config")
    assert config["train"]["adv"] == dict(method=method, eps=0.0627, steps=2)
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
