"""Feature-privacy suite: the attacks work, the attacker cannot see the victim's draws, metrics, utility, CLI."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from stochvit.data import load_data
from stochvit.errors import UserError
from stochvit.eval.privacy import (
    AttackConfig,
    AttackerView,
    Device,
    attacker_modes,
    attacker_view,
    block_features,
    decoder_inversion,
    optimization_inversion,
    parse_blocks,
    reconstruction_metrics,
    server_logits,
    split_accuracy,
)
from stochvit.layers import StochasticLinear, is_random
from stochvit.models import Normalized, create_model
from stochvit.runs import load_run

FAST = AttackConfig(decoder_steps=150, decoder_batch=64, decoder_lr=2e-2, decoder_width=16, opt_steps=80, opt_lr=0.05,
                    tv_weight=0.0)


def identity_like() -> Normalized:
    """A stochastic 1-block ViT whose block-1 tokens are an invertible linear function of the pixel patches.

    The patch embedding copies each 2x2 patch (and its negative) into the token, positions are zero and the
    residual branches are scaled down to 1 %, so the block is close to the identity but still draws at random.
    """
    torch.manual_seed(0)
    net = create_model("vit_digits_patch2_8", stochastic=True, embed_dim=16, depth=1, num_heads=2)
    with torch.no_grad():
        w = torch.zeros(16, 4)
        w[:4], w[4:8] = torch.eye(4), -torch.eye(4)
        net.patch_embed.proj.weight.copy_(w.view(16, 1, 2, 2))
        net.patch_embed.proj.bias.zero_()
        net.pos_embed.zero_()
        for block in net.blocks:
            block.attn.proj.weight.mul_(0.01)
            block.mlp.fc2.weight.mul_(0.01)
    return Normalized(net, [0.0], [1.0]).eval()


@pytest.fixture(scope="module")
def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_data("digits")
    return data.train.tensors()[0], data.test.tensors()[0][:8]


def test_parse_blocks():
    assert parse_blocks("1,mid,last", 4) == [1, 2, 4]
    assert parse_blocks("first,0,last,4", 6) == [0, 1, 4, 6]
    for bad in ("7", "middle", ""):
        with pytest.raises(UserError):
            parse_blocks(bad, 6)


def test_decoder_inversion_inverts_an_identity_like_extractor(digits_images):
    aux, victims = digits_images
    model = identity_like()
    assert is_random(model)
    observed = Device(model, 1, seed=1).transmit(victims)
    torch.manual_seed(0)
    recon = decoder_inversion(attacker_view(model, 1, aux, seed=2), observed, FAST)
    m = reconstruction_metrics(recon, victims)
    assert m["psnr"]["mean"] > 30 and m["ssim"]["mean"] > 0.98, m


def test_optimization_inversion_inverts_an_identity_like_extractor(digits_images):
    aux, victims = digits_images
    model = identity_like()
    observed = Device(model, 1, seed=1).transmit(victims)
    view = attacker_view(model, 1, aux, seed=2)
    assert attacker_modes(view) == ["on", "mean"]
    for mode in attacker_modes(view):
        torch.manual_seed(0)
        m = reconstruction_metrics(optimization_inversion(view, observed, mode, FAST), victims)
        assert m["psnr"]["mean"] > 30 and m["ssim"]["mean"] > 0.98, (mode, m)


def test_attacker_path_has_no_access_to_the_victims_draws(digits_images):
    aux, victims = digits_images
    model = identity_like()
    victim = Device(model, 1, seed=1)
    view = attacker_view(model, 1, aux, seed=2)
    # the attacks' inputs are an AttackerView and the observed features, nothing that reaches a Device
    for attack in (decoder_inversion, optimization_inversion):
        params = inspect.signature(attack).parameters
        assert list(params)[:2] == ["view", "observed"] and "Device" not in str(params)
    # (precision: the name of the white-box passes' autocast, a string that can carry no draw)
    assert {f for f in AttackerView.__dataclass_fields__} == {"net", "k", "patch", "prefix", "aux", "query", "precision"}
    # the query oracle is another device: the deployed software, not the victim's
    deployed = view.query.__self__
    assert isinstance(deployed, Device) and deployed is not victim
    # no module or parameter storage is shared between the victim, the deployed oracle and the attacker's copy
    owners = [victim._model, deployed._model, view.net]
    for i, a in enumerate(owners):
        for b in owners[i + 1:]:
            assert not {id(m) for m in a.modules()} & {id(m) for m in b.modules()}
            assert not {p.data_ptr() for p in a.parameters()} & {p.data_ptr() for p in b.parameters()}
    # transmitted features carry no autograd graph (whose saved tensors would hold the draws) and own their storage
    observed = victim.transmit(victims)
    assert observed.grad_fn is None and not observed.requires_grad and observed._base is None
    # the victim draws from a private stream: the global RNG is untouched and does not influence the draws
    state = torch.get_rng_state()
    torch.manual_seed(123)
    a = Device(model, 1, seed=7).transmit(victims)
    torch.manual_seed(456)
    b = Device(model, 1, seed=7).transmit(victims)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    Device(model, 1, seed=7).transmit(victims)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), before)
    torch.set_rng_state(state)
    # ... and the oracle's draws on the same images are other draws than the victim's
    assert not torch.allclose(view.query(victims), observed)
    # hooks on the victim's stochastic layers never fire while the attacks run, and vice versa
    fired = []
    hooks = [m.register_forward_hook(lambda *_: fired.append("victim")) for m in victim._model.modules()
             if isinstance(m, StochasticLinear)]
    tiny = AttackConfig(decoder_steps=3, opt_steps=3, decoder_width=4)
    decoder_inversion(view, observed, tiny)
    optimization_inversion(view, observed, "on", tiny)
    for h in hooks:
        h.remove()
    spy = [m.register_forward_hook(lambda *_: fired.append("attacker")) for m in view.net.modules()]
    victim.transmit(victims)
    for h in spy:
        h.remove()
    assert fired == []


def test_metrics_agree_with_torchmetrics():
    gen = torch.Generator().manual_seed(0)
    original = torch.rand(6, 1, 16, 16, generator=gen)
    recon = (original + 0.1 * torch.randn(6, 1, 16, 16, generator=gen)).clamp(0, 1)
    m = reconstruction_metrics(recon, original)
    psnr = torch.tensor([PeakSignalNoiseRatio(data_range=1.0)(r[None], o[None]).item() for r, o in zip(recon, original)])
    ssim = torch.tensor([StructuralSimilarityIndexMeasure(data_range=1.0)(r[None], o[None]).item()
                         for r, o in zip(recon, original)])
    closed = 10 * torch.log10(1 / (recon - original).pow(2).flatten(1).mean(1))
    assert torch.allclose(psnr, closed, atol=1e-4)
    for key, ref in (("psnr", psnr), ("ssim", ssim)):
        assert math.isclose(m[key]["mean"], ref.mean().item(), rel_tol=1e-5)
        assert math.isclose(m[key]["std"], ref.std().item(), rel_tol=1e-4)
    assert reconstruction_metrics(original, original)["ssim"]["mean"] == pytest.approx(1.0, abs=1e-6)


def test_split_model_and_noise_baseline(digits_runs):
    run = load_run(digits_runs["deterministic"])
    data = load_data("digits")
    x, y = data.test.tensors()
    with torch.no_grad():
        full = run.model(x)
        for k in range(len(run.model.net.blocks) + 1):
            assert torch.allclose(server_logits(run.model, block_features(run.model, x, k), k), full, atol=1e-4)
    clean = split_accuracy(run.model, x, y, 2, passes=3)
    assert clean["passes"] == 1 and clean["mean"] == pytest.approx((full.argmax(1) == y).float().mean().item())
    rms = block_features(run.model, x, 2).pow(2).mean().sqrt().item()
    noisy = split_accuracy(run.model, x, y, 2, noise_std=30 * rms, passes=3, seed=0)
    assert noisy["passes"] == 3 and noisy["mean"] < clean["mean"] - 0.3


def privacy_cli(argv: list[str]) -> None:
    """`stochvit privacy ARGS` through the command line's parser, raising (not printing) a UserError."""
    from stochvit.cli import build_parser

    args = build_parser().parse_args(argv)
    args.func(args)


