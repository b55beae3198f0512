"""Federated learning on Flower: partitions, the app manifest, what travels, FedAvg arithmetic, and real runs
(a Ray simulation through `stochvit federated`, a loopback deployment with a SuperNode killed mid-run).

The real runs start Flower processes; each test gives them a unique environment marker and checks afterwards
that no process carrying it is left (Flower children and Ray workers inherit the environment).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord  # noqa: E402

from stochvit.cli import main as cli_main  # noqa: E402
from stochvit.data import load_data  # noqa: E402
from stochvit.errors import UserError  # noqa: E402
from stochvit.federated import task  # noqa: E402
from stochvit.federated.launch import APP_DIR, Federation, processes_with  # noqa: E402
from stochvit.federated.partition import dirichlet, histogram, iid, label_skew, parse_partition, partition, save_summary  # noqa: E402
from stochvit.federated.settings import from_run_config, to_run_config  # noqa: E402
from stochvit.runs import (
    load_run,  # noqa: E402
    read_metrics,  # noqa: E402
    run_config,  # noqa
)
from stochvit.train import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARKER = "STOCHVIT_FED_TEST"


@pytest.fixture
def marker(monkeypatch) -> str:
    """A unique value in this test's environment, inherited by every process it starts."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, value)
    return value


def leftovers(value: str) -> list[int]:
    """PIDs (other than ours) whose environment carries MARKER=value."""
    return processes_with(f"{MARKER}={value}")


@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    return load_data("digits").train.labels.numpy()


# -- partitions ---------------------------------------------------------------------------------
def test_dirichlet_smaller_alpha_more_skew_every_sample_once(digits_labels):
    n = len(digits_labels)
    skews = {}
    for alpha in (0.1, 0.5, 5.0, 100.0):
        per_seed = []
        for seed in range(3):
            shards = dirichlet(digits_labels, 5, alpha, seed)
            joined = np.concatenate(shards)
            assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))  # every sample exactly once
            assert min(len(s) for s in shards) >= 2
            per_seed.append(label_skew(histogram(digits_labels, shards, 10)))
        skews[alpha] = float(np.mean(per_seed))
    assert skews[0.1] > skews[0.5] > skews[5.0] > skews[100.0]
    assert skews[0.1] > 0.4 and skews[100.0] < 0.1
    iid_skew = label_skew(histogram(digits_labels, iid(n, 5, 0), 10))
    assert iid_skew < 0.1


