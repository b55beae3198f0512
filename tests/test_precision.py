"""Precision choice: `auto` only picks bf16 where it is native; explicit bf16 on an emulating CPU warns."""

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
