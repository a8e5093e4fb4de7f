"""The only HTTP the operator sends to runtime pods: their admin API and /metrics.

Answers are parsed with the wire models both sides share (loraplane.api.wire); a refusal
becomes a RuntimeCallError carrying the runtime's error code, which the sync turns into a
condition. Credentials travel only in PUT bodies and never reach a log or an error message.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

import httpx
from pydantic import ValidationError

from loraplane.api.wire import (
    ADAPTERS_PATH,
    METRICS_PATH,
    PERMANENT_ERRORS,
    AdapterInfo,
    AdapterList,
    AdapterLoadRequest,
    ErrorBody,
)

# Idempotent calls (GET, DELETE) are tried this many times on a connection error before the
# pod counts as unreachable for this round; the periodic resync tries again later.
ATTEMPTS = 3
RETRY_DELAYS = (0.2, 0.5)
UNREACHABLE = "unreachable"
# Connections kept per pod: a sync, a scrape and an unload can overlap on one pod.
PER_POD = 4


class RuntimeCallError(Exception):
    """A call to a pod failed: refused with an error code, or the pod did not answer."""

    def __init__(
        self, pod: str, code: str, message: str, status: int | None = None, call: str = ""
    ) -> None:
        super().__init__(f"pod {pod}: {call}: {message}" if call else f"pod {pod}: {message}")
        # message is the runtime's own words: what conditions show to the adapter's owner.
        self.pod, self.code, self.message, self.status = pod, code, message, status

    @property
    def permanent(self) -> bool:
        return self.code in PERMANENT_ERRORS

    @property
    def unreachable(self) -> bool:
        return self.code == UNREACHABLE


@dataclass(frozen=True)
class PodAddress:
    pod: str
    ip: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}"


class RuntimeClient:
    """One small connection pool per pod: httpx scans its whole pool on every request, so a
    single pool for hundreds of pods spends the operator's CPU finding a connection."""

    def __init__(self, timeout: float, load_timeout: float, max_pods: int = 4096) -> None:
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.max_pods = max_pods
        self._clients: OrderedDict[str, httpx.AsyncClient] = OrderedDict()

    def _client(self, url: str) -> httpx.AsyncClient:
        client = self._clients.get(url)
        if client is None:
            # Never a proxy: pod addresses are only reachable directly.
            client = httpx.AsyncClient(
                timeout=self.timeout,
                trust_env=False,
                limits=httpx.Limits(max_connections=PER_POD, max_keepalive_connections=PER_POD),
            )
            self._clients[url] = client
            while len(self._clients) > self.max_pods:  # pods long gone: close their pools
                _, old = self._clients.popitem(last=False)
                asyncio.get_running_loop().create_task(old.aclose())
        else:
            self._clients.move_to_end(url)
        return client

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), OrderedDict()
        await asyncio.gather(*(c.aclose() for c in clients))

    async def list_adapters(self, pod: PodAddress, token: str) -> dict[str, AdapterInfo]:
        r = await self._call("GET", pod, ADAPTERS_PATH, token)
        try:
            listed = AdapterList.model_validate_json(r.content)
        except ValidationError as e:
            raise RuntimeCallError(pod.pod, "bad_answer", f"GET {ADAPTERS_PATH}: {e}") from None
        return {a.name: a for a in listed.adapters}

    async def load(
        self, pod: PodAddress, token: str, name: str, request: AdapterLoadRequest
    ) -> AdapterInfo:
        body = request.model_dump(mode="json", exclude_none=True)
        r = await self._call(
            "PUT",
            pod,
            f"{ADAPTERS_PATH}/{name}",
            token,
            json=body,
            timeout=self.load_timeout,
            retry=False,
        )
        try:
            return AdapterInfo.model_validate_json(r.content)
        except ValidationError as e:
            raise RuntimeCallError(pod.pod, "bad_answer", f"PUT {name}: {e}") from None

    async def unload(self, pod: PodAddress, token: str, name: str) -> None:
        try:
            await self._call("DELETE", pod, f"{ADAPTERS_PATH}/{name}", token)
        except RuntimeCallError as e:
            if e.status != 404:  # already gone is what we wanted
                raise

    async def metrics(self, pod: PodAddress) -> str:
        r = await self._call("GET", pod, METRICS_PATH, None)
        return r.text

    async def _call(
        self,
        method: str,
        pod: PodAddress,
        path: str,
        token: str | None,
        *,
        json: dict | None = None,
        timeout: float | None = None,
        retry: bool = True,
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        attempts = ATTEMPTS if retry else 1
        for attempt in range(attempts):
            try:
                r = await self._client(pod.url).request(
                    method,
                    pod.url + path,
                    json=json,
                    headers=headers,
                    timeout=timeout or self.timeout,
                )
                break
            except httpx.TransportError as e:
                if attempt + 1 >= attempts:
                    raise RuntimeCallError(
                        pod.pod,
                        UNREACHABLE,
                        f"{method} {path} at {pod.url}: {type(e).__name__} {e}",
                    ) from None
                await asyncio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
        if r.status_code >= 400:
            raise _refusal(pod.pod, method, path, r)
        return r


def _refusal(pod: str, method: str, path: str, r: httpx.Response) -> RuntimeCallError:
    try:
        err = ErrorBody.model_validate_json(r.content).error
        code, message = err.code or f"http_{r.status_code}", err.message
    except ValidationError:
        code, message = f"http_{r.status_code}", r.text[:300]
    return RuntimeCallError(pod, code, message, r.status_code, call=f"{method} {path}")
