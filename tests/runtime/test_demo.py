"""`make demo` runs python -m loraplane.demo: it must finish, print every model's answer, exit 0."""

from __future__ import annotations

from loraplane import demo
from loraplane.testing.tiny import DEMO_ADAPTERS, DEMO_LESSONS


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert demo.main(["--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in [demo.BASE_NAME, *DEMO_ADAPTERS]:
        assert f"{name}: '" in out, out
    for name in DEMO_ADAPTERS:
        assert f"loaded adapter {name}: rank" in out
        # Served in one batch with the others, each adapter says what it was taught.
        assert f"{name}: {DEMO_LESSONS[name]!r}" in out, out
    assert 'loraplane_requests_total{adapter="poet",status="success"} 1.0' in out
    assert "shut down cleanly" in out
