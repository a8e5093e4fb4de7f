"""Property-based fuzzing of every POST/PUT route from the server's own OpenAPI document.

Bodies come from each route's request schema (from_schema below), and from arbitrary
JSON, so both well-typed extremes (huge numbers, tiny floats, odd strings) and wrong types
reach the handlers. The property: never a 5xx, every answer is JSON, and the server is
healthy afterwards. The budget is fixed (max_examples, derandomized) so the run is the same
every time.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_helpers import RunningServer, make_config, wait_for

EXAMPLES = 100  # per route: about 600 requests in all, ~40 s on two shared cores


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    base, adapters = demo_dir
    config = make_config(
        base,
        tmp_path_factory.mktemp("fuzz"),
        adapters={"poet": str(adapters["poet"])},
        max_num_batched_tokens=128,  # every sequence is short: the budget buys inputs, not decoding
        max_request_bytes=1 << 16,
        fetch_timeout_s=2.0,
    )
    with RunningServer(config) as running:
        yield running


def routes(spec: dict) -> dict[str, tuple[str, dict]]:
    """path -> (method, body schema with its components) of every route that takes a body."""
    out = {}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            content = op.get("requestBody", {}).get("content", {}).get("application/json")
            if content:
                schema = dict(content["schema"]) | {"components": spec.get("components", {})}
                out[path] = (method.upper(), schema)
    return out


def from_schema(schema: dict, root: dict | None = None, depth: int = 0) -> st.SearchStrategy:
    """Values of a JSON schema as FastAPI writes them (properties, anyOf, $ref, enum, bounds),
    with the bounds' edges and beyond: the server must refuse what is outside, not crash."""
    root = root or schema
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return from_schema(root["components"]["schemas"][name], root, depth + 1)
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of(
            [from_schema(s, root, depth) for s in schema.get("anyOf", schema.get("oneOf"))]
        )
    if "enum" in schema or "const" in schema:
        return st.sampled_from(schema.get("enum", [schema.get("const")]))
    kind = schema.get("type")
    if kind == "object" and "properties" in schema and depth < 4:
        props = {k: from_schema(v, root, depth + 1) for k, v in schema["properties"].items()}
        required = {k: props.pop(k) for k in schema.get("required", []) if k in props}
        return st.fixed_dictionaries(required, optional=props)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), root, depth + 1), max_size=3)
    if kind == "integer":
        edges = [schema.get(k) for k in ("minimum", "maximum", "exclusiveMinimum")]
        return st.integers() | st.sampled_from([e for e in edges if e is not None] + [0, -1, 2**64])
    if kind == "number":
        return st.floats() | st.sampled_from([1e-300, 5e-324, 1e300, 0.0, -0.0, 2.0, 100.0])
    if kind == "string":
        return st.text(max_size=30) | st.sampled_from(["", "\ud800", "a" * 3000, "/tmp", "poet"])
    if kind == "boolean":
        return st.booleans()
    return JSON


JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def check(server, client: httpx.Client, method: str, path: str, body) -> None:
    # json.dumps escapes lone surrogates and writes NaN/Infinity, as a hostile client may.
    r = client.request(
        method,
        f"{server.url}{path}",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
    )
    assert r.status_code < 500 or r.status_code in (502, 503, 504, 507), (path, body, r.text)
    assert r.headers["content-type"].startswith(("application/json", "text/event-stream"))
    if r.status_code >= 400:
        assert "error" in r.json(), r.text


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.parametrize(
    "path",
    ["/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream", "/", "/v1/adapters/{name}"],
)  # fmt: skip
def test_fuzz_a_route_from_its_openapi_schema(server, path):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    method, schema = routes(spec)[path]
    url = path.replace("{name}", "fuzzed")

    with httpx.Client(timeout=60) as client:

        @FUZZ
        @given(body=from_schema(schema) | JSON)
        def one(body):
            check(server, client, method, url, body)

        one()
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    wait_for(server.runtime.engine.idle, "every fuzzed request to end")
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "poet", "prompt": "hello", "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
