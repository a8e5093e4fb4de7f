"""Session-wide tiny models and adapters for the runtime tests, built once per run.

Test modules import the fixtures they use from here; build_demo reuses what is on disk, so a
fixture collected by several modules still builds once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplane.runtime.tiny import TinyModelSpec, build_demo, build_model


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
