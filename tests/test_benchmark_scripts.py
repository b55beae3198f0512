"""The measurement scripts run end to end at toy size and write valid reports (no speed thresholds: timings are not
properties of the code)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _main(monkeypatch, script: str, argv: list[str]) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", [script, *argv])
    module = __import__(script.removesuffix(".py"))
    module.main()


def test_throughput_scale_sections_quick(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    out = tmp_path / "t.json"
    _main(monkeypatch, "throughput.py", ["--sections", "all", "--quick", "--out", str(out)])
    assert torch.get_num_threads() == threads  # the threads section restores the caller's setting
    r = json.loads(out.read_text())
    assert {"peak", "gemms", "trainer", "layer", "weights", "threads", "orthogonal", "profile"} <= set(r)
    t = r["trainer"]
    assert t["stochastic"] and t["images_per_s"] > 0 and math.isfinite(t["ratio_to_limit"])
    assert t["one_batch_images_per_s"] > 0 and t["loader_images_per_s"] > t["images_per_s"]
    assert abs(t["gflop_per_image_counted"] - 1.04) < 0.05  # the cost of a vit_tiny_patch4_32 training step
    for method in ("blocks", "alternating"):
        assert set(r["layer"][method]["explicit"]) == {"plain", "stochastic", "stochastic-fused"}
    assert r["layer"]["blocks"]["explicit"]["plain"]["ratio"]["median"] == 1.0
    assert {row["model"] for row in r["threads"]["rows"]} == {"vit_digits_convstem_8", "vit_tiny_patch4_32"}
    assert r["orthogonal"]["train"]["diagonal"]["ratio"]["median"] == 1.0
    # the replayed matmuls are the step's: forward + 2x backward of every linear (24 N D^2 per block) and of the
    # explicit attention's two bmm (4 N^2 D), and the head; the 2048^3-style count of FLOPs in closed form
    depth, n, d, classes = 6, 65, 192, 10
    assert r["gemms"]["gflop_per_image"] == pytest.approx(3 * (depth * (24 * n * d**2 + 4 * n**2 * d) + 2 * d * classes) / 1e9)
    assert r["gemms"]["gflop_per_s"] > 0 and "**matmuls alone**" in out.with_suffix(".md").read_text()
    if "rows" in r["weights"]:  # CPUs with native bf16
        rows = r["weights"]["rows"]
        assert rows["autocast"]["ratio"]["median"] == 1.0 and rows["bf16-weights"]["images_per_s"] > 0
    copies = r["profile"]["copies"]  # by autograd node, largest first; the layer's backward rebuilds no view's base
    assert copies and all(a["megabytes"] >= b["megabytes"] for a, b in zip(copies, copies[1:]))
    assert not {c["autograd_node"] for c in copies} & {"CopySlices", "AsStridedBackward0"}
    top = r["profile"]["top"]
    assert top and all(a["self_cpu_ms_per_step"] >= b["self_cpu_ms_per_step"] for a, b in zip(top, top[1:]))
    md = out.with_suffix(".md").read_text()
    assert "| method | attention | layer |" in md and "fused (set_fused)" in md and "| op | self CPU ms / step |" in md
    assert "| op | dtypes | autograd node | calls | MB |" in md


def test_inplace_backward_times_the_old_and_the_fixed_layer(tmp_path, monkeypatch):
    out = tmp_path / "ip.json"
    _main(monkeypatch, "inplace_backward.py", ["--rounds", "1", "--batch-size", "4", "--out", str(out)])
    r = json.loads(out.read_text())
    assert set(r["rows"]) == {"plain", "stochastic", "stochastic-inplace"} and r["rows"]["plain"]["ratio"]["median"] == 1.0
    assert r["fix_speedup"]["median"] > 0


def test_suite_times_quick(digits_runs, tmp_path, monkeypatch):
    out = tmp_path / "s.json"
    _main(monkeypatch, "suite_times.py", [
        "--run", str(digits_runs["stochastic"]), "--baseline", str(digits_runs["deterministic"]), "--images", "20",
        "--robustness-images", "4", "--steps", "1", "--eot", "1", "--queries", "2", "--decoder-steps", "2",
        "--opt-steps", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["images"] == 20 and set(r["suites"]) == {"evaluate", "calibration", "robustness", "privacy"}
    for row in r["suites"].values():
        assert row["seconds"] > 0
    for name in ("robustness", "privacy"):  # the defaults' budgets are larger: the extrapolation cannot shrink a time
        assert r["suites"][name]["default_seconds"] >= r["suites"][name]["seconds"] * 0.999
    import stochvit.runs
    import stochvit.suites.evaluate

    assert stochvit.suites.evaluate.data_for is stochvit.runs.data_for  # the suites' data loading is restored
    assert "| robustness |" in out.with_suffix(".md").read_text()


def test_federated_campaign_runs_interrupted_runs_first_and_stops_at_the_first_failure(tmp_path, monkeypatch):
    """`benchmarks/federated.py --parallel 2`: the scheduling alone (each real run is a Flower simulation, which
    tests/test_federated.py covers)."""
    import argparse
    import threading
    import time

    monkeypatch.syspath_prepend(str(BENCH))
    federated = __import__("federated")
    a = argparse.Namespace(root=tmp_path, parallel=2)
    jobs = [("iid", m, s) for s in (1, 2) for m in ("deterministic", "stochastic")]
    interrupted = federated.run_dir("iid", "deterministic", 2, a)
    interrupted.mkdir()
    (interrupted / federated.CHECKPOINT).write_bytes(b"")
    started, lock = [], threading.Lock()

    def fake_run(partition, model, seed, _a, fail=None):
        with lock:
            started.append((partition, model, seed))
        if (model, seed) == fail:
            raise RuntimeError("a run failed")
        return dict(model=model, seed=seed)

    monkeypatch.setattr(federated, "run", fake_run)
    results = federated.run_all(jobs, a)
    assert [(r["model"], r["seed"]) for r in results] == [(m, s) for _, m, s in jobs]  # reported in the jobs' order
    assert started[0] == ("iid", "deterministic", 2)  # the interrupted run resumes first
    assert sorted(started) == sorted(jobs)

    started.clear()
    both_started = threading.Barrier(2, timeout=10)

    def failing_run(partition, model, seed, _a):
        if seed == 1:  # the first two jobs run side by side; the first fails once the second has started,
            both_started.wait()  # and the second takes a while longer (as a real run would)
            if model == "stochastic":
                time.sleep(0.5)
        return fake_run(partition, model, seed, _a, fail=("deterministic", 1))

    monkeypatch.setattr(federated, "run", failing_run)
    with pytest.raises(RuntimeError, match="a run failed"):
        federated.run_all(jobs, argparse.Namespace(root=tmp_path / "fresh", parallel=2))
    assert sorted(started) == sorted(jobs[:2])  # no run started after the failure
