"""/readyz: not ready until the --adapter preloads are in, never if one fails, not while draining."""

from __future__ import annotations

import threading

import httpx
from runtime_helpers import RunningServer, make_config, wait_for


def readyz(server) -> tuple[int, dict]:
    r = httpx.get(f"{server.url}/readyz", timeout=5)
    return r.status_code, r.json()


def test_ready_only_once_preloads_are_in_and_not_while_draining(demo_dir, tmp_path):
    base, adapters = demo_dir
    config = make_config(base, tmp_path, adapters={"poet": str(adapters["poet"])})
    server = RunningServer(config)
    fetcher = server.runtime.adapters.fetcher
    real_fetch = fetcher.fetch
    release = threading.Event()

    def slow_fetch(*args, **kwargs):
        release.wait(30)  # a slow download of the preloaded adapter
        return real_fetch(*args, **kwargs)

    fetcher.fetch = slow_fetch  # type: ignore[method-assign]
    server.thread.start()
    try:
        wait_for(lambda: readyz(server)[0] == 503, "the server to answer")
        assert readyz(server) == (503, {"status": "not ready", "reason": "loading"})
        release.set()
        wait_for(lambda: readyz(server)[0] == 200, "readiness after the preload")
        assert [e.name for e in server.runtime.adapters.registered()] == ["poet"]
        server.runtime.engine.begin_shutdown()
        assert readyz(server) == (503, {"status": "not ready", "reason": "draining"})
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "poet", "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    finally:
        release.set()
        server.__exit__(None, None, None)


def test_a_failed_preload_keeps_the_server_unready_and_says_why(demo_dir, tmp_path):
    base, _ = demo_dir
    config = make_config(base, tmp_path, adapters={"gone": str(tmp_path / "nowhere")})
    server = RunningServer(config)
    server.thread.start()
    try:
        wait_for(lambda: server.runtime.preload_error is not None, "the preload to fail")
        status, body = readyz(server)
        assert status == 503 and "preloading adapters failed" in body["reason"]
        assert "nowhere" in body["reason"]
    finally:
        server.__exit__(None, None, None)
