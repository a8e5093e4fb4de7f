"""Kubernetes watches that keep the router's table current: list once, then follow the changes.

The kubernetes client is synchronous, so each collection is followed by one thread (list,
then watch from the list's resourceVersion; list again when the server says it is too old),
and every change is handed to the event loop, which alone touches the table.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from loraplane.api import BASE_MODEL_DEPLOYMENT, GROUP, LORA_ADAPTER, VERSION

from .config import RouterConfig
from .dispatch import Router
from .keys import Access

log = logging.getLogger(__name__)

RESET = "RESET"  # a fresh list: the whole collection, replacing what was known
# The server ends each watch after this long; a watch that goes silent for longer than the
# read timeout is a dead connection, and the collection is listed again.
WATCH_SECONDS = 240
READ_TIMEOUT = WATCH_SECONDS + 30
ERROR_DELAYS = (1, 2, 5, 10, 30)
PODS, ADAPTERS, BASE, KEYS = "pods", "loraadapters", "basemodeldeployment", "apikeys"


@dataclass(frozen=True)
class Collection:
    name: str
    path: str
    label_selector: str = ""
    field_selector: str = ""

    def query(self) -> list[tuple[str, str]]:
        out = []
        if self.label_selector:
            out.append(("labelSelector", self.label_selector))
        if self.field_selector:
            out.append(("fieldSelector", self.field_selector))
        return out


def collections(config: RouterConfig) -> list[Collection]:
    """What the router watches in its namespace; its Role grants exactly these reads."""
    ns = config.namespace
    out = [
        Collection(PODS, f"/api/v1/namespaces/{ns}/pods", label_selector=config.pod_selector),
        Collection(ADAPTERS, f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{LORA_ADAPTER.plural}"),
        Collection(
            BASE,
            f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{BASE_MODEL_DEPLOYMENT.plural}",
            field_selector=f"metadata.name={config.base}",
        ),
    ]
    if config.api_keys_secret:
        out.append(
            Collection(
                KEYS,
                f"/api/v1/namespaces/{ns}/secrets",
                field_selector=f"metadata.name={config.api_keys_secret}",
            )
        )
    return out


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class Watcher:
    """Follows one collection in a thread; deliver(type, objects) runs on the event loop."""

    def __init__(
        self,
        api: client.ApiClient,
        collection: Collection,
        deliver: Callable[[str, list[dict[str, Any]]], None],
        stop: threading.Event,
    ) -> None:
        self.api, self.collection, self.deliver, self.stop = api, collection, deliver, stop

    def run(self) -> None:
        errors = 0
        while not self.stop.is_set():
            try:
                items, version = self._list()
                self.deliver(RESET, items)
                errors = 0
                while not self.stop.is_set():
                    version = self._watch(version)
            except _Gone:
                continue
            except Exception as e:
                delay = ERROR_DELAYS[min(errors, len(ERROR_DELAYS) - 1)]
                errors += 1
                log.warning("%s: %s; listing again in %ss", self.collection.name, _why(e), delay)
                self.stop.wait(delay)

    def _list(self) -> tuple[list[dict[str, Any]], str]:
        body = self.api.call_api(
            self.collection.path,
            "GET",
            query_params=self.collection.query(),
            header_params={"Accept": "application/json"},
            response_type="object",
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _preload_content=True,
            _request_timeout=30,
        )
        return list(body.get("items") or []), body["metadata"]["resourceVersion"]

    def _watch(self, version: str) -> str:
        """Follow changes from `version` until the server ends the watch; the last version."""
        response = self.api.call_api(
            self.collection.path,
            "GET",
            query_params=[
                *self.collection.query(),
                ("watch", "true"),
                ("resourceVersion", version),
                ("allowWatchBookmarks", "true"),
                ("timeoutSeconds", str(WATCH_SECONDS)),
            ],
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _preload_content=False,
            _request_timeout=(10, READ_TIMEOUT),
        )
        try:
            for line in iter_resp_lines(response):
                if self.stop.is_set():
                    break
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise RuntimeError(f"watch error: {obj.get('message') or obj}")
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.deliver(kind, [obj])
        finally:
            response.release_conn()
        return version


class Feed:
    """Applies each collection's changes to the router's table and access, on the event loop."""

    def __init__(self, router: Router, access: Access, expected: list[str]) -> None:
        self.router, self.access = router, access
        self.unlisted = set(expected)

    def apply(self, collection: str, kind: str, objects: Sequence[Mapping[str, Any]]) -> None:
        table = self.router.table
        if collection == PODS:
            _apply(kind, objects, table.set_pods, table.put_pod, table.drop_pod)
        elif collection == ADAPTERS:
            _apply(kind, objects, table.set_adapters, table.put_adapter, table.drop_adapter)
        elif collection == BASE:
            table.set_base(None if kind == "DELETED" or not objects else objects[0])
        elif collection == KEYS:
            self.access.update(None if kind == "DELETED" or not objects else objects[0])
        if kind == RESET and collection in self.unlisted:
            self.unlisted.discard(collection)
            if not self.unlisted:
                log.info("every collection listed: routing")
                self.router.synced.set()
        self.router.changed()


def _apply(
    kind: str,
    objects: Sequence[Mapping[str, Any]],
    reset: Callable[[Sequence[Mapping[str, Any]]], None],
    put: Callable[[Mapping[str, Any]], None],
    drop: Callable[[str], None],
) -> None:
    if kind == RESET:
        reset(objects)
    elif kind == "DELETED":
        for obj in objects:
            drop((obj.get("metadata") or {}).get("name", ""))
    else:
        for obj in objects:
            put(obj)


def start(
    api: client.ApiClient, config: RouterConfig, feed: Feed, loop: asyncio.AbstractEventLoop
) -> threading.Event:
    """One daemon thread per collection; set the returned event to stop them."""
    stop = threading.Event()
    for collection in collections(config):

        def deliver(kind: str, objects: list[dict[str, Any]], name: str = collection.name) -> None:
            loop.call_soon_threadsafe(feed.apply, name, kind, objects)

        watcher = Watcher(api, collection, deliver, stop)
        threading.Thread(target=watcher.run, name=f"watch-{collection.name}", daemon=True).start()
    return stop


def _why(e: Exception) -> str:
    if isinstance(e, ApiException) and e.status == 403:
        return (
            f"forbidden ({e.reason}): the router's Role must allow get, list and watch here; "
            "the operator renders it as <base>-router"
        )
    return f"{type(e).__name__}: {e}"
