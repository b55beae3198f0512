"""Ecosystem (issue 18): packaging metadata, runs that plain timm loads, timm's mlp_layer hook, CSV metrics, model cards."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import stochvit

ROOT = Path(__file__).resolve().parents[1]


def test_packaging_license_py_typed_single_version_and_bounds():
    assert "MIT License" in (ROOT / "LICENSE").read_text() and "stochvit developers" in (ROOT / "LICENSE").read_text()
    assert (Path(stochvit.__file__).parent / "py.typed").is_file()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta = project["project"]
    # one source for the version: pyproject reads stochvit.__version__, the installed metadata agrees with it
    assert "version" not in meta and meta["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "stochvit.__version__"}
    assert importlib.metadata.version("stochvit") == stochvit.__version__
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["stochvit"]
    deps = {d.split(">")[0].split("<")[0].split("=")[0]: d for d in meta["dependencies"]}
    assert "<" not in deps["torch"] and "<" not in deps["torchvision"], "no upper caps on torch/torchvision"
    assert deps["timm"].replace(" ", "").endswith(",<2")
    assert meta["requires-python"] == ">=3.11"  # flwr 1.42 needs 3.11
    assert any(d.startswith("tomli_w") for d in meta["optional-dependencies"]["federated"])  # suites/federated.py imports it