def test_partitions_are_seeded_and_reject_bad_specs(digits_labels):
    a = partition(digits_labels, 4, "dirichlet:0.5", seed=1)
    b = partition(digits_labels, 4, "dirichlet:0.5", seed=1)
    c = partition(digits_labels, 4, "dirichlet:0.5", seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))
    sizes = [len(s) for s in iid(len(digits_labels), 4, 0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(digits_labels)
    assert parse_partition("dirichlet:0.1") == ("dirichlet", 0.1, False)
    for bad in ("dirichlet:0", "dirichlet:-1", "dirichlet:x", "skewed", "dirichlet"):
        with pytest.raises(UserError):
            parse_partition(bad)
    with pytest.raises(UserError):
        iid(3, 5, 0)


def test_partition_summary_json_and_png(tmp_path, digits_labels):
    shards = partition(digits_labels, 3, "dirichlet:0.5", seed=0)
    s = save_summary(tmp_path, digits_labels, shards, [str(i) for i in range(10)], "dirichlet:0.5", 0)
    on_disk = json.loads((tmp_path / "partition.json").read_text())
    assert on_disk == json.loads(json.dumps(s))
    assert np.array(on_disk["counts"]).sum() == len(digits_labels) and on_disk["sizes"] == [len(x) for x in shards]
    assert (tmp_path / "partition.png").stat().st_size > 1000


# -- app manifest, run config, what travels ---------------------------------------------------------
def test_app_manifest_defaults_match_settings():
    import tomli

    manifest = tomli.loads((APP_DIR / "pyproject.toml").read_text())
    app = manifest["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "stochvit.federated.server_app:app",
                                 "clientapp": "stochvit.federated.client_app:app"}
    assert app["config"] == to_run_config(TrainConfig(epochs=1, batch_size=64, lr=3e-3), {})
    assert "federations" not in manifest["tool"]["flwr"]  # legacy section: flwr run would rewrite the file


def test_app_manifest_lists_the_layer_keys_of_layer_config():
    """The manifest must list its keys statically; the stochastic layer's are LayerConfig's fields and defaults."""
    import tomli

    from stochvit.defaults import DEFAULT_LAYER
    from stochvit.federated.settings import STOCHASTIC_KEYS

    config = tomli.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert STOCHASTIC_KEYS == tuple(DEFAULT_LAYER.to_dict())
    layer = {k: config[k] for k in STOCHASTIC_KEYS}
    assert layer == {**DEFAULT_LAYER.to_dict(), "blocks": ""}  # TOML has no null: "" means every block


def test_run_config_round_trip_and_errors():
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-3, stochastic=dict(distribution="gaussian", blocks=[0, 2]), train_limit=500)
    cfg.validate()
    rc = to_run_config(cfg, {"clients": 4, "partition": "dirichlet:0.1"})
    back, fed = from_run_config(rc)
    assert back == cfg and fed["clients"] == 4 and fed["partition"] == "dirichlet:0.1"
    det, _ = from_run_config({**rc, "stochastic": False})
    assert det.stochastic is None
    for bad in ({"partition": "dirichlet:0"}, {"min-clients": 5, "clients": 3}, {"kind": "sparse"}, {"no-such-key": 1},
                {"server-momentum": 1.0}, {"server-lr": 0.0}):
        with pytest.raises(UserError):
            from_run_config({**rc, **bad})


def test_fault_injection_is_a_mod_on_the_train_handler_set_by_the_run_config():
    """`fail-from-round` (a testing hook) travels in the run config and fails training from that round on, through
    the real ClientApp; without the key, or before that round, the handler runs."""
    from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

    from stochvit.federated import client_app

    def message(server_round: int) -> Message:  # as the SuperNode delivers it (outside a Flower process)
        metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="",
                            created_at=0.0, ttl=60.0, message_type="train")
        return Message(RecordDict({"config": ConfigRecord({"server-round": server_round})}), metadata=metadata)

    def context(**run_config) -> Context:
        return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)

    with pytest.raises(RuntimeError, match="fail-from-round=2: this client fails from round 2 on"):
        client_app.app(message(2), context(**{"fail-from-round": 2}))
    handled = []
    for server_round, settings in ((1, {"fail-from-round": 2}), (5, {"fail-from-round": 0}), (5, {})):
        client_app.fail_from_round(message(server_round), context(**settings), lambda m, c: handled.append(m))
    assert len(handled) == 3
    rc = to_run_config(TrainConfig(epochs=1, batch_size=64, lr=3e-3), {"fail-from-round": 3})
    _, fed = from_run_config(rc)
    assert rc["fail-from-round"] == 3 and "fail-from-round" not in fed  # not a setting: never in config.json
    with pytest.raises(UserError, match="fail-from-round=-1"):
        from_run_config({**rc, "fail-from-round": -1})


def test_a_resume_accepts_settings_added_later_and_names_what_changed():
    """A run started before a setting existed still resumes (the new key comes at its default); a changed or a lost
    setting is named."""
    from stochvit.federated.server_app import settings_changed

    stored = {"train": {"lr": 5e-4, "stochastic": {"low": 0.5}}, "federated": {"rounds": 32}}
    later = {"train": {"lr": 5e-4, "stochastic": {"low": 0.5}, "a_new_setting": 1}, "federated": {"rounds": 32}}
    assert settings_changed(stored, later) == []
    changed = {"train": {"lr": 1e-3, "stochastic": {"low": 0.0}}, "federated": {}}
    assert settings_changed(stored, changed) == ["train.lr", "train.stochastic.low", "federated.rounds (missing)"]


