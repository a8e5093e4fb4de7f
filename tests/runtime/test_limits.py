"""Request validation (400 in OpenAI's shape, never 500), 429 on a full queue, metrics moving."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from runtime_helpers import RunningServer, make_config, wait_for


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    base, adapters = demo_dir
    config = make_config(
        base,
        tmp_path_factory.mktemp("limits"),
        max_queue=2,
        max_running=1,
        max_num_batched_tokens=256,
        adapters={"poet": str(adapters["poet"])},
    )
    with RunningServer(config) as running:
        yield running


def samples(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{server.url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


BAD_COMPLETIONS = [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "temperature": 5}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "n": 2}, "n"),
    ({"prompt": "hi", "logprobs": 2}, "logprobs"),
    ({"prompt": "hi", "presence_penalty": 1.0}, "presence_penalty"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({}, "prompt"),
    ({"prompt": "hi " * 300}, "limit"),
    ({"prompt": "hi", "max_tokens": 1000}, "limit"),
    ({"prompt": [5, 99999]}, "vocabulary"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "hi", "stream": True, "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "hi", "temperature": 1, "seed": 2**64}, "seed"),
]


@pytest.mark.parametrize(("extra", "word"), BAD_COMPLETIONS)
def test_bad_completion_requests_are_400_in_openai_shape(server, extra, word):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "poet"} | extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert word in error["message"] and error["type"] == "invalid_request_error"


def test_bad_chat_and_tgi_requests(server):
    url = server.url
    for body in (
        {"model": "poet", "messages": []},
        {"model": "poet", "messages": [{"role": "robot", "content": "x"}]},
        {
            "model": "poet",
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
        },
    ):
        r = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert r.status_code == 400 and "error" in r.json(), (body, r.text)
    chat = {"model": "poet", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for extra in ({"response_format": {"type": "json_object"}}, {"functions": [{"name": "f"}]}):
        r = httpx.post(f"{url}/v1/chat/completions", json=chat | extra)
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] in ("response_format", "tools"), r.text
    r = httpx.post(f"{url}/v1/chat/completions", json=chat | {"response_format": {"type": "text"}})
    assert r.status_code == 200, r.text
    r = httpx.post(f"{url}/generate", json={"inputs": "hi", "parameters": {"top_p": 2}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = httpx.post(
        f"{url}/generate", json={"inputs": "hi", "parameters": {"repetition_penalty": 1.3}}
    )
    assert r.status_code == 422 and "repetition_penalty" in r.json()["error"]
    r = httpx.post(
        f"{url}/generate",
        json={"inputs": "hi", "parameters": {"details": True, "decoder_input_details": True}},
    )
    assert r.status_code == 422 and "decoder_input_details" in r.json()["error"]
    r = httpx.post(f"{url}/generate", json={"inputs": "hi", "parameters": {"adapter_id": "x"}})
    assert r.status_code == 404 and "x" in r.json()["error"]
    r = httpx.post(
        f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400


def test_metrics_move_as_requests_are_served(server):
    before = samples(server)
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={
            "model": "poet",
            "prompt": "hello world",
            "max_tokens": 5,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200
    usage = r.json()["usage"]
    after = samples(server)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("loraplane_requests_total", adapter="poet", status="success") == 1
    assert delta("loraplane_generated_tokens_total", adapter="poet") == usage["completion_tokens"]
    assert delta("loraplane_prompt_tokens_total", adapter="poet") == usage["prompt_tokens"]
    assert delta("loraplane_time_to_first_token_seconds_count", adapter="poet") == 1
    assert delta("loraplane_time_per_output_token_seconds_count", adapter="poet") == 4
    assert after[("loraplane_requests_in_flight", ())] == 0
    assert after[("loraplane_queue_depth", ())] == 0
    assert after[("loraplane_adapters", (("tier", "gpu"),))] == 1
    assert after[("loraplane_adapter_load_seconds_count", ())] >= 1


def gauges(server) -> tuple[float, float]:
    s = samples(server)
    return s[("loraplane_requests_in_flight", ())], s[("loraplane_queue_depth", ())]


async def test_in_flight_and_queue_depth_gauges_follow_the_requests(server, step_gate):
    gate = step_gate(server.runtime.runner)
    body = {"model": "poet", "prompt": "hello", "max_tokens": 40, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        requests = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in "ab"]
        tally = server.runtime.engine.tally
        await asyncio.to_thread(wait_for, lambda: tally.in_flight == 2, "both requests accepted")
        # max_running=1: after a step, one runs while the other waits for its first step.
        await asyncio.to_thread(gate.step_until, lambda: gauges(server) == (2, 1), "(2, 1)", 1)
        gate.open()
        assert all(r.status_code == 200 for r in await asyncio.gather(*requests))
    assert gauges(server) == (0, 0)


async def test_full_queue_answers_429_and_serves_the_rest(server):
    body = {
        "model": "poet",
        "prompt": "hello",
        "max_tokens": 40,
        "temperature": 0,
        "ignore_eos": True,
    }
    before = samples(server)
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        rs = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(10)))
        tgi = await asyncio.gather(
            *(
                client.post(
                    "/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 40}}
                )
                for _ in range(8)
            )
        )
    codes = sorted(r.status_code for r in rs)
    # At least --max-queue get in (more if the engine admits some before the rest arrive).
    assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
    busy = next(r for r in rs if r.status_code == 429)
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "overloaded"
    tgi_busy = [r for r in tgi if r.status_code == 429]
    assert tgi_busy and tgi_busy[0].json()["error_type"] == "overloaded"
    after = samples(server)
    key = ("loraplane_requests_total", (("adapter", "poet"), ("status", "rejected")))
    assert after[key] - before.get(key, 0) == codes.count(429)


def test_a_failed_engine_step_fails_its_requests_and_the_server_goes_on(server, monkeypatch):
    runner = server.runtime.runner
    real_launch = runner.launch
    calls = []

    def broken_twice(seqs, slots, chunks=None):
        calls.append(len(seqs))
        if len(calls) <= 2:  # the step, then the sequence on its own: it is the culprit
            raise RuntimeError("simulated device error")
        return real_launch(seqs, slots, chunks)

    monkeypatch.setattr(runner, "launch", broken_twice)
    body = {"model": "poet", "prompt": "hello", "max_tokens": 3, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/completions", json=body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 200


def test_an_adapter_that_cannot_be_copied_in_is_reported_failed(server, demo_dir, monkeypatch):
    _, adapters = demo_dir
    runner = server.runtime.runner
    real_load = runner.load_adapter

    def refuse(slot, weights):
        if weights.rank == 8:  # sql-expert
            raise RuntimeError("simulated copy failure")
        return real_load(slot, weights)

    monkeypatch.setattr(runner, "load_adapter", refuse)
    r = httpx.put(
        f"{server.url}/v1/adapters/sql-expert", json={"source": str(adapters["sql-expert"])}
    )
    assert r.status_code == 201
    url = f"{server.url}/v1/adapters/sql-expert"
    wait_for(lambda: httpx.get(url).json()["state"] == "failed", "the copy to fail")
    info = httpx.get(url).json()
    assert info["state"] == "failed" and "simulated copy failure" in info["error"]
    assert info["tier"] != "gpu"
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "sql-expert", "prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_failed"
    monkeypatch.setattr(runner, "load_adapter", real_load)
    assert httpx.delete(f"{server.url}/v1/adapters/sql-expert").status_code == 200


def test_prompt_lists_and_usage_in_streams(server):
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={
            "model": "poet",
            "prompt": ["hello", "the cat"],
            "max_tokens": 3,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1] and r.json()["usage"]["completion_tokens"] == 6
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={
            "model": "poet",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][6:])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_a_refused_prompt_in_a_list_queues_none_of_them(server):
    before = samples(server)
    body = {"model": "poet", "max_tokens": 40, "ignore_eos": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body | {"prompt": ["hello", "hi " * 300]})
    assert r.status_code == 400 and "limit" in r.json()["error"]["message"]
    # More prompts than --max-queue (2): one 429 for the request, every prompt counted as
    # rejected, none as aborted, nothing left running.
    r = httpx.post(f"{server.url}/v1/completions", json=body | {"prompt": ["a", "b", "c"]})
    assert r.status_code == 429 and r.headers["retry-after"], r.text
    after = samples(server)

    def delta(status: str) -> float:
        key = ("loraplane_requests_total", (("adapter", "poet"), ("status", status)))
        return after.get(key, 0) - before.get(key, 0)

    assert (delta("abort"), delta("rejected")) == (0, 3)
    assert server.runtime.engine.idle()


ABORTS = ("loraplane_requests_total", (("adapter", "poet"), ("status", "abort")))


def test_a_client_that_hangs_up_has_its_sequence_aborted(server, step_gate):
    gate = step_gate(server.runtime.runner)
    before = samples(server).get(ABORTS, 0)
    with pytest.raises(httpx.ReadTimeout):  # certain: no step runs until the gate opens
        httpx.post(
            f"{server.url}/v1/completions",
            timeout=0.5,
            json={"model": "poet", "prompt": "hello", "max_tokens": 150, "ignore_eos": True},
        )
    # Fewer steps than its 150 tokens: the sequence ended because the client left.
    gate.step_until(lambda: samples(server).get(ABORTS, 0) == before + 1, "the abort", 149)
    assert server.runtime.engine.idle()


def test_a_stream_closed_early_aborts_its_sequence(server, step_gate):
    gate = step_gate(server.runtime.runner)
    before = samples(server).get(ABORTS, 0)
    body = {
        "model": "poet",
        "prompt": "hello",
        "max_tokens": 150,
        "ignore_eos": True,
        "stream": True,
    }
    hung_up = threading.Event()

    def read_one_chunk_then_hang_up() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    break
        hung_up.set()

    reader = threading.Thread(target=read_one_chunk_then_hang_up)
    reader.start()
    # A chunk may need more than one token (text held back until it is decided).
    used = gate.step_until(hung_up.is_set, "the first chunk", 20)
    reader.join(timeout=60)
    gate.step_until(lambda: samples(server).get(ABORTS, 0) == before + 1, "the abort", 149 - used)
    assert server.runtime.engine.idle()
