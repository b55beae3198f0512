"""Start a simulation SuperLink as a separate process, submit the stochvit app with `flwr run`, stop it by PID.

Used by `stochvit federated` (nodes are Ray actors in the simulation); scripts/federated_loopback.sh does the
same with real `flower-supernode` processes (docs/federated.md). Facts this relies on (flwr 1.42):
  * one HTTP port per SuperLink serves the Fleet, Control and Runtime APIs; each SuperNode needs its own port;
  * `flwr run` returns once the run is submitted; its state comes from `flwr ls <conn> --run-id ID --format json`
    (`flwr run --stream` exits 0 even when the run failed);
  * without FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 every run tries to `uv sync` (downloads torch).
The SuperLink starts in its own session (process group) and dies with us (PR_SET_PDEATHSIG); what it spawns in
sessions of its own (the simulation process with the ServerApp, Ray's daemons) carries our FLWR_HOME or Ray temp dir,
and `close()` ends it on every exit path, or, after a SIGKILL of this process, the watchdog (`stochvit.procs`).
Children find flwr's executables on PATH: this interpreter's bin directory comes first there, so a virtual
environment run by its full path (pipx, cron, CI) works without being activated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from ..procs import (
    child_dies_with_parent,
    cleanup,
    processes_with,  # noqa: F401 (re-exported: the tests look for leftovers with it)
    signal_group,
    start_watchdog,
    stop_watchdog,
)

APP_DIR = Path(__file__).resolve().parent / "app"
CONNECTION = "stochvit"
FINISHED = "finished:completed"

# the ServerApp's per-round checkpoint in the run directory (server_app.save_checkpoint); named here, where the CLI side
# looks for it, so that an interrupted run is told apart without importing torch in the interrupt path
CHECKPOINT = "federated-checkpoint.safetensors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(home: Path, ray_tmp: Path | None = None) -> dict[str, str]:
    """Environment for flwr processes: own FLWR_HOME, no telemetry, update checks or `uv sync`, one thread per node."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)  # flower-superlink starts flower-superexec from PATH
    env["PATH"] = os.pathsep.join([bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]])
    env.update(FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    return env


def last_error_line(log: Path) -> str:
    """The last line of a Flower log that names an error (else its last line): what to print when a process dies."""
    try:
        lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if re.search(r"error|exception|failed|not found", line, re.IGNORECASE)]
    return (errors or lines or [""])[-1][:300]


