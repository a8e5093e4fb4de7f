"""The few Kubernetes API calls the simulated runtime makes, on aiohttp: list, watch, get, patch.

Not the kubernetes client: it is synchronous and builds a typed object per pod, which costs
more memory and CPU than the whole simulated fleet.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class Expired(Exception):
    """A watch's resourceVersion is too old (410): list again."""


@dataclass(frozen=True)
class Endpoint:
    server: str
    ssl: ssl.SSLContext | bool
    headers: dict[str, str]


def endpoint_from_kubeconfig(path: Path) -> Endpoint:
    """Server, TLS and credentials of the kubeconfig's current context (certs or a token)."""
    cfg = yaml.safe_load(path.read_text())
    ctx_name = cfg.get("current-context")
    ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
    user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
    if cluster.get("insecure-skip-tls-verify"):
        context: ssl.SSLContext | bool = False
    else:
        context = ssl.create_default_context()
        if "certificate-authority-data" in cluster:
            context.load_verify_locations(
                cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
            )
        elif "certificate-authority" in cluster:
            context.load_verify_locations(cafile=cluster["certificate-authority"])
    if isinstance(context, ssl.SSLContext):
        _load_client_cert(context, user)
    headers = {"Accept": "application/json"}
    if "token" in user:
        headers["Authorization"] = f"Bearer {user['token']}"
    return Endpoint(cluster["server"].rstrip("/"), context, headers)


def _load_client_cert(context: ssl.SSLContext, user: dict[str, Any]) -> None:
    if "client-certificate-data" in user:
        # ssl reads certificates only from files: write them for the call, then drop them.
        with tempfile.TemporaryDirectory() as d:
            crt, key = Path(d) / "c.crt", Path(d) / "c.key"
            crt.write_bytes(base64.b64decode(user["client-certificate-data"]))
            key.write_bytes(base64.b64decode(user["client-key-data"]))
            context.load_cert_chain(crt, key)
    elif "client-certificate" in user:
        context.load_cert_chain(user["client-certificate"], user["client-key"])


class Kube:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.session = aiohttp.ClientSession(
            headers=endpoint.headers,
            connector=aiohttp.TCPConnector(ssl=endpoint.ssl, limit=16),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    async def close(self) -> None:
        await self.session.close()

    async def get(self, path: str, **params: str) -> dict[str, Any]:
        async with self.session.get(self.endpoint.server + path, params=params) as resp:
            return await _answer(resp)

    async def patch(self, path: str, body: dict[str, Any], content_type: str) -> dict[str, Any]:
        async with self.session.patch(
            self.endpoint.server + path,
            data=json.dumps(body),
            headers={"Content-Type": content_type},
        ) as resp:
            return await _answer(resp)

    async def watch(
        self, path: str, resource_version: str, timeout_s: int = 300
    ) -> AsyncIterator[dict[str, Any]]:
        """Events after resource_version until the server ends the watch (timeout_s)."""
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout_s + 30)
        async with self.session.get(
            self.endpoint.server + path, params=params, timeout=timeout
        ) as resp:
            if resp.status != 200:
                await _answer(resp)
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event["type"] == "ERROR":
                    status = event["object"]
                    if status.get("code") == 410:
                        raise Expired(status.get("message", "resourceVersion too old"))
                    raise ApiError(status.get("code", 500), status.get("message", str(status)))
                yield event


async def _answer(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await resp.read()
    if resp.status >= 400:
        try:
            message = json.loads(body).get("message", body.decode(errors="replace"))
        except ValueError:
            message = body.decode(errors="replace")
        raise ApiError(resp.status, message)
    return json.loads(body)