@pytest.mark.slow
def test_cli_end_to_end(digits_runs, tmp_path):
    out = tmp_path / "privacy"
    args = ["privacy", str(digits_runs["deterministic"]), str(digits_runs["stochastic"]), "--blocks", "1,last",
            "--noise-baseline", "0.5", "--n-victims", "4", "--aux-limit", "256", "--passes", "2", "--decoder-steps", "30",
            "--decoder-width", "8", "--opt-steps", "10", "--out", str(out)]
    privacy_cli(args)
    result = json.loads((out / "privacy.json").read_text())
    kinds = [(e["kind"], e["block"], e["defence"]) for e in result["entries"]]
    assert kinds == [("deterministic", 1, "none"), ("deterministic", 1, "noise"), ("deterministic", 4, "none"),
                     ("deterministic", 4, "noise"), ("stochastic", 1, "none"), ("stochastic", 4, "none")]
    for e in result["entries"]:
        assert 0 <= e["accuracy"]["mean"] <= 1
        for r in e["attacks"].values():
            assert math.isfinite(r["psnr"]["mean"]) and -1 <= r["ssim"]["mean"] <= 1
        assert e["attacks"]["optimization"]["mode"] == ("mean" if e["kind"] == "deterministic" else
                                                        max(("on", "mean"), key=lambda m: e["attacks"]["optimization"]
                                                            ["per_mode"][m]["psnr"]["mean"]))
    assert len(result["matched_utility"]) == 4
    for e in result["entries"]:
        for r in e["attacks"].values():
            assert len(r["per_image"]["psnr"]) == 4 and r["ci"]["psnr"][0] <= r["psnr"]["mean"] <= r["ci"]["psnr"][1]
    for row in result["matched_utility"]:
        if row["noise_psnr_at_matched_accuracy"] is not None:
            assert row["psnr_comparison"]["baseline_value"] == pytest.approx(row["noise_psnr_at_matched_accuracy"])
    assert "| block k |" in (out / "privacy.md").read_text() and "PSNR diff [95% CI]" in (out / "privacy.md").read_text()
    for png in ("reconstructions.png", "privacy_utility.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*tmp"))
    with pytest.raises(UserError, match="out of range"):
        privacy_cli(["privacy", str(digits_runs["stochastic"]), "--blocks", "9", "--out", str(tmp_path / "x")])


