"""bench/operator_scale.py end to end at smoke size: the operator, kwok pods and the simulated
runtime converge, and a new adapter reaches every replica."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from e2e.cluster.testing import Kube

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_operator_bench_smoke_run_converges(kube: Kube) -> None:
    if kube.local is None:
        pytest.skip("the bench runs kwok and the simulated runtime on the local control plane")
    argv = [sys.executable, str(REPO / "bench" / "operator_scale.py")]
    argv += ["--replicas=10", "--adapters=20", "--new=3", "--window=5", "--timeout=300"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| every adapter Ready on every replica |" in proc.stdout, proc.stdout
    assert "new adapter to Ready, p50 (n=3)" in proc.stdout, proc.stdout
