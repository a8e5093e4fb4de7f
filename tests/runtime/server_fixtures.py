"""Session-wide tiny models and adapters for the runtime tests, built once per run.

Test modules import the fixtures they use from here; build_demo reuses what is on disk, so a
fixture collected by several modules still builds once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplane.testing.tiny import TinyModelSpec, build_demo, build_model


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return build_demo(tmp_path_factory.getbasetemp() / "demo")


@pytest.fixture(scope="session")
def arch_model_dir(tmp_path_factory: pytest.TempPathFactory):
    def build(arch: str) -> Path:
        out = tmp_path_factory.getbasetemp() / f"model-{arch}"
        if not (out / "config.json").exists():
            build_model(out, TinyModelSpec(arch=arch))
        return out

    return build


class RunningServer:
    """A real uvicorn server on 127.0.0.1 in a background thread, with its Runtime."""

    def __init__(self, config, fetcher=None) -> None:
        import socket
        import threading

        import uvicorn

        from loraplane.runtime.runtime import Runtime
        from loraplane.runtime.server import create_app

        self.runtime = Runtime(config, fetcher=fetcher)
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
        import time

        import httpx

        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server at {self.url} not ready in 60 s: {self.runtime.preload_error}")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def wait_for(predicate, what: str, timeout_s: float = 60) -> None:
    """Poll predicate until it is true; fail naming what was awaited once the deadline passes."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


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


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = serve_directory(root)
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def https_root(tmp_path):
    """An https server on loopback with a throwaway self-signed certificate, and its trust."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    root = tmp_path / "www-tls"
    root.mkdir()
    server = serve_directory(root, tls)
    trust = ssl.create_default_context(cafile=str(cert))
    yield root, f"https://127.0.0.1:{server.server_address[1]}", trust
    server.shutdown()
    server.server_close()


def make_config(base: Path, tmp: Path, **overrides):
    from loraplane.runtime.config import RuntimeConfig

    defaults = dict(
        model=str(base),
        served_model_name="tiny",
        max_adapters=4,
        max_batch_tokens=1024,
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
    base, adapter_dir, prompts: list[str], max_tokens: int, special: bool = False
) -> list[str]:
    """PEFT's own greedy generate: the oracle every runtime output is held to."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    texts = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=special).input_ids
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )
        texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts
