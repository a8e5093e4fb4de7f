"""Start the simulated runtime as a background process for a test or a benchmark, and stop it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def simruntime(
    kubeconfig: Path,
    log: Path,
    namespaces: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
    lifetime_s: float = 3600,
) -> Iterator[subprocess.Popen]:
    """The process, running until the block ends (SIGTERM: it removes the routes it added)."""
    argv = [
        sys.executable,
        "-m",
        "e2e.simruntime",
        f"--kubeconfig={kubeconfig}",
        f"--lifetime={lifetime_s}",
        *(f"--namespace={ns}" for ns in namespaces),
        *extra,
    ]
    if os.geteuid() == 0:
        argv.append("--add-routes")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
