"""The only HTTP the router sends to runtime pods: one try, up to the first byte of the answer.

A try either opens an answer (status, headers and its first chunk in hand, nothing sent to the
client yet) or fails in a way `retry` classifies. Reading up to the first chunk is what lets a
request that broke before any byte go to another pod without the client noticing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import httpx

from .config import RouterConfig
from .retry import Failure, refusal_failure
from .table import Backend

# Headers a client's request carries to a pod: what the runtime reads, and tracing. Never the
# client's API key, cookies or anything hop-by-hop.
REQUEST_HEADERS = frozenset(
    {"content-type", "accept", "user-agent", "x-request-id", "traceparent", "tracestate"}
)
# Headers of a pod's answer that are the connection's, not the answer's.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "server",
        "date",
    }
)
# A refusal body read to classify it (429 / 503) is small; a large one is not a refusal.
REFUSAL_BYTES = 64 << 10
# Below the runtime's (uvicorn's) 5 s keep-alive, so the router never reuses a connection the
# pod is closing at the same moment: such a race would look like a pod failure.
KEEPALIVE_SECONDS = 2.0


@dataclass
class Opened:
    """A pod's answer whose first chunk is in hand; close() when done with it."""

    status: int
    headers: list[tuple[str, str]]
    first: bytes
    rest: AsyncIterator[bytes]
    response: httpx.Response = field(repr=False)

    @property
    def whole(self) -> bool:
        """The first chunk is the whole answer (its Content-Length says so): most answers
        that do not stream, which then need no streaming back."""
        length = self.response.headers.get("content-length", "")
        return length.isdigit() and len(self.first) >= int(length)

    async def close(self) -> None:
        await self.response.aclose()


@dataclass(frozen=True)
class Failed:
    failure: Failure
    message: str
    answer: tuple[int, list[tuple[str, str]], bytes] | None = None
    """The pod's own refusal (status, headers, body) when it gave one."""


class Upstream:
    """One httpx transport (a connection pool) per pod, used without a Client: httpx scans a
    pool's every connection for each request, so one pool over all pods made a large fleet's
    pods slow each other down, and a Client's redirect, cookie and auth handling is work a
    proxy must not do anyway."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self._pools: dict[tuple[str, str], httpx.AsyncHTTPTransport] = {}  # (pod, url) ->
        c = config
        self._timeout = httpx.Timeout(
            connect=c.connect_timeout_seconds,
            read=c.read_timeout_seconds,
            write=c.connect_timeout_seconds * 10,
            pool=c.hold_timeout_seconds,
        ).as_dict()

    def _pool(self, pod: Backend) -> httpx.AsyncHTTPTransport:
        key = (pod.name, pod.url)
        pool = self._pools.get(key)
        if pool is None:
            # A transport never uses a proxy: pod addresses are reachable only directly.
            pool = self._pools[key] = httpx.AsyncHTTPTransport(
                limits=httpx.Limits(
                    max_connections=self.config.max_connections,
                    max_keepalive_connections=self.config.max_connections,
                    keepalive_expiry=KEEPALIVE_SECONDS,
                ),
            )
        return pool

    async def forget(self, keep: Callable[[str, str], bool]) -> None:
        """Close the pools of pods that keep(pod, url) says are gone for good."""
        gone = [key for key in self._pools if not keep(*key)]
        for key in gone:
            await self._pools.pop(key).aclose()

    async def close(self) -> None:
        await self.forget(lambda pod, url: False)

    async def open(
        self, pod: Backend, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> Opened | Failed:
        sent = {k: v for k, v in headers.items() if k.lower() in REQUEST_HEADERS}
        request = httpx.Request(
            method,
            pod.url + path,
            headers=sent,
            content=body,
            extensions={"timeout": self._timeout},
        )
        try:
            response = await self._pool(pod).handle_async_request(request)
        except httpx.HTTPError as e:
            return Failed(_failure(e), f"pod {pod.name} ({pod.url}): {_describe(e)}")
        kept = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in HOP_BY_HOP]
        chunks = response.aiter_raw()
        try:
            first = await anext(chunks, b"")
            if response.status_code in (429, 503):  # a refusal, unless its body says otherwise
                while len(first) <= REFUSAL_BYTES and (more := await anext(chunks, b"")):
                    first += more
        except httpx.HTTPError as e:
            await response.aclose()
            return Failed(_failure(e), f"pod {pod.name} ({pod.url}): {_describe(e)}")
        failure = refusal_failure(response.status_code, first)
        if failure is not None:
            await response.aclose()
            message = f"pod {pod.name} answered {response.status_code} ({failure})"
            return Failed(failure, message, (response.status_code, kept, first))
        return Opened(response.status_code, kept, first, chunks, response)


def _failure(e: httpx.HTTPError) -> Failure:
    if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
        return Failure.UNREACHABLE
    if isinstance(e, httpx.PoolTimeout):
        return Failure.OVERLOADED  # the router's own connections are all busy
    if isinstance(e, httpx.ReadTimeout):
        return Failure.TIMEOUT
    return Failure.BROKEN


def _describe(e: httpx.HTTPError) -> str:
    return f"{type(e).__name__} {e}".strip()
