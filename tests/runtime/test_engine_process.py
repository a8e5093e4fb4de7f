"""The engine in its own process (the default): the same answers as in one process, errors that
cross the pipe as themselves, and neither process outliving the other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
from runtime_helpers import (
    RunningServer,
    make_config,
    start_runtime_process,
    stream_in_background,
)

REQUESTS = [
    ("/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 6, "temperature": 0}),
    ("/v1/completions", {"model": "poet", "prompt": ["hello", "the sea"], "max_tokens": 5}),
    (
        "/v1/completions",
        {"model": "poet", "prompt": "a", "max_tokens": 8, "temperature": 1.0, "seed": 7},
    ),
    ("/v1/completions", {"model": "nope", "prompt": "hello", "max_tokens": 2}),  # 404
    ("/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 100000}),  # 400
    ("/generate", {"inputs": "hello", "parameters": {"max_new_tokens": 5, "details": True}}),
]


def _answers(url: str, stop_piece: str | None) -> list:
    out = []
    requests = list(REQUESTS)
    if stop_piece is not None:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 8, "stop": [stop_piece]}
        requests.append(("/v1/completions", body))
    for path, body in requests:
        r = httpx.post(url + path, json=body, timeout=60)
        doc = r.json()
        for key in ("id", "created"):
            doc.pop(key, None)
        out.append((r.status_code, doc))
    with httpx.stream(
        "POST",
        url + "/v1/completions",
        json={"model": "poet", "prompt": "hi", "max_tokens": 4, "stream": True},
        timeout=60,
    ) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    out.append([e["choices"][0]["text"] for e in events])
    bad = {"source": "/nowhere/at/all", "sha256": "0" * 64}
    r = httpx.put(url + "/v1/adapters/broken", json=bad, timeout=60)
    out.append((r.status_code, r.json()))
    r = httpx.get(url + "/v1/adapters/never-loaded", timeout=60)
    out.append((r.status_code, r.json()))
    return out


def test_the_engine_process_answers_as_one_process_does(demo_dir, tmp_path):
    from loraplane.runtime.engine_client import RemoteRuntime

    base, adapters = demo_dir
    config = make_config(base, tmp_path, adapters={"poet": str(adapters["poet"])})
    with RunningServer(config) as server:
        assert server.runtime.engine.thread.is_alive()  # this process steps the model
        details = httpx.post(
            server.url + "/generate",
            json={"inputs": "hello", "parameters": {"max_new_tokens": 8, "details": True}},
            timeout=60,
        ).json()["details"]["tokens"]
        stop_piece = next((t["text"] for t in details[2:] if t["text"].strip()), None)
        one = _answers(server.url, stop_piece)
    remote = RemoteRuntime(make_config(base, tmp_path / "two", adapters=config.adapters))
    assert remote.process.pid != os.getpid() and remote.process.is_alive()
    with RunningServer(config, runtime=remote) as server:
        assert not hasattr(server.runtime, "engine")  # nothing here steps a model
        two = _answers(server.url, stop_piece)
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert not remote.process.is_alive()  # stopped with its server
    assert [a[0] for a in two[:6]] == [200, 200, 200, 404, 400, 200]
    assert two[-2][0] == 404 and two[-1][0] == 404  # AdapterError kinds crossed as themselves
    assert one == two
    assert 'loraplane_generated_tokens_total{adapter="poet"}' in metrics


def _engine_pid(parent: int) -> int:
    children = subprocess.run(
        ["pgrep", "-P", str(parent)], capture_output=True, text=True, check=False
    ).stdout.split()
    for pid in children:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            return int(pid)
    raise AssertionError(f"no engine process among the children {children} of {parent}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_when_the_engine_process_dies_requests_end_with_503_and_the_server_exits_1(
    demo_dir, tmp_path
):
    proc, url = start_runtime_process(demo_dir, tmp_path, "--allow-unauthenticated-admin")
    try:
        engine = _engine_pid(proc.pid)
        body = {
            "model": "poet",
            "prompt": "hello",
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        reader, lines = stream_in_background(url, body)
        os.kill(engine, signal.SIGKILL)
        reader.join(timeout=60)
        assert proc.wait(timeout=60) == 1  # Kubernetes restarts it
        errors = [json.loads(x[6:])["error"] for x in lines if x.startswith('data: {"error"')]
        assert errors and errors[0]["code"] == "engine_failed", lines[-3:]
        assert "engine process exited" in errors[0]["message"]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_engine_process_never_outlives_its_server(demo_dir, tmp_path):
    proc, _ = start_runtime_process(demo_dir, tmp_path, "--allow-unauthenticated-admin")
    try:
        engine = _engine_pid(proc.pid)
        proc.kill()  # SIGKILL: no handler runs, only the pipe closes
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while _alive(engine) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(engine), "the engine process outlived its server"
    finally:
        if proc.poll() is None:
            proc.kill()