def test_interrupted_run_resumes_without_recomputing_finished_configs(digits_runs, tmp_path, monkeypatch):
    import stochvit.suites.privacy as suite

    def args(out):
        return ["privacy", str(digits_runs["deterministic"]), "--blocks", "1", "--noise-baseline", "0.5", "--n-victims", "4",
                "--aux-limit", "128", "--passes", "1", "--decoder-steps", "20", "--decoder-width", "8", "--opt-steps", "5",
                "--out", str(out)]

    def without_seconds(path):
        entries = json.loads((path / "privacy.json").read_text())["entries"]
        for e in entries:
            for r in e["attacks"].values():
                r.pop("seconds")
        return entries

    privacy_cli(args(tmp_path / "whole"))
    real, calls = suite.optimization_inversion, []

    def interrupted_on_second_config(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(suite, "optimization_inversion", interrupted_on_second_config)
    with pytest.raises(KeyboardInterrupt):
        privacy_cli(args(tmp_path / "resumed"))
    assert not (tmp_path / "resumed" / "privacy.json").exists()
    assert len((tmp_path / ".resumed.resume" / "entries.jsonl").read_text().splitlines()) == 1
    calls.clear()
    monkeypatch.setattr(suite, "optimization_inversion", lambda *a, **k: calls.append(1) or real(*a, **k))
    privacy_cli(args(tmp_path / "resumed"))
    assert len(calls) == 1, "the finished configuration was recomputed"
    assert without_seconds(tmp_path / "resumed") == without_seconds(tmp_path / "whole")
    assert not (tmp_path / ".resumed.resume").exists()


def _entry(name, kind, sigma, accuracy, psnr, ssim):
    from stochvit.eval.stats import Scores, interval
    from stochvit.suites.privacy import N_BOOT

    def summary(v):
        t = torch.tensor(v, dtype=torch.float64)
        return dict(mean=t.mean().item(), std=t.std().item())

    per = dict(psnr=psnr, ssim=ssim)
    attack = dict(psnr=summary(psnr), ssim=summary(ssim), per_image=per,
                  ci={k: list(interval(Scores.per_image(v), n_boot=N_BOOT)) for k, v in per.items()})
    return dict(run=name, name=name, kind=kind, block=1, defence="noise" if sigma else "none", sigma=sigma,
                accuracy=dict(mean=accuracy, std=0.0), attacks=dict(decoder=attack))


def test_matched_accuracy_comparison_is_paired_over_victims_with_a_verdict():
    from stochvit.suites.privacy import markdown, matched_utility, per_image_metrics

    gen = torch.Generator().manual_seed(0)
    base = (20 + 3 * torch.randn(60, generator=gen)).tolist()  # victims differ a lot in how well they invert
    ssim = (0.5 + 0.1 * torch.randn(60, generator=gen)).tolist()
    low, high = [v - 4 for v in base], [s - 0.2 for s in ssim]
    det = [_entry("det", "deterministic", 0.0, 0.9, base, ssim), _entry("det", "deterministic", 1.0, 0.7, low, high)]
    # at accuracy 0.8 the noise curve is half-way: per victim the mean of the two levels, 2 dB below the clean one
    halfway = [(a + b) / 2 for a, b in zip(base, low)]
    leaks_less = _entry("sto", "stochastic", 0.0, 0.8, [v - 1 for v in halfway], [v - 0.02 for v in ssim])
    same = _entry("sto2", "stochastic", 0.0, 0.8, halfway, [(a + b) / 2 for a, b in zip(ssim, high)])
    rows = matched_utility(det + [leaks_less, same], ["decoder"])
    by = {r["stochastic"]: r for r in rows}
    c = by["sto"]["psnr_comparison"]
    assert c["baseline_value"] == pytest.approx(by["sto"]["noise_psnr_at_matched_accuracy"])
    assert c["difference"] == pytest.approx(-1.0) and c["low"] == pytest.approx(-1.0) and c["high"] == pytest.approx(-1.0)
    assert c["verdict"] == "better" and by["sto"]["verdict"] == "stochastic leaks less"
    # identical to the matched noise point on every victim: no difference, however far the victims spread
    same_c = by["sto2"]["psnr_comparison"]
    assert same_c["difference"] == pytest.approx(0, abs=1e-9) and same_c["verdict"] == "no difference detected"
    assert by["sto2"]["verdict"].startswith("no difference detected")
    # a noisy per-victim gap: the paired interval is far narrower than the victims' spread
    gap = (-0.3 + 0.5 * torch.randn(60, generator=gen)).tolist()
    noisy = _entry("sto3", "stochastic", 0.0, 0.8, [v + g for v, g in zip(halfway, gap)], ssim)
    c3 = matched_utility(det + [noisy], ["decoder"])[0]["psnr_comparison"]
    assert c3["high"] - c3["low"] < 0.5 and "paired" in c3["interval"]
    result = dict(data="digits", runs=[], settings=dict(attacks=["decoder"], n_victims=60, n_aux=0),
                  entries=det + [leaks_less], matched_utility=rows)
    md = markdown(result)
    assert "PSNR diff [95% CI]" in md and "| -1.00 [-1.00, -1.00] |" in md and "percentile bootstrap over the victims" in md
    # the per-image values are those reconstruction_metrics summarises
    original = torch.rand(5, 1, 16, 16, generator=gen)
    recon = (original + 0.1 * torch.randn(5, 1, 16, 16, generator=gen)).clamp(0, 1)
    per, summary = per_image_metrics(recon, original), reconstruction_metrics(recon, original)
    for k in ("psnr", "ssim"):
        assert sum(per[k]) / 5 == pytest.approx(summary[k]["mean"], rel=1e-5)
