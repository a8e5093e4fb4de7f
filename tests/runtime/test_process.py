"""The runtime as a process: the command line, and a graceful SIGTERM."""

from __future__ import annotations

import json
import signal

import pytest
from runtime_helpers import start_runtime_process, stream_in_background

from loraplane.runtime.__main__ import parse_args


def test_command_line_builds_one_config(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    config = parse_args(
        [
            "--model",
            "hf://org/base@main",
            "--max-adapters",
            "3",
            "--adapter",
            "a=/x",
            "--adapter",
            "b=s3://bucket/b",
            "--device",
            "cpu",
            "--base-model-alias",
            "org/x",
            "--admin-token-file",
            str(token_file),
        ],
        environ={"LORAPLANE_ADMIN_TOKEN": "from-env", "HF_TOKEN": "hf-secret"},
    )
    assert config.adapters == {"a": "/x", "b": "s3://bucket/b"}
    assert config.admin_token == "from-file" and config.hf_token == "hf-secret"
    assert config.max_adapters == 3 and config.dtype == "float32"
    assert config.base_model_aliases == ("org/x",)
    env_only = parse_args(
        ["--model", "/m", "--device", "cpu"], environ={"LORAPLANE_ADMIN_TOKEN": "from-env"}
    )
    assert env_only.admin_token == "from-env"
    env = {"LORAPLANE_ADMIN_TOKEN": "t"}
    with pytest.raises(SystemExit):
        parse_args(["--model", "/m", "--adapter", "no-equals"], environ=env)
    with pytest.raises(ValueError, match="max-adapters"):
        parse_args(["--model", "/m", "--device", "cpu", "--max-adapters", "0"], environ=env)
    for flag in ("--max-queue", "--max-running"):  # 0 would refuse or stall every request
        with pytest.raises(ValueError, match=flag):
            parse_args(["--model", "/m", "--device", "cpu", flag, "0"], environ=env)


def test_the_admin_api_is_never_open_by_accident(tmp_path):
    with pytest.raises(ValueError, match="allow-unauthenticated-admin"):
        parse_args(["--model", "/m", "--device", "cpu"], environ={})
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        parse_args(["--model", "/m", "--admin-token-file", str(empty)], environ={})
    with pytest.raises(ValueError, match="allow-unauthenticated-admin"):  # an empty env is unset
        parse_args(["--model", "/m", "--device", "cpu"], environ={"LORAPLANE_ADMIN_TOKEN": ""})
    open_ = parse_args(
        ["--model", "/m", "--device", "cpu", "--allow-unauthenticated-admin"], environ={}
    )
    assert open_.admin_token is None and open_.allow_unauthenticated_admin
    limits = parse_args(
        [
            "--model",
            "/m",
            "--device",
            "cpu",
            "--allow-unauthenticated-admin",
            "--max-request-bytes",
            "1000",
            "--fetch-timeout",
            "5",
            "--allow-source-cidr",
            "169.254.10.0/24",
        ],
        environ={},
    )
    assert limits.max_request_bytes == 1000 and limits.fetch_timeout_s == 5
    assert limits.allow_source_cidrs == ("169.254.10.0/24",)
    assert "169.254.0.0/16" in limits.deny_source_cidrs
    with pytest.raises(ValueError, match="not a CIDR"):
        parse_args(
            ["--model", "/m", "--allow-unauthenticated-admin", "--allow-source-cidr", "x"],
            environ={},
        )


def test_sigterm_finishes_running_requests_then_exits_zero(demo_dir, tmp_path):
    proc, url = start_runtime_process(
        demo_dir, tmp_path, "--shutdown-timeout", "60", env={"LORAPLANE_ADMIN_TOKEN": "t"}
    )
    try:
        body = {
            "model": "poet",
            "prompt": "hello",
            "max_tokens": 150,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        reader, chunks = stream_in_background(url, body)
        proc.send_signal(signal.SIGTERM)
        reader.join(timeout=120)
        assert proc.wait(timeout=60) == 0
        data = [json.loads(c[6:]) for c in chunks if c.startswith("data: {")]
        assert chunks[-1] == "data: [DONE]" and data[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_model_that_cannot_be_served_exits_2_with_the_reason(tmp_path):
    from loraplane.runtime.__main__ import main

    assert main(["--model", str(tmp_path), "--device", "cpu"]) == 2
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    assert main(["--model", f"file://{tmp_path}", "--device", "cpu"]) == 2
    assert main(["--model", "pvc://claim/../../x", "--device", "cpu"]) == 2
