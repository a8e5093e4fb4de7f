"""The admin API: bearer auth, idempotent PUT, replace, DELETE, and every validation error."""

from __future__ import annotations

import hashlib
import threading

import httpx
import pytest
import torch
from runtime_helpers import RunningServer, copy_adapter, make_config, rewrite_weights, wait_for

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# support-bot has rank 16 and targets every projection: both are refused below.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    base, _ = demo_dir
    config = make_config(
        base,
        tmp_path_factory.mktemp("admin"),
        admin_token=TOKEN,
        max_lora_rank=8,
        lora_target_modules=TARGETS,
    )
    with RunningServer(config) as running:
        yield running


def put(server, name, **body):
    return httpx.put(f"{server.url}/v1/adapters/{name}", json=body, headers=AUTH, timeout=60)


def test_admin_needs_the_bearer_token(server):
    assert httpx.get(f"{server.url}/v1/adapters").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    r = httpx.put(f"{server.url}/v1/adapters/x", json={"source": "/x"}, headers=wrong)
    assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
    assert httpx.delete(f"{server.url}/v1/adapters/x").status_code == 401
    # Serving routes stay open.
    assert httpx.get(f"{server.url}/v1/models").status_code == 200


def test_put_is_idempotent_reports_residency_and_replaces(server, demo_dir, tmp_path):
    _, adapters = demo_dir
    source = f"file://{adapters['sql-expert']}"
    sha = hashlib.sha256((adapters["sql-expert"] / "adapter_model.safetensors").read_bytes())
    first = put(server, "sql", source=source, sha256=sha.hexdigest())
    assert first.status_code == 201, first.text
    info = first.json()
    assert info["sha256"] == sha.hexdigest() and info["rank"] == 8
    assert info["target_modules"] == ["q_proj", "v_proj"] and info["tier"] in ("gpu", "cpu")
    assert info["size_bytes"] > 0 and info["state"] == "loaded" and info["loaded_at"]
    again = put(server, "sql", source=source)
    assert again.status_code == 200 and again.json()["loaded_at"] == info["loaded_at"]
    upper = put(server, "sql", source=source, sha256=sha.hexdigest().upper())
    assert upper.status_code == 200 and upper.json()["loaded_at"] == info["loaded_at"]
    other = copy_adapter(adapters["sql-expert"], tmp_path / "v2", lora_alpha=4)
    replaced = put(server, "sql", source=f"file://{other}")
    assert replaced.status_code == 201 and replaced.json()["loaded_at"] >= info["loaded_at"]
    listed = httpx.get(f"{server.url}/v1/adapters", headers=AUTH).json()["adapters"]
    assert [(a["name"], a["source"]) for a in listed] == [("sql", f"file://{other}")]
    gone = httpx.delete(f"{server.url}/v1/adapters/sql", headers=AUTH)
    assert gone.status_code == 200 and gone.json()["state"] in ("unloaded", "unloading")
    assert httpx.delete(f"{server.url}/v1/adapters/sql", headers=AUTH).status_code == 404
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "sql", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def _bad_adapters(adapters, tmp):
    poet = adapters["poet"]

    def extra_layer(t):
        keys = [k for k in t if "layers.0.self_attn.o_proj" in k]
        return t | {k.replace("layers.0", "layers.9"): t[k].clone() for k in keys}

    def embedding(t):
        return t | {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)}

    (tmp / "no-weights").mkdir()
    (tmp / "no-weights" / "adapter_config.json").write_text(
        (poet / "adapter_config.json").read_text()
    )
    corrupt = copy_adapter(poet, tmp / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    return [
        # (name, body, status, words the message must hold)
        (
            "ok-name",
            {
                "source": f"file://{copy_adapter(poet, tmp / 'other', base_model_name_or_path='org/other-model')}"
            },
            422,
            ["trained on", "org/other-model"],
        ),
        (
            "ok-name",
            {"source": f"file://{adapters['support-bot']}"},
            422,
            ["rank 16", "--max-lora-rank 8"],
        ),
        (
            "ok-name",
            {"source": f"file://{rewrite_weights(copy_adapter(poet, tmp / 'l9'), extra_layer)}"},
            422,
            ["does not have", "layers.9"],
        ),
        ("ok-name", {"source": f"file://{poet}"}, 422, ["down_proj", "does not serve"]),
        (
            "ok-name",
            {"source": f"file://{copy_adapter(poet, tmp / 'dora', use_dora=True)}"},
            422,
            ["DoRA"],
        ),
        (
            "ok-name",
            {"source": f"file://{copy_adapter(poet, tmp / 'mts', modules_to_save=['lm_head'])}"},
            422,
            ["modules_to_save"],
        ),
        (
            "ok-name",
            {"source": f"file://{rewrite_weights(copy_adapter(poet, tmp / 'emb'), embedding)}"},
            422,
            ["embeddings"],
        ),
        (
            "ok-name",
            {"source": f"file://{tmp / 'no-weights'}"},
            422,
            ["adapter_model.safetensors is missing"],
        ),
        ("ok-name", {"source": f"file://{corrupt}"}, 422, ["safetensors"]),
        ("ok-name", {"source": f"file://{tmp / 'nowhere'}"}, 404, ["not a directory"]),
        ("ok-name", {"source": "ftp://host/x"}, 400, ["scheme"]),
        ("ok-name", {"source": "file://relative/dir"}, 400, ["absolute"]),
        ("ok-name", {"source": "pvc://claim/../../etc"}, 400, ["inside the claim"]),
        (
            "ok-name",
            {"source": f"file://{adapters['sql-expert']}", "sha256": "0" * 64},
            422,
            ["sha256"],
        ),
        (
            "ok-name",
            {"source": f"file://{adapters['sql-expert']}", "sha256": "xyz"},
            400,
            ["sha256"],
        ),
        (
            "ok-name",
            {"source": f"file://{adapters['sql-expert']}", "surprise": 1},
            400,
            ["surprise"],
        ),
        (
            "ok-name",
            {"source": f"file://{adapters['sql-expert']}", "credentials": {"NOPE": "x"}},
            400,
            ["unknown credential keys", "NOPE"],
        ),
        ("bad name", {"source": f"file://{adapters['sql-expert']}"}, 400, ["is not valid"]),
        ("_lead", {"source": f"file://{adapters['sql-expert']}"}, 400, ["is not valid"]),
        ("-lead", {"source": f"file://{adapters['sql-expert']}"}, 400, ["is not valid"]),
        ("trail.", {"source": f"file://{adapters['sql-expert']}"}, 400, ["is not valid"]),
        ("x" * 129, {"source": f"file://{adapters['sql-expert']}"}, 400, ["is not valid"]),
    ]


def test_every_validation_error_is_a_clear_4xx(server, demo_dir, tmp_path):
    _, adapters = demo_dir
    failures = []
    for name, body, status, words in _bad_adapters(adapters, tmp_path):
        r = put(server, name, **body)
        message = (
            r.json()["error"]["message"]
            if r.headers.get("content-type", "").startswith("application/json")
            and isinstance(r.json().get("error"), dict)
            else r.text
        )
        if r.status_code != status or not all(w in message for w in words):
            failures.append((name, body, r.status_code, message))
    assert not failures, "\n".join(map(str, failures))
    assert httpx.get(f"{server.url}/v1/adapters", headers=AUTH).json()["adapters"] == []


class JoinedEvent(threading.Event):
    """A load's `done` event that counts the PUTs waiting on it: those that joined the load."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waiters += 1
        return super().wait(timeout)


async def test_a_retried_put_joins_the_load_in_flight(server, demo_dir, monkeypatch):
    import asyncio
    import threading

    _, adapters = demo_dir
    fetcher = server.runtime.adapters.fetcher
    real_fetch = fetcher.fetch
    calls = []
    release = threading.Event()

    def slow_fetch(*args, **kwargs):
        calls.append(args)
        release.wait(10)  # a slow download
        return real_fetch(*args, **kwargs)

    monkeypatch.setattr(fetcher, "fetch", slow_fetch)
    body = {"source": str(adapters["sql-expert"])}
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
        first = asyncio.create_task(client.put("/v1/adapters/slow", json=body))
        await asyncio.to_thread(wait_for, lambda: calls, "the first PUT to fetch")
        # Watch the load's outcome, which a joining PUT waits on.
        loading = server.runtime.adapters.loading_now()["slow"]
        loading.done = joined = JoinedEvent()
        retry = asyncio.create_task(client.put("/v1/adapters/slow", json=body))
        listed = (await client.get("/v1/adapters")).json()["adapters"]
        assert [(a["name"], a["state"]) for a in listed] == [("slow", "loading")]
        one = await client.get("/v1/adapters/slow")
        assert one.status_code == 200 and one.json()["state"] == "loading", one.text
        await asyncio.to_thread(wait_for, lambda: joined.waiters, "the retried PUT to join")
        release.set()
        statuses = sorted([(await first).status_code, (await retry).status_code])
        assert statuses == [200, 201] and len(calls) == 1
        listed = (await client.get("/v1/adapters")).json()["adapters"]
        assert [(a["name"], a["state"]) for a in listed] == [("slow", "loaded")]
        assert (await client.delete("/v1/adapters/slow")).status_code == 200


async def test_a_delete_during_a_load_cancels_it(server, demo_dir, monkeypatch):
    import asyncio
    import threading

    _, adapters = demo_dir
    fetcher = server.runtime.adapters.fetcher
    real_fetch = fetcher.fetch
    started, release = threading.Event(), threading.Event()

    def slow_fetch(*args, **kwargs):
        started.set()
        release.wait(10)
        return real_fetch(*args, **kwargs)

    monkeypatch.setattr(fetcher, "fetch", slow_fetch)
    body = {"source": str(adapters["sql-expert"])}
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
        put = asyncio.create_task(client.put("/v1/adapters/doomed", json=body))
        await asyncio.to_thread(wait_for, started.is_set, "the fetch to start")
        gone = await client.delete("/v1/adapters/doomed")
        assert gone.status_code == 200 and gone.json()["state"] == "unloaded", gone.text
        release.set()
        r = await put
        assert r.status_code == 409 and "a DELETE came" in r.json()["error"]["message"]
        assert (await client.get("/v1/adapters")).json()["adapters"] == []


async def test_the_newest_put_wins_over_an_older_slower_one(server, demo_dir, monkeypatch):
    import asyncio
    import threading

    _, adapters = demo_dir
    fetcher = server.runtime.adapters.fetcher
    real_fetch = fetcher.fetch
    started, release = threading.Event(), threading.Event()
    slow_source = str(adapters["sql-expert"])

    def fetch(source, *args, **kwargs):
        if source == slow_source:
            started.set()
            release.wait(10)
        return real_fetch(source, *args, **kwargs)

    monkeypatch.setattr(fetcher, "fetch", fetch)
    newer = copy_adapter(adapters["sql-expert"], server.runtime.config.cache_dir / "newer")
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
        old = asyncio.create_task(client.put("/v1/adapters/race", json={"source": slow_source}))
        await asyncio.to_thread(wait_for, started.is_set, "the fetch to start")
        r = await client.put("/v1/adapters/race", json={"source": str(newer)})
        assert r.status_code == 201, r.text
        release.set()
        r = await old
        assert r.status_code == 409 and "replaced it" in r.json()["error"]["message"], r.text
        listed = (await client.get("/v1/adapters")).json()["adapters"]
        assert [(a["name"], a["source"]) for a in listed] == [("race", str(newer))]
        assert (await client.delete("/v1/adapters/race")).status_code == 200


def test_hub_style_names_load_and_are_listed_as_models(server, demo_dir):
    """servedName accepts names like Magicoder_v2 (loraplane.api.wire): so must every pod."""
    _, adapters = demo_dir
    r = put(server, "Magicoder_v2.1", source=f"file://{adapters['sql-expert']}")
    assert r.status_code in (200, 201), r.text
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    assert "Magicoder_v2.1" in [m["id"] for m in models]
    assert httpx.delete(f"{server.url}/v1/adapters/Magicoder_v2.1", headers=AUTH).status_code == 200
