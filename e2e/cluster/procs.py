"""Start, find and stop the control plane's background processes by recorded pid.

A pid file holds the pid and the process's start time from /proc, so a pid reused by some
other process after a crash is never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name in parentheses may contain spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def spawn(
    argv: list[str],
    log: Path,
    pidfile: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    pidfile.write_text(f"{proc.pid} {start_time(proc.pid)}\n")
    return proc.pid


def running(pidfile: Path) -> int | None:
    """The recorded pid if that very process is still alive (not a zombie), else None."""
    try:
        pid_s, started = pidfile.read_text().split()
    except (OSError, ValueError):
        return None
    pid = int(pid_s)
    if start_time(pid) != started:
        return None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
    return None if state == "Z" else pid


def stop(pidfile: Path, grace: float = 10.0) -> bool:
    """SIGTERM the recorded process (and its session's group), SIGKILL after `grace`."""
    pid = running(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and running(pidfile):
        time.sleep(0.1)
    if running(pidfile):
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and running(pidfile):
            time.sleep(0.1)
    pidfile.unlink(missing_ok=True)
    return True


def _signal_group(pid: int, sig: int) -> None:
    # spawn() puts each process in its own session, so its group id is its pid.
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)
