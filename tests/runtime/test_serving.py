"""Through real HTTP: concurrent requests of different adapters share batches and equal PEFT."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from runtime_helpers import RunningServer, make_config, peft_greedy

PROMPTS = ["hello world, how", "the quick brown fox", "SELECT name FROM"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    base, adapters = demo_dir
    config = make_config(
        base, tmp_path_factory.mktemp("serving"), adapters={n: str(p) for n, p in adapters.items()}
    )
    with RunningServer(config) as running:
        yield running


async def test_concurrent_adapters_match_peft_greedy(server, demo_dir):
    base, adapter_dirs = demo_dir
    models = ["tiny", *adapter_dirs]
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

        async def one(model: str, prompt: str) -> str:
            r = await client.post(
                "/v1/completions",
                json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0},
            )
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        jobs = [one(m, p) for m in models for p in PROMPTS]
        got = await asyncio.gather(*jobs)
    ours = {m: got[i * len(PROMPTS) : (i + 1) * len(PROMPTS)] for i, m in enumerate(models)}
    for model in models:
        expected = peft_greedy(base, adapter_dirs.get(model), PROMPTS, MAX_TOKENS)
        assert ours[model] == expected, f"{model}: ours {ours[model]} != PEFT {expected}"
    # The adapters must really differ, or the equality above would prove little.
    assert len({tuple(v) for v in ours.values()}) == len(models)
    assert server.runtime.engine.tally.peak_adapters_per_step >= 3


def test_openai_client_completions_chat_and_models(server):
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {"tiny", "sql-expert", "support-bot", "poet"}
    assert ids["poet"].parent == "tiny"  # type: ignore[attr-defined]
    done = client.completions.create(model="poet", prompt="hello", max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.usage is not None and done.usage.prompt_tokens > 0
    chat = client.chat.completions.create(
        model="sql-expert",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
    )
    assert chat.choices[0].message.role == "assistant"
    pieces = client.chat.completions.create(
        model="sql-expert",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert streamed == chat.choices[0].message.content
    pieces = client.completions.create(
        model="poet", prompt="hello", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == done.choices[0].text
    with pytest.raises(NotFoundError) as err:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_sampling_with_seed_is_reproducible_and_differs_from_greedy(server):
    def ask(**kw):
        r = httpx.post(
            server.url + "/v1/completions",
            json={"model": "support-bot", "prompt": "hello", "max_tokens": 12} | kw,
        )
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    a = ask(temperature=1.5, seed=7, top_p=0.95, top_k=50)
    assert a == ask(temperature=1.5, seed=7, top_p=0.95, top_k=50)
    assert {ask(temperature=1.5, seed=s) for s in range(4)} != {ask(temperature=0)}


def test_stop_strings_cut_the_text(server):
    full = httpx.post(
        server.url + "/v1/completions",
        json={"model": "poet", "prompt": "hello", "max_tokens": 10, "temperature": 0},
    ).json()
    text = full["choices"][0]["text"]
    stop = text[3:5]
    cut = httpx.post(
        server.url + "/v1/completions",
        json={
            "model": "poet",
            "prompt": "hello",
            "max_tokens": 10,
            "temperature": 0,
            "stop": [stop],
        },
    ).json()
    assert cut["choices"][0]["text"] == text[: text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
