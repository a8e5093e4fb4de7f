"""Shared runtime test setup: the Triton interpreter on CPU-only machines, and every fixture
the runtime tests share (tiny models and adapters, file servers, the step gate)."""

from __future__ import annotations

# TRITON_INTERPRET is set in tests/conftest.py, before any test module imports the kernels.
from pathlib import Path

import pytest
from runtime_helpers import StepGate, serve_directory

from loraplane.runtime.config import DEFAULT_TARGETS
from loraplane.testing.tiny import (
    TinyAdapterSpec,
    TinyModelSpec,
    build_adapter,
    build_demo,
    build_model,
)

# Adapters that differ in every way the slots must honour: rank, alpha, targets (attention
# and MLP), rsLoRA, rank_pattern and alpha_pattern.
LORA_MIX: dict[str, TinyAdapterSpec] = {
    "qv8": TinyAdapterSpec(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=21),
    "all16": TinyAdapterSpec(r=16, lora_alpha=8, target_modules=DEFAULT_TARGETS, seed=22),
    "rs4": TinyAdapterSpec(
        r=4, lora_alpha=8, target_modules=("o_proj", "down_proj"), use_rslora=True, seed=23
    ),
    "pattern": TinyAdapterSpec(
        r=6,
        lora_alpha=12,
        target_modules=("k_proj", "gate_proj", "up_proj"),
        rank_pattern={"gate_proj": 12},
        alpha_pattern={"up_proj": 3},
        seed=24,
    ),
}


@pytest.fixture(scope="session")
def lora_models(tmp_path_factory: pytest.TempPathFactory):
    """arch → (base dir, {adapter name: adapter dir}), built once per session per arch."""
    root = tmp_path_factory.getbasetemp() / "lora-mix"
    built: dict[str, tuple[Path, dict[str, Path]]] = {}

    def get(arch: str) -> tuple[Path, dict[str, Path]]:
        if arch not in built:
            base = build_model(root / arch / "base", TinyModelSpec(arch=arch, seed=5))
            adapters = {
                name: build_adapter(root / arch / name, base, spec)
                for name, spec in LORA_MIX.items()
            }
            built[arch] = (base, adapters)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The demo's base model and adapters, built once per session."""
    return build_demo(tmp_path_factory.getbasetemp() / "demo")


@pytest.fixture(scope="session")
def arch_model_dir(tmp_path_factory: pytest.TempPathFactory):
    def build(arch: str) -> Path:
        out = tmp_path_factory.getbasetemp() / f"model-{arch}"
        if not (out / "config.json").exists():
            build_model(out, TinyModelSpec(arch=arch))
        return out

    return build


@pytest.fixture
def step_gate(monkeypatch: pytest.MonkeyPatch):
    """gate(runner) puts a closed StepGate in front of runner.launch; every gate opens at the end,
    so an engine thread never stays blocked in a step after its test."""
    gates: list[StepGate] = []

    def gate(runner) -> StepGate:
        made = StepGate(runner.launch)
        monkeypatch.setattr(runner, "launch", made.launch)
        gates.append(made)
        return made

    yield gate
    for made in gates:
        made.open()


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
