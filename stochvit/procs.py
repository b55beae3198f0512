"""Child processes that never outlive stochvit: a parent-death signal, finding processes by a marker, and a watchdog.

Standard library only, so that the watchdog runs as a plain script (`python -I procs.py watch ...`) without
importing torch. `child_dies_with_parent` covers direct children (the study's trainings, the SuperLink);
what those children spawn in sessions of their own (Flower's simulation process, Ray's daemons, which ignore
SIGTERM and re-parent to init) is found by a marker in its environment or command line, or by its working directory
(Ray's agents rename themselves over their argv and environ, so only their cwd still says where they came from), and
ended by the watchdog, which wakes when its parent dies in any way, SIGKILL included (its stdin pipe closes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

WATCH_ENV = "STOCHVIT_WATCHDOG"  # the watchdog's targets (JSON)


def child_dies_with_parent() -> None:
    """`preexec_fn`: the child gets SIGKILL when its parent dies (Linux PR_SET_PDEATHSIG; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def processes_with(entry: str, in_cmdline: str | None = None, in_cwd: str | None = None) -> list[int]:
    """PIDs (not ours) whose environment holds `entry` ("KEY=value"), whose command line contains `in_cmdline`, or
    whose working directory is `in_cwd` or below it.

    Linux /proc; empty elsewhere."""
    needle = b"\0" + entry.encode() + b"\0"
    root = os.path.realpath(in_cwd) if in_cwd else None
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if int(d.name) == os.getpid():
                continue
            if needle in b"\0" + (d / "environ").read_bytes() + b"\0" or (
                    in_cmdline and in_cmdline.encode() in (d / "cmdline").read_bytes()) or (
                    root and (os.readlink(d / "cwd").removesuffix(" (deleted)") + os.sep).startswith(root + os.sep)):
                found.append(int(d.name))
        except (OSError, ValueError):
            pass
    return found


def stop_processes_with(entry: str, grace: float = 15, in_cmdline: str | None = None, in_cwd: str | None = None) -> None:
    """SIGTERM the processes `processes_with` finds, SIGKILL those left after `grace` seconds."""
    for pid in processes_with(entry, in_cmdline, in_cwd):
        signal_pid(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := processes_with(entry, in_cmdline, in_cwd)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        signal_pid(pid, signal.SIGKILL)


def signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def cleanup(entry: str, in_cmdline: str | None, folders: list[str], grace: float = 15, in_cwd: str | None = None) -> None:
    """End the marked processes, then remove `folders` (temporary directories they used)."""
    stop_processes_with(entry, grace, in_cmdline, in_cwd)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def start_watchdog(entry: str, in_cmdline: str | None, folders: list[str], in_cwd: str | None = None) -> subprocess.Popen:
    """A process that runs `cleanup(entry, in_cmdline, folders, in_cwd=in_cwd)` once its stdin closes: when the caller closes it,
    or when the caller dies (SIGKILL included). Its own session, so Ctrl-C in the terminal does not reach it."""
    # the targets travel in an environment variable, not argv: the watchdog must not match its own `in_cmdline`
    env = {k: v for k, v in os.environ.items() if f"{k}={v}" != entry}
    env[WATCH_ENV] = json.dumps(dict(entry=entry, in_cmdline=in_cmdline, folders=folders, in_cwd=in_cwd))
    return subprocess.Popen([sys.executable, "-I", __file__, "watch"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)


def stop_watchdog(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Close the watchdog's stdin (it cleans up once more, a no-op after our own cleanup) and wait for it."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


if __name__ == "__main__" and sys.argv[1:] == ["watch"]:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdin.buffer.read()  # returns at EOF: the parent closed the pipe or died
    cleanup(**json.loads(os.environ[WATCH_ENV]))
