"""Precision choice: `auto` only picks bf16 where it is native; explicit bf16 on an emulating CPU warns; bf16 on a CPU
runs attention on the explicit path."""

import pytest
import torch

import stochvit.precision as P


def test_auto_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: False)
    assert P.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: True)
    assert P.resolve_precision("auto", cpu) == "bf16"
    assert P.resolve_precision("fp32", cpu) == "fp32"


def test_explicit_bf16_without_native_support_warns(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="emulated"):
        assert P.resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="precision"):
        P.resolve_precision("fp16", torch.device("cpu"))


def test_auto_keeps_narrow_models_in_fp32_on_a_bf16_cpu(monkeypatch):
    """bf16 gains the width-64 digits model 1.2x per step but cost its demo accuracy; width 192 gains 1.76x."""
    from stochvit.models import create_model

    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: True)
    cpu = torch.device("cpu")
    digits, tiny = create_model("vit_digits_patch2_8", stochastic=True), create_model("vit_tiny_patch4_32", stochastic=False)
    assert (P.model_width(digits), P.model_width(tiny)) == (64, 192)
    assert P.resolve_precision("auto", cpu, digits) == "fp32"
    assert P.resolve_precision("auto", cpu, tiny) == "bf16"
    assert P.resolve_precision("bf16", cpu, digits) == "bf16"  # an explicit choice is kept
    assert P.resolve_precision("auto", torch.device("cuda"), digits) == "bf16"
    with P.autocast("auto", cpu, digits):
        assert not torch.is_autocast_enabled("cpu")
    with P.autocast("auto", cpu, tiny):
        assert torch.is_autocast_enabled("cpu")


def test_cpu_bf16_autocast_runs_timm_attention_explicitly(monkeypatch):
    """The fused SDPA kernel is slow in bf16 on a CPU: autocast switches timm's attention to its explicit path for its
    duration only, the explicit path computes the same attention, and fp32 keeps the fused kernel."""
    from stochvit.models import create_model

    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: True)
    cpu = torch.device("cpu")
    model = create_model("vit_tiny_patch4_32", stochastic=False).eval()
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert len(attention) == len(model.blocks) and all(m.fused_attn for m in attention)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = model(x).float()
        with P.autocast("auto", cpu, model):
            assert not any(m.fused_attn for m in attention)
            explicit = model(x).float()
        assert all(m.fused_attn for m in attention)
        with P.autocast("fp32", cpu, model):
            assert all(m.fused_attn for m in attention)
    assert torch.allclose(explicit, fused, atol=0.05 * fused.abs().max().item())  # bf16 rounding only
    with pytest.raises(RuntimeError), P.autocast("bf16", cpu, model):
        raise RuntimeError("a failing step")
    assert all(m.fused_attn for m in attention)  # restored on errors too


def test_training_records_the_precision_auto_chose(monkeypatch, tmp_path):
    import json

    from stochvit.cli import main

    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: True)
    assert main(["train", "--epochs", "1", "--train-limit", "64", "--eval-samples", "1", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["precision"] == "fp32"