def test_waiting_asks_flwr_for_the_status_ever_less_often_and_at_once_when_the_files_say_done(tmp_path, monkeypatch):
    """`flwr ls` starts an interpreter (over a second of CPU): a run of hours must not ask every 15 s."""
    clock = [0.0]
    fake_time = SimpleNamespace(monotonic=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setattr("stochvit.federated.launch.time", fake_time)  # a virtual clock: the test takes no real time
    fed = Federation(tmp_path)
    fed.ray_tmp.rmdir()
    asked: list[float] = []

    def status(_run_id: int, finish_at: float) -> str:
        asked.append(clock[0])
        return "finished:completed" if clock[0] >= finish_at else "running"

    monkeypatch.setattr(fed, "status", lambda run_id: status(run_id, 1000))
    assert fed.wait(1, timeout=2000) == "finished:completed"
    gaps = np.diff([0.0] + asked)
    assert gaps[:20] == pytest.approx([15] * 20, abs=1)  # the first 5 minutes: every 15 s
    assert gaps[20] == pytest.approx(22.5, abs=1) and gaps[21] == pytest.approx(33.75, abs=1)  # then 1.5x per check
    assert max(gaps) == pytest.approx(120, abs=1) and len(asked) < 30  # capped: 1000 s at 15 s would be 66 checks
    clock[0], asked[:] = 0.0, []
    monkeypatch.setattr(fed, "status", lambda run_id: status(run_id, 0))
    assert fed.wait(1, timeout=2000, done=lambda: clock[0] >= 5) == "finished:completed"
    assert asked == [pytest.approx(5, abs=1)]  # the files said done: asked at once, not at 15 s


@pytest.mark.parametrize("stochastic", [True, False])
def test_only_learned_weights_travel(stochastic):
    cfg, fed = from_run_config({"stochastic": stochastic})
    config = run_config(cfg, load_data("digits"))
    net = task.initial_model(config).net
    record = ArrayRecord(net.state_dict())
    learned = {n for n, _ in net.named_parameters()} | {n for n, _ in net.named_buffers()}
    assert set(record.keys()) == learned
    assert not any("stochastic" in k for k in record.keys())  # the layers hold no state: draws never leave a client
    other, _ = from_run_config({"stochastic": not stochastic})
    assert set(ArrayRecord(task.initial_model(run_config(other, load_data("digits"))).net.state_dict()).keys()) == learned


def test_checkpoint_round_trip_keeps_fedavgm_momentum_in_the_model_key_order(tmp_path):
    """safetensors stores keys sorted; FedAvgM's momentum buffer is a list in the model's state-dict order."""
    from stochvit.federated.server_app import TrackedFedAvgM, load_checkpoint, save_checkpoint

    cfg, _ = from_run_config({"stochastic": True})
    net = task.initial_model(run_config(cfg, load_data("digits"))).net
    state = net.state_dict()
    assert list(state) != sorted(state)  # otherwise this test could not tell the orders apart
    arrays = ArrayRecord(state)
    strategy = TrackedFedAvgM(server_momentum=0.9)
    strategy.momentum_vector = [np.full(a.shape, i, dtype=np.float32) for i, a in enumerate(arrays.to_numpy_ndarrays())]
    save_checkpoint(tmp_path, 7, arrays, strategy)
    done, weights, momentum = load_checkpoint(tmp_path, list(state))
    assert done == 7 and all(torch.equal(weights[k], v) for k, v in state.items())
    assert len(momentum) == len(state) and all(np.array_equal(m, s) for m, s in zip(momentum, strategy.momentum_vector))
    strategy.momentum_vector = None  # plain FedAvg: no buffer stored, none restored
    save_checkpoint(tmp_path, 8, arrays, strategy)
    assert load_checkpoint(tmp_path, list(state))[::2] == (8, None)


def test_cli_rejects_bad_settings_before_starting_anything(tmp_path, capsys):
    for args in (["--partition", "dirichlet:0"], ["--partition", "shard:0"], ["--clients", "2", "--min-clients", "3"],
                 ["--fraction-train", "0"], ["--server-momentum", "-0.1"]):
        out = tmp_path / "never"
        assert cli_main(["federated", "--out", str(out), *args]) == 2
        assert not out.exists()
    assert "federated: error:" in capsys.readouterr().err


# -- real runs ------------------------------------------------------------------------------------
def _federated(out: Path, *args: str) -> int:
    return cli_main(["federated", "--out", str(out), "--eval-samples", "2", *args])


@pytest.mark.slow
def test_simulation_end_to_end(tmp_path, marker):
    out = tmp_path / "fed"
    pytest.importorskip("tensorboard")
    assert _federated(out, "--clients", "2", "--rounds", "2", "--partition", "dirichlet:0.5", "--cpus-per-client", "1",
                      "--log", "tensorboard") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()  # the rounds' rows as scalars, step = round - 1
    assert [(e.step, e.value) for e in events.Scalars("val/nll")] == [(r["round"] - 1, float(np.float32(r["val_nll"])))
                                                                      for r in rows]
    for r in rows:
        assert r["clients_replied"] == 2 and r["clients_failed"] == 0
        assert 0 <= r["val_accuracy"] <= 1 and r["val_nll"] > 0 and 0 <= r["val_ece"] <= 1
        assert 0 <= r["clients_eval_accuracy"] <= 1
    for name in ("config.json", "model.safetensors", "summary.json", "rounds.png", "curves.png", "partition.json",
                 "partition.png", "args.yaml"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["federated"]["rounds_with_fewer_clients"] == []
    run = load_run(out)  # a normal run directory: the other suites accept it
    assert run.config["stochastic"] is not None and run.config["federated"]["partition"] == "dirichlet:0.5"
    assert cli_main(["evaluate", str(out), "--samples", "2"]) == 0
    assert leftovers(marker) == []


@pytest.mark.slow
def test_one_round_fedavgm_steps_along_the_weighted_average_of_client_updates(tmp_path, marker):
    """Server: 1 round, 2 clients in Ray actors. Here: the same two local updates in-process, averaged by num-examples.

    With server lr 1.5 and momentum 0.9, round 1 moves the global model 1.5 times the averaged update (the momentum
    buffer starts as that update); server lr 1.0 and momentum 0 would give the plain FedAvg average."""
    out = tmp_path / "fed1"
    server_lr = 1.5
    assert _federated(out, "--clients", "2", "--rounds", "1", "--fraction-evaluate", "0", "--seed", "3",
                      "--server-lr", str(server_lr), "--server-momentum", "0.9") == 0
    assert leftovers(marker) == []
    run = load_run(out)
    config = run.config
    start = ArrayRecord(task.initial_model(config).net.state_dict())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ClientApp
    try:
        updates = [task.local_update(config, start, {"partition-id": i, "num-partitions": 2}, 1) for i in range(2)]
    finally:
        torch.set_num_threads(threads)
    weights = torch.tensor([float(m["num-examples"]) for _, m in updates])
    weights /= weights.sum()
    final = run.model.net.state_dict()
    first = updates[0][0].to_torch_state_dict()
    for key, value in final.items():
        average = sum(w * u.to_torch_state_dict()[key] for w, (u, _) in zip(weights, updates))
        initial = start.to_torch_state_dict()[key]
        expected = initial + server_lr * (average - initial)
        if value.is_floating_point():
            torch.testing.assert_close(value, expected, atol=2e-5, rtol=1e-4)
        else:  # the stem's BatchNorm step counter: the server's step comes back as the buffer's integer type
            assert (value - expected).abs().max() < 1, key
    assert any(not torch.equal(final[k], first[k]) for k in final)  # the step is not one client's model


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_last_round_like_an_uninterrupted_one(tmp_path, marker):
    """Round 2 fails (the fault-injection hook): the directory keeps round 1's row and checkpoint; --resume runs
    round 2 and finishes. The clients' seeds and learning rate depend on the round only, so the resumed run ends with
    the weights and rows of the same two rounds run without interruption."""
    args = ("--clients", "2", "--rounds", "2", "--fraction-evaluate", "0", "--seed", "5", "--train-limit", "200")
    broken, whole = tmp_path / "broken", tmp_path / "whole"
    assert _federated(broken, *args, "--fail-from-round", "2") == 2
    assert (broken / "federated-checkpoint.safetensors").exists() and not (broken / "summary.json").exists()
    assert [r["round"] for r in read_metrics(broken)] == [1]
    assert cli_main(["federated", "--resume", str(broken), "--rounds", "3"]) == 2  # its own settings only
    assert _federated(broken, *args) == 2  # not a new run into it either
    assert cli_main(["federated", "--resume", str(broken), "--cpus-per-client", "1"]) == 0
    assert not (broken / "federated-checkpoint.safetensors").exists()  # finished: no checkpoint left behind
    assert _federated(whole, *args) == 0
    assert leftovers(marker) == []
    resumed, reference = load_run(broken).model.net.state_dict(), load_run(whole).model.net.state_dict()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    keys = ("round", "train_loss", "val_accuracy", "val_nll", "val_ece")
    assert [{k: r[k] for k in keys} for r in read_metrics(broken)] == [{k: r[k] for k in keys} for r in read_metrics(whole)]


@pytest.mark.slow
def test_loopback_deployment_survives_a_killed_supernode(tmp_path, marker):
    """3 SuperNodes, minimum 2; SuperNode 2 gets SIGKILL while training in round 1 (its ClientApp is running).

    The SuperLink declares it unavailable once its heartbeats stop (~60 s in flwr 1.42, not configurable), round 1
    aggregates the two replies, round 2 samples the two live nodes, and the run reports both rounds as reduced."""
    out = tmp_path / "loop"
    cmd = ["bash", str(ROOT / "scripts" / "federated_loopback.sh"), "--out", str(out), "--workdir", str(tmp_path / "work"),
           "--nodes", "3", "--min-clients", "2", "--rounds", "2", "--kill-node", "2", "--kill-after-round", "0",
           "--timeout", "400", "--run-config", "fraction-evaluate=0.0 eval-samples=2 batch-size=128"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr + (out / "logs" / "serverapp.log").read_text()[-3000:]
    assert "SIGKILL SuperNode 2" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = (rows[0]["clients_sampled"], rows[0]["clients_replied"], rows[0]["clients_failed"])
    # (2, 2, 0): round 1 sampled two SuperNodes without the victim (seen once in a full-suite run); still a reduced round
    assert first in {(3, 2, 1), (2, 2, 0)}, first
    assert (rows[1]["clients_sampled"], rows[1]["clients_replied"], rows[1]["clients_failed"]) == (2, 2, 0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["federated"]["rounds_with_fewer_clients"] == [1, 2]
    assert load_run(out).config["federated"]["min-clients"] == 2
    assert leftovers(marker) == []


def test_relative_data_paths_reach_the_flower_apps_absolute(tmp_path, monkeypatch):
    """The ServerApp and ClientApps run in Flower's own working directory, so a relative imagefolder path would break."""
    from stochvit.cli import build_parser
    from stochvit.cli.federated import settings_from_args
    from stochvit.federated.settings import from_run_config
    from stochvit.suites.federated import federated_run_config

    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    a = build_parser().parse_args(["federated", "--data", "imagefolder:imgs:classes=0-1", "--data-dir", "tv",
                                   "--out", "out"])
    cfg, _ = from_run_config(federated_run_config(settings_from_args(a)))
    assert cfg.data == f"imagefolder:{tmp_path / 'imgs'}:classes=0-1"
    assert cfg.data_dir == str(tmp_path / "tv")


# -- failures and interruptions: one line, nothing half-written, nothing left running --------------------------
def _clean_path() -> str:
    """PATH without this interpreter's bin directory or pyenv shims: as cron, pipx or CI run `/venv/bin/stochvit`."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != bin_dir and "shims" not in p)
    import shutil

    assert shutil.which("flower-superexec", path=path) is None, "precondition: flwr's scripts are not on PATH"
    return path


def _cli(out: Path, tmp: Path, *args: str, **env: str) -> subprocess.Popen:
    """`stochvit federated` by its full path, in its own session, temp folders under `tmp` (short: Ray's sockets)."""
    env = {**os.environ, "PATH": _clean_path(), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", **env}
    cmd = [str(Path(sys.executable).with_name("stochvit")), "federated", "--out", str(out), "--eval-samples", "2",
           "--clients", "2", "--train-limit", "200", "--fraction-evaluate", "0", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """The CLI starts with Ctrl-C's default disposition, as from a terminal, even when this test runs in a background
    job (`nohup ... &`), whose SIGINT is ignored and would be inherited: Python keeps an inherited SIG_IGN."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _gone(marker_value: str, tmp: Path, seconds: float = 90) -> tuple[list[int], list[str]]:
    """Wait until no marked process and no temp folder is left; returns what is left after `seconds`."""
    import time

    deadline = time.monotonic() + seconds
    while (left := (leftovers(marker_value), sorted(p.name for p in tmp.iterdir()))) != ([], []) \
            and time.monotonic() < deadline:
        time.sleep(1)
    return left


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture
def short_tmp():
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="svt", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_a_round_below_min_clients_fails_the_run_in_one_line_without_activated_env(tmp_path, marker, short_tmp):
    """Run by full path with flwr's scripts off PATH; every client fails from round 2: exit 2, the round named,
    the client's error quoted, round 1 kept in --out for --resume, no process or temp folder left."""
    out = tmp_path / "fed"
    proc = _cli(out, short_tmp, "--rounds", "3", "--fail-from-round", "2")  # the ClientApp's testing hook
    stdout, stderr = proc.communicate(timeout=600)
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[-1].startswith("stochvit federated: error: federated run"), lines[-3:]
    assert "round 2 failed: 0 of 2 sampled clients replied, fewer than --min-clients 2" in lines[-1], lines[-1]
    assert "fail-from-round=2: this client fails" in lines[-1], lines[-1]
    assert f"keeps its last finished round: stochvit federated --resume {out}" in lines[-1], lines[-1]
    assert [r["round"] for r in read_metrics(out)] == [1] and (out / "federated-checkpoint.safetensors").exists()
    assert not (out / "summary.json").exists() and not (out / "model.safetensors").exists()
    assert "round   1/3" in stdout  # round 1 ran with both clients
    assert _gone(marker, short_tmp) == ([], [])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "sigkill"])
def test_interrupting_the_cli_leaves_no_process_and_no_temp_folder(tmp_path, marker, short_tmp, sig):
    """Ctrl-C (SIGINT to the CLI's process group, as a terminal sends it), SIGTERM (`kill PID`: the CLI alone) or
    SIGKILL of the CLI while Ray runs the clients: every Flower and Ray process ends (Ray's agents ignore SIGTERM), the
    temp folders go, and a Ctrl-C or SIGTERM leaves only the logs in the run directory, or, after a finished round,
    a run that --resume continues."""
    import time

    out = tmp_path / "fed"
    proc = _cli(out, short_tmp, "--rounds", "1000")  # never finishes first, however late the signal (50 did under load)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # until Ray's daemons run
        if any(b"raylet" in _cmdline(p) for p in leftovers(marker)):
            break
        time.sleep(1)
    else:
        pytest.fail(f"Ray did not start: {proc.communicate()[1][-2000:]}")
    time.sleep(5)  # the simulation's actors are starting
    (os.killpg if sig == signal.SIGINT else os.kill)(proc.pid, sig)  # our own child (and its group), by id
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}.get(sig, -signal.SIGKILL), stderr[-2000:]
    if sig != signal.SIGKILL:
        said = "interrupted" if sig == signal.SIGINT else "terminated"
        assert stderr.strip().splitlines()[-1] == f"stochvit federated: {said}", stderr[-2000:]
        names = {p.name for p in out.iterdir()}
        assert names == {".lock", "logs"} or ({"config.json", "federated-checkpoint.safetensors"} <= names
                                              and "summary.json" not in names), sorted(names)
    assert _gone(marker, short_tmp) == ([], [])


def test_a_second_federated_writer_is_refused_by_the_lock(tmp_path, capsys):
    from stochvit.runs import run_lock

    out = tmp_path / "fed"
    with run_lock(out):
        assert cli_main(["federated", "--out", str(out), "--clients", "2", "--rounds", "1"]) == 2
    assert "in use by another stochvit process" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [".lock"]
