"""Hostile requests: one request can fail only itself, nothing stale reaches another request,
bodies are bounded, and the event loop never tokenizes."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading

import httpx
import pytest
import torch
from runtime_helpers import RunningServer, make_config, peft_greedy, wait_for

from loraplane.runtime.sampler import FAILED, Sampler
from loraplane.runtime.sampling import SamplingParams

PROMPT = "hello world, how are"
MAX_BODY = 64 << 10


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    base, adapters = demo_dir
    config = make_config(
        base,
        tmp_path_factory.mktemp("hostile-requests"),
        adapters={name: str(path) for name, path in adapters.items()},
        max_running=8,
        max_queue=16,
        max_num_batched_tokens=512,
        max_request_bytes=MAX_BODY,
    )
    with RunningServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def oracle(demo_dir):
    base, adapters = demo_dir
    return {
        model: peft_greedy(base, adapters.get(model), [PROMPT], 8)[0]
        for model in ("tiny", "poet", "sql-expert")
    }


def complete(server, model: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0} | extra
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)


def test_stale_nan_in_free_kv_blocks_and_slots_reaches_no_request(server, demo_dir):
    # What a poisoned request could leave behind: NaN in every KV block it held, and in a
    # slot's LoRA buffers. Every position a request reads it wrote itself; padding reads a
    # slot that is never written; base-only tokens never read a slot's weights.
    runner, engine = server.runtime.runner, server.runtime.engine
    assert engine.idle()
    adapters = server.runtime.adapters.registered()
    wait_for(lambda: all(e.lora_slot is not None for e in adapters), "adapters in slots")
    # Keep block 0 free but unused: the index padding used to read, whoever held it last.
    del engine.blocks.free[0]
    # NaN overwrites what earlier requests computed: none of it may be found as a prefix.
    engine.blocks.reset_prefix_cache()
    with server.runtime.adapters.lock:
        runner.k_cache[:, : runner.pad_kv_index].fill_(float("nan"))
        runner.v_cache[:, : runner.pad_kv_index].fill_(float("nan"))
        free = set(range(runner.lora.max_slots)) - set(engine.scheduler.lora_slots.owner)
        for slot in free:
            for layer in runner.lora.layers.values():
                layer.lora_b[slot].fill_(float("nan"))
                layer.scales[slot] = float("inf")

    # Different lengths, so that shorter sequences are padded in attention.
    jobs = [("tiny", "hi"), ("poet", PROMPT), ("sql-expert", "the cat sat"), ("tiny", PROMPT)]

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{server.url}/v1/completions",
                        json={"model": m, "prompt": p, "max_tokens": 8, "temperature": 0},
                    )
                    for m, p in jobs
                )
            )

    base, adapters = demo_dir
    try:
        for (model, prompt), r in zip(jobs, asyncio.run(all_at_once()), strict=True):
            assert r.status_code == 200, r.text
            want = peft_greedy(base, adapters.get(model), [prompt], 8)[0]
            assert r.json()["choices"][0]["text"] == want, model
    finally:
        engine.blocks.free[0] = None
        with server.runtime.adapters.lock:
            for slot in free:
                runner.clear_adapter(slot)


def test_a_request_that_breaks_the_forward_fails_alone(server, oracle, monkeypatch):
    engine, runner = server.runtime.engine, server.runtime.runner
    real_launch = runner.launch
    gate = threading.Event()
    batches: list[list[int]] = []
    poison = [7, 7, 7, 7, 7]

    def run(seqs, slots, chunks=None):
        if any(s.prompt_ids == [1, 2, 3] for s in seqs):
            gate.wait(timeout=30)  # hold the engine until the others are queued behind it
        batches.append([len(s.prompt_ids) for s in seqs])
        if any(s.prompt_ids == poison for s in seqs):
            raise RuntimeError("simulated kernel failure on one sequence")
        return real_launch(seqs, slots, chunks)

    monkeypatch.setattr(runner, "launch", run)

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            url = f"{server.url}/v1/completions"
            blocker = asyncio.create_task(
                client.post(url, json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2})
            )
            await asyncio.to_thread(wait_for, lambda: engine.tally.in_flight == 1, "the blocker")
            body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
            bad = asyncio.create_task(
                client.post(url, json={"model": "poet", "prompt": poison, "max_tokens": 4})
            )
            good = asyncio.create_task(client.post(url, json=body | {"model": "poet"}))
            await asyncio.to_thread(wait_for, lambda: engine.tally.in_flight == 3, "all queued")
            gate.set()
            return await blocker, await bad, await good

    blocker, bad, good = asyncio.run(scenario())
    assert blocker.status_code == 200, blocker.text
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error", bad.text
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == oracle["poet"]
    assert any(len(b) > 1 and len(poison) in b for b in batches), batches  # they shared a step


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 1e-300},
        {"temperature": 5e-324},
        {"temperature": 1.0, "top_p": 1e-300},
        {"temperature": 1.0, "top_p": 5e-324, "top_k": 1},
        {"temperature": 2.0, "top_k": 100000},
    ],
)
def test_extreme_sampling_values_never_fail_a_step(server, oracle, extra):
    r = complete(server, "poet", **extra)
    assert r.status_code == 200, r.text
    assert complete(server, "sql-expert").json()["choices"][0]["text"] == oracle["sql-expert"]


def test_the_sampler_fails_only_a_non_finite_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [float("nan"), 0.0, 0.0], [0.0, float("inf"), 0.0]])
    sampled = SamplingParams(temperature=1e-30, top_p=1e-300)
    tokens, logprobs = Sampler()(logits, [1, 2, 3], [sampled, sampled, SamplingParams()])
    assert tokens == [1, FAILED, FAILED]
    assert logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[1].item())


def test_bodies_over_the_limit_are_413_before_they_are_read(server):
    big = {"model": "poet", "prompt": "x" * MAX_BODY}
    r = httpx.post(f"{server.url}/v1/completions", json=big)
    assert r.status_code == 413 and "max-request-bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "poet", "prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    r = httpx.post(
        f"{server.url}/generate", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "max-request-bytes" in r.json()["error"], r.text
    r = httpx.put(f"{server.url}/v1/adapters/x", json={"source": "/" + "a" * MAX_BODY})
    assert r.status_code == 413
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_tokenizing_never_blocks_the_event_loop(server, monkeypatch):
    tokenizer = server.runtime.tokenizer
    real_encode = tokenizer.encode
    inside, release = threading.Event(), threading.Event()

    def slow_encode(text, *args, **kwargs):
        if text.startswith("SLOW"):
            inside.set()
            release.wait(timeout=30)
        return real_encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)
    result: list[httpx.Response] = []
    body = {"model": "poet", "prompt": "SLOW hello", "max_tokens": 2}
    t = threading.Thread(
        target=lambda: result.append(
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        )
    )
    t.start()
    try:
        assert inside.wait(timeout=30)
        # The tokenizer is stuck inside this request: the loop still answers.
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        assert complete(server, "poet").status_code == 200
    finally:
        release.set()
        t.join(timeout=60)
    assert result[0].status_code == 200, result[0].text


def test_a_prompt_that_cannot_fit_is_refused_from_its_prefix(server, monkeypatch):
    tokenizer = server.runtime.tokenizer
    real_encode = tokenizer.encode
    lengths: list[int] = []

    def spy(text, *args, **kwargs):
        lengths.append(len(text))
        return real_encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", spy)
    prompt = "hello world " * 5000  # 60 kB, under the body limit; ~10k tokens
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "poet", "prompt": prompt})
    assert r.status_code == 400 and "limit" in r.json()["error"]["message"], r.text
    assert lengths and max(lengths) < len(prompt)  # never the whole prompt


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", '{"model": "poet", "prompt": "a\\ud800b"}'),
        ("/v1/chat/completions", '{"model": "poet", "messages": [{"role": "user", "content": "\\udfff"}]}'),
        ("/generate", '{"inputs": "x\\ud83d"}'),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_a_400(server, path, body):
    r = httpx.post(
        f"{server.url}{path}", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code in (400, 422) and "surrogate" in r.text, r.text


def test_prompts_get_the_tokenizers_bos_as_peft_vllm_and_tgi_give_it(demo_dir, tmp_path):
    base, adapters = demo_dir
    bos_base = tmp_path / "bos" / "base"  # the adapters name a base called "base"
    shutil.copytree(base, bos_base)
    spec = json.loads((bos_base / "tokenizer.json").read_text())
    bos = next(t for t in spec["added_tokens"] if t["content"] == "<s>")
    spec["post_processor"] = {  # what a Llama tokenizer does: BOS before every text
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [bos["id"]], "tokens": ["<s>"]}},
    }  # fmt: skip
    (bos_base / "tokenizer.json").write_text(json.dumps(spec))
    from transformers import AutoTokenizer

    want_ids = AutoTokenizer.from_pretrained(str(bos_base))(PROMPT).input_ids
    assert want_ids[0] == bos["id"]  # the oracle adds BOS: check it before trusting it
    want = peft_greedy(bos_base, adapters["poet"], [PROMPT], 8, special=True)[0]
    config = make_config(bos_base, tmp_path, adapters={"poet": str(adapters["poet"])})
    with RunningServer(config) as server:
        r = complete(server, "poet")
        assert r.json()["usage"]["prompt_tokens"] == len(want_ids)
        assert r.json()["choices"][0]["text"] == want
        tgi = httpx.post(
            f"{server.url}/generate",
            json={"inputs": PROMPT, "parameters": {"adapter_id": "poet", "max_new_tokens": 8, "details": True}},
        )  # fmt: skip
        assert tgi.json()["generated_text"] == want
        assert tgi.json()["details"]["prompt_tokens"] == len(want_ids)


def test_a_stream_cut_by_the_shutdown_deadline_ends_with_an_event(demo_dir, tmp_path, monkeypatch):
    base, adapters = demo_dir
    config = make_config(base, tmp_path, adapters={"poet": str(adapters["poet"])})
    with RunningServer(config) as server:
        engine = server.runtime.engine
        body = {"model": "poet", "prompt": PROMPT, "max_tokens": 400, "stream": True}
        events = []
        with httpx.stream(
            "POST", f"{server.url}/v1/completions", json=body | {"ignore_eos": True}, timeout=60
        ) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                events.append(line)
                if len(events) == 2:
                    server.runtime.begin_shutdown(0.0)  # the deadline is now
        assert events[-1] == "data: [DONE]", events[-3:]
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == "shutting_down" and "retry" in error["message"]
        assert engine.idle()
