"""benchmarks/gpu_study.sh at its toy size on CPU (so that the first GPU run does not fail on a typo), and its spec."""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_png, write_file

from stochvit.suites.study_runs import load_spec

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_spec_is_the_full_protocol_budget():
    spec = load_spec(ROOT / "benchmarks" / "studies" / "cifar10-gpu.toml")
    assert len(spec.seeds) >= 3 and set(spec.methods) == {"deterministic", "stochastic"}
    cfg = spec.config("stochastic", 0)
    assert cfg.train_limit is None and cfg.split_seed == 0 and cfg.epochs >= 100 and cfg.compile
    assert cfg.data.endswith("shared/data/cifar10-jpeg") and cfg.augment == "crop-flip"
    from stochvit.scale import scaled_lr

    assert cfg.lr == pytest.approx(scaled_lr(1e-3, 128, cfg.batch_size), rel=1e-3), "the stated sqrt rule"


@pytest.mark.slow
def test_gpu_study_script_runs_at_toy_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b", "c"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(30):
            img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
            write_file(str(tmp_path / "data" / c / f"{i}.png"), encode_png(img))
    env = {**os.environ, "GPU_STUDY_SIZE": "toy", "GPU_STUDY_DATA": f"imagefolder:{tmp_path / 'data'}",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_study.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:] + (out / "study.log").read_text()[-2000:]
    spec = tomllib.loads((out / "spec.toml").read_text())
    assert spec["train"]["data"] == f"imagefolder:{tmp_path / 'data'}" and spec["out"] == str(out)
    timings = json.loads((out / "timings.json").read_text())
    assert timings["study_exit_status"] == 0 and not timings["stopped_by_budget"]
    assert sorted(timings["runs"]) == [f"{m}-seed{s}" for m in ("deterministic", "stochastic") for s in (0, 1)]
    assert all(r["finished"] and r["epochs"] == 1 and r["last_epoch_images_per_s"] > 0 for r in timings["runs"].values())
    assert "stochastic" in (out / "report" / "study.md").read_text()
    assert (out / "device.txt").read_text().strip()
