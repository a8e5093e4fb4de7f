"""Helpers the runtime tests share: a live server, the one wait, a gated engine step, files.

Fixtures live in conftest.py; this module holds plain functions and classes that tests import.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path


class RunningServer:
    """A real uvicorn server on 127.0.0.1 in a background thread, with its Runtime (or the
    runtime given: a RemoteRuntime, whose engine runs in its own process)."""

    def __init__(self, config, fetcher=None, runtime=None) -> None:
        import socket
        import threading

        import uvicorn

        from loraplane.runtime.runtime import Runtime
        from loraplane.runtime.server import create_app

        self.runtime = runtime or Runtime(config, fetcher=fetcher)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(self.runtime), log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> RunningServer:
        self.thread.start()
        try:
            wait_for(self._ready, f"the server at {self.url} to be ready")
        except AssertionError as e:
            why = getattr(self.runtime, "preload_error", None)
            raise AssertionError(f"{e}; preload error: {why}") from None
        return self

    def _ready(self) -> bool:
        import httpx

        try:
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def start_runtime_process(demo_dir, tmp_path: Path, *flags: str, env=None):
    """`python -m loraplane.runtime` on the demo base with the poet adapter, on a free port,
    waited for until ready: (the process, its URL). flags are added to its command line."""
    import os
    import socket
    import subprocess
    import sys

    import httpx

    base, adapters = demo_dir
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "loraplane.runtime", "--model", str(base)]
    command += ["--port", str(port), "--device", "cpu", "--adapter", f"poet={adapters['poet']}"]
    command += ["--cache-dir", str(tmp_path / "cache"), "--log-level", "warning", *flags]
    proc = subprocess.Popen(command, env=os.environ | (env or {}))
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, f"the runtime exited with {proc.returncode}"
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, "the runtime process to be ready")
    except BaseException:
        proc.kill()
        raise
    return proc, url


def wait_for(predicate: Callable[[], object], what: str, timeout_s: float = 60) -> None:
    """Poll predicate until it is true; fail naming what was awaited once the deadline passes.

    The only wait in these tests. Async tests run it with asyncio.to_thread, so the event
    loop keeps serving the requests being waited on.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def stream_in_background(url: str, body: dict) -> tuple[threading.Thread, list[str]]:
    """POST body to url's /v1/completions as a stream, read by a thread that collects the
    non-empty SSE lines; returns once the first line has arrived (the request is running)."""
    import httpx

    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                started.set()
                if line:
                    lines.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(30), "the stream sent nothing in 30 s"
    return reader, lines


class StepGate:
    """Stands in for ModelRunner.launch: each engine step waits until the test lets it through.

    A test decides how far the engine gets instead of slowing every step with a sleep and
    hoping a request lasts long enough; the real forward still runs, so outputs do not change.
    """

    def __init__(self, real_launch: Callable, timeout_s: float = 60) -> None:
        self.real_launch = real_launch
        self.timeout_s = timeout_s
        self.cond = threading.Condition()
        self.allowed = 0  # steps the test has let through
        self.is_open = False
        self.taken = 0  # steps started
        self.done = 0  # steps finished

    def launch(self, seqs, lora_slots, chunks=None):
        with self.cond:
            if not self.cond.wait_for(
                lambda: self.is_open or self.taken < self.allowed, self.timeout_s
            ):
                raise RuntimeError(f"StepGate: no test let this step through in {self.timeout_s} s")
            self.taken += 1
        try:
            return self.real_launch(seqs, lora_slots, chunks)
        finally:
            with self.cond:
                self.done += 1
                self.cond.notify_all()

    def allow(self, steps: int = 1) -> None:
        with self.cond:
            self.allowed += steps
            self.cond.notify_all()

    def open(self) -> None:
        """Every step from now on runs at once."""
        with self.cond:
            self.is_open = True
            self.cond.notify_all()

    def step_until(self, predicate: Callable[[], object], what: str, max_steps: int) -> int:
        """Let steps through one at a time until predicate holds; how many it took.

        Fails when max_steps were not enough: the bound is the assertion (for example, a
        sequence aborted before it could generate all of its tokens).
        """
        for steps in range(max_steps + 1):
            if predicate():
                return steps
            if steps == max_steps:
                break
            target = self.done + 1
            self.allow(1)
            wait_for(
                lambda target=target: self.done >= target or predicate(), f"a step towards {what}"
            )
        raise AssertionError(f"{what}: not after {max_steps} steps")


def serve_directory(root: Path, tls=None):
    """A threaded HTTP(S) server of root on 127.0.0.1; /private/ wants 'Bearer sesame'."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path.startswith("/private/") and (
                self.headers.get("Authorization") != "Bearer sesame"
            ):
                self.send_error(401)
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def make_config(base: Path, tmp: Path, **overrides):
    from loraplane.runtime.config import RuntimeConfig

    defaults = dict(
        model=str(base),
        served_model_name="tiny",
        max_adapters=4,
        max_num_batched_tokens=1024,
        cache_dir=tmp / "cache",
        pvc_root=tmp / "pvc",
        allow_unauthenticated_admin=True,
    )
    return RuntimeConfig(**(defaults | overrides))


def copy_adapter(src: Path, dst: Path, **config_changes) -> Path:
    """A copy of a PEFT adapter dir with adapter_config.json fields changed."""
    import json
    import shutil

    shutil.copytree(src, dst)
    path = dst / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(config_changes)
    path.write_text(json.dumps(config))
    return dst


def rewrite_weights(adapter_dir: Path, change) -> Path:
    """Rewrite adapter_model.safetensors through change(dict of tensors) -> dict of tensors."""
    from safetensors.torch import load_file, save_file

    file = adapter_dir / "adapter_model.safetensors"
    save_file(change(load_file(str(file))), str(file))
    return adapter_dir


def peft_greedy(
    base,
    adapter_dir,
    prompts: list[str],
    max_tokens: int,
    special: bool = False,
    device: str = "cpu",
) -> list[str]:
    """PEFT's own greedy generate: the oracle every runtime output is held to."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).to(device)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).to(device)
    model.eval()
    texts = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=special).input_ids.to(device)
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


# Llama-3-8B's LoRA sites, (d_in, d_out) each, and the projections that share one shrink.
LLAMA3_8B = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 1024),
    "v_proj": (4096, 1024),
    "o_proj": (4096, 4096),
    "gate_proj": (4096, 14336),
    "up_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}
LLAMA3_8B_SHRINKS = (
    ("q_proj", "k_proj", "v_proj"),
    ("o_proj",),
    ("gate_proj", "up_proj"),
    ("down_proj",),
)
