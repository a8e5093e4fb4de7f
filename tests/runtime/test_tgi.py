"""TGI/LoRAX routes through real clients: huggingface_hub here, text-generation and
lorax-client from their own environment (they pin an old huggingface_hub), which
`make test-clients` prepares before it runs the `clients` tests; nothing is fetched here."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import httpx
import pytest
from runtime_helpers import RunningServer, make_config

ROOT = Path(__file__).resolve().parents[2]
CLIENTS_VENV = ROOT / ".venv-clients"
CLIENT_REQUIREMENTS = Path(__file__).with_name("clients-requirements.txt")
PROMPT = "hello world"


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    base, adapters = demo_dir
    config = make_config(
        base, tmp_path_factory.mktemp("tgi"), adapters={n: str(p) for n, p in adapters.items()}
    )
    with RunningServer(config) as running:
        yield running


def openai_greedy(server, model: str, max_tokens: int) -> str:
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0},
    )
    return r.json()["choices"][0]["text"]


def test_generate_routes_shape(server):
    r = httpx.post(
        f"{server.url}/generate",
        json={
            "inputs": PROMPT,
            "parameters": {"adapter_id": "poet", "max_new_tokens": 5, "details": True},
        },
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["generated_text"] == openai_greedy(server, "poet", 5)
    details = out["details"]
    assert details["generated_tokens"] == len(details["tokens"]) == 5
    assert details["finish_reason"] == "length"
    assert all(t["logprob"] <= 0 for t in details["tokens"])
    compat = httpx.post(
        f"{server.url}/",
        json={"inputs": PROMPT, "parameters": {"adapter_id": "poet", "max_new_tokens": 5}},
    )
    assert compat.json() == [{"generated_text": out["generated_text"]}]
    with httpx.stream(
        "POST",
        f"{server.url}/generate_stream",
        json={"inputs": PROMPT, "parameters": {"adapter_id": "poet", "max_new_tokens": 5}},
    ) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert [e["token"]["id"] for e in events] == [t["id"] for t in details["tokens"]]
    assert events[-1]["generated_text"] == out["generated_text"]
    assert all(e["generated_text"] is None for e in events[:-1])


def test_huggingface_hub_inference_client(server):
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=server.url)
    for adapter in ("sql-expert", None):
        out = client.text_generation(PROMPT, adapter_id=adapter, max_new_tokens=6, details=True)
        expected = openai_greedy(server, adapter or "tiny", 6)
        assert out.generated_text == expected
        assert out.details is not None and out.details.generated_tokens == 6
        streamed = client.text_generation(
            PROMPT, adapter_id=adapter, max_new_tokens=6, stream=True, details=True
        )
        assert "".join(chunk.token.text for chunk in streamed) == expected


CLIENT_SCRIPT = textwrap.dedent("""
    import json, sys
    from text_generation import Client as TGIClient
    from lorax import Client as LoraxClient
    url = sys.argv[1]
    tgi = TGIClient(url)
    lorax = LoraxClient(url)
    out = {
        "tgi": tgi.generate("hello world", max_new_tokens=6).generated_text,
        "tgi_stream": "".join(r.token.text for r in tgi.generate_stream(
            "hello world", max_new_tokens=6)),
        "lorax": lorax.generate("hello world", adapter_id="support-bot",
                                max_new_tokens=6).generated_text,
        "lorax_stream": "".join(r.token.text for r in lorax.generate_stream(
            "hello world", adapter_id="support-bot", max_new_tokens=6)),
    }
    print(json.dumps(out))
""")


def clients_python() -> Path:
    """The text-generation and lorax-client venv that `make test-clients` prepared."""
    python = CLIENTS_VENV / "bin" / "python"
    check = [str(python), "-c", "import text_generation, lorax"]
    if not python.exists() or subprocess.run(check, capture_output=True).returncode != 0:
        pytest.fail(
            f"{CLIENTS_VENV} lacks text-generation and lorax-client: run `make test-clients`, "
            f"which installs {CLIENT_REQUIREMENTS.name} there and runs these tests"
        )
    return python


@pytest.mark.clients
def test_text_generation_and_lorax_clients(server):
    python = clients_python()
    run = subprocess.run(
        [str(python), "-c", CLIENT_SCRIPT, server.url], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout)
    base, bot = openai_greedy(server, "tiny", 6), openai_greedy(server, "support-bot", 6)
    assert got == {"tgi": base, "tgi_stream": base, "lorax": bot, "lorax_stream": bot}