def _binary(name: str) -> str:
    """flwr's console scripts, preferring the ones next to this interpreter."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise UserError(f"{name} not found: install the federated extra (pip install -e '.[federated]')")
    return found


class Federation:
    """A simulation SuperLink on 127.0.0.1 (a process group we started); a context manager that stops it by PID.

    `flwr run` against it starts a simulation (ServerApp plus N ClientApp nodes as Ray actors) in a child process.
    """

    def __init__(self, workdir: Path, logs: Path | None = None) -> None:
        self.workdir = Path(workdir)
        self.home = self.workdir / "flwr-home"
        self.logs = Path(logs) if logs else self.workdir / "logs"
        # Ray's socket paths must stay short (AF_UNIX limit): keep its temp dir directly under /tmp
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="svray"))
        self.env = flwr_env(self.home, self.ray_tmp)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.watchdog: subprocess.Popen | None = None

    def start(self) -> Federation:
        for d in (self.home, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{self.address}"\ninsecure = true\n')
        self.watchdog = start_watchdog(f"FLWR_HOME={self.home}", str(self.ray_tmp), [str(self.ray_tmp), str(self.workdir)],
                                       in_cwd=str(self.workdir))
        argv = [_binary("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        with open(self.logs / "superlink.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                                         start_new_session=True, preexec_fn=child_dies_with_parent)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.logs / "superlink.log"
                raise UserError(f"flower-superlink exited with status {self.proc.returncode}: {last_error_line(log)} "
                                f"(see {log})")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.3)
        self.close()
        raise UserError(f"flower-superlink did not open port {self.port} within 120 s; see {self.logs / 'superlink.log'}")

    def close(self, grace: float = 15) -> None:
        """Stop the SuperLink's process group, then every process that inherited our FLWR_HOME, names our Ray temp
        dir or runs in our work dir (the simulation process and Ray's daemons and actors start sessions of their own;
        Ray's agents overwrite their argv and environ), by PID: SIGTERM,
        SIGKILL after `grace` s; remove the temp dirs. Then the watchdog, which has nothing left to do."""
        if self.proc is not None:
            signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        cleanup(f"FLWR_HOME={self.home}", str(self.ray_tmp), [str(self.ray_tmp)], grace, in_cwd=str(self.workdir))
        if self.watchdog is not None:
            stop_watchdog(self.watchdog)

    def __enter__(self) -> Federation:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- runs --------------------------------------------------------------------------------
    def _flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([_binary("flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True, text=True,
                              timeout=timeout)

    def submit(self, run_config: Path, federation_config: str | None = None, app: Path = APP_DIR) -> int:
        """`flwr run APP CONNECTION --run-config FILE`; returns the run id."""
        args = ["run", str(app), CONNECTION, "--run-config", str(run_config), "--format", "json"]
        if federation_config:
            args += ["--federation-config", federation_config]
        try:
            done = self._flwr(*args, timeout=600)
        except subprocess.TimeoutExpired:
            raise UserError("flwr run did not answer within 600 s") from None
        (self.logs / "flwr-run.log").write_text(done.stdout + done.stderr)
        try:
            reply = json.loads(done.stdout)
            return int(reply["run-id"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise UserError(f"flwr run failed (exit {done.returncode}): {(done.stdout + done.stderr).strip()[-1500:]}") from None

    def status(self, run_id: int) -> str:
        """The run's status, e.g. "pending", "running", "finished:completed", "finished:failed"."""
        return str(self._ls(run_id).get("status", "unknown"))

    def failure_reason(self, run_id: int) -> str:
        """The last line of a failed run's reason (Flower's status details, e.g. the ServerApp's exception)."""
        lines = [line.strip() for line in str(self._ls(run_id).get("status-details", "")).splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def _ls(self, run_id: int) -> dict:
        try:
            done = self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=180)
        except subprocess.TimeoutExpired:  # a loaded machine: ask again later
            return {}
        try:
            run = json.loads(done.stdout)["runs"][0]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            return {}
        return run if isinstance(run, dict) else {}

    def wait(self, run_id: int, timeout: float, done: Callable[[], bool] | None = None, status_every: float = 15,
             backoff_after: float = 300, status_max: float = 120) -> str:
        """Wait until the run finishes; returns its status. `done()` is polled each second (cheap: files), `flwr ls`
        (a CLI start, over a second of CPU) once `done()` says so, and otherwise every `status_every` seconds for the
        first `backoff_after` seconds (where start-up failures show, and short runs end), then 1.5x less often per
        check up to every `status_max` seconds: a run of hours does not spend a tenth of a core asking. Stops the run
        and raises after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        start = last = time.monotonic()
        interval = status_every
        while time.monotonic() < deadline:
            since = time.monotonic() - last
            if (done is not None and done() and since >= 3) or since >= interval:
                status = self.status(run_id)
                last = time.monotonic()
                if last - start >= backoff_after:
                    interval = min(status_max, interval * 1.5)
                if status.startswith("finished"):
                    return status
            if self.proc is not None and self.proc.poll() is not None:
                log = self.logs / "superlink.log"
                raise UserError(f"the SuperLink exited (status {self.proc.returncode}): {last_error_line(log)} (see {log})")
            time.sleep(1)
        try:
            self._flwr("stop", str(run_id), CONNECTION, timeout=180)
        except subprocess.TimeoutExpired:
            pass
        raise UserError(f"run {run_id} did not finish within {timeout:.0f} s (stopped); see {self.logs}")

    def logs_of(self, run_id: int) -> str:
        """The run's ServerApp log as the SuperLink keeps it (`flwr log` without streaming)."""
        try:
            done = self._flwr("log", str(run_id), CONNECTION, "--show", timeout=180)
        except subprocess.TimeoutExpired:
            return "(flwr log timed out)"
        return done.stdout + done.stderr
