"""Finding and ending the processes a command started in sessions of their own (stochvit.procs).

Ray's agents overwrite their argv and environ with their title, so neither an environment marker nor the command line
finds them; their working directory (the federation's work dir) still does. These tests start a plain child with no
marker at all, in a folder, and check that the folder alone finds it and that the cleanup and the watchdog end it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stochvit.procs import cleanup, processes_with, start_watchdog, stop_watchdog

pytestmark = pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs Linux /proc")

NO_MARKER = "STOCHVIT_PROCS_TEST=never-set"


def _sleeper(cwd: Path) -> subprocess.Popen:
    """A process with nothing of ours in its environment or command line, working in `cwd`; its own session, so a
    signal to our process group does not reach it."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], cwd=cwd, start_new_session=True,
                            env={"PATH": "/usr/bin:/bin"})


def _ended(proc: subprocess.Popen, seconds: float = 20) -> bool:
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


def test_the_working_directory_alone_finds_a_process_and_cleanup_ends_it(tmp_path):
    work = tmp_path / "work"
    (work / "below").mkdir(parents=True)
    (work / "gone").mkdir()
    inside, below, gone = _sleeper(work), _sleeper(work / "below"), _sleeper(work / "gone")
    elsewhere = _sleeper(tmp_path)
    try:
        time.sleep(0.2)
        shutil.rmtree(work / "gone")  # /proc then says "<path> (deleted)"
        assert inside.pid not in processes_with(NO_MARKER)  # no marker: only the folder can find it
        found = processes_with(NO_MARKER, in_cwd=str(work))
        assert {inside.pid, below.pid, gone.pid} <= set(found) and elsewhere.pid not in found
        assert processes_with(NO_MARKER, in_cwd=str(tmp_path / "wor")) == []  # a prefix of the name is not the folder
        cleanup(NO_MARKER, None, [str(work)], grace=5, in_cwd=str(work))
        assert _ended(inside) and _ended(below) and _ended(gone)
        assert not work.exists()
        assert elsewhere.poll() is None  # not ours: left running
    finally:
        for p in (inside, below, gone, elsewhere):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_the_watchdog_ends_processes_in_the_work_dir_when_its_owner_closes_it(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc = _sleeper(work)
    watchdog = start_watchdog(NO_MARKER, None, [str(work)], in_cwd=str(work))
    try:
        time.sleep(0.2)
        assert proc.poll() is None
        stop_watchdog(watchdog)  # what the owner does on exit; its death closes the same pipe
        assert _ended(proc)
        assert not work.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
