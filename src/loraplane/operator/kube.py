"""The only Kubernetes API writes beyond kopf's own: apply children, patch status, gates, Events.

The kubernetes client is synchronous; each call runs in a worker thread so the operator's
event loop keeps serving other bases meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from loraplane.api import GROUP, VERSION

from . import names

log = logging.getLogger(__name__)

# apiVersion/kind -> URL collection of the objects the operator applies.
_COLLECTIONS = {
    ("apps/v1", "Deployment"): "/apis/apps/v1/namespaces/{ns}/deployments",
    ("v1", "Service"): "/api/v1/namespaces/{ns}/services",
    ("v1", "Secret"): "/api/v1/namespaces/{ns}/secrets",
    ("policy/v1", "PodDisruptionBudget"): "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    # The router of each base (routing.py): its identity and its rights.
    ("v1", "ServiceAccount"): "/api/v1/namespaces/{ns}/serviceaccounts",
    ("rbac.authorization.k8s.io/v1", "Role"): (
        "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles"
    ),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): (
        "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"
    ),
}
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"


class Conflict(Exception):
    """The object changed since it was read (409): measure again before deciding."""


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> Any:
        def call() -> Any:
            return self.api.call_api(
                path,
                method,
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                query_params=query or [],
                body=body,
                response_type="object",
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _preload_content=True,
            )

        try:
            return await asyncio.to_thread(call)
        except ApiException as e:
            if e.status == 409:
                raise Conflict(f"{method} {path}: {e.reason}") from None
            raise

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply with the operator's field manager; ours wins over hand edits."""
        meta = obj["metadata"]
        collection = _COLLECTIONS[(obj["apiVersion"], obj["kind"])].format(ns=meta["namespace"])
        return await self._request(
            "PATCH",
            f"{collection}/{meta['name']}",
            obj,
            APPLY,
            [("fieldManager", names.FIELD_MANAGER), ("force", "true")],
        )

    async def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data, decoded; None when it does not exist."""
        try:
            secret = await self._request("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        data = secret.get("data") or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    async def create(self, obj: dict[str, Any]) -> bool:
        """Create unless it exists already; True when this call created it."""
        meta = obj["metadata"]
        collection = _COLLECTIONS[(obj["apiVersion"], obj["kind"])].format(ns=meta["namespace"])
        try:
            await self._request("POST", collection, obj)
            return True
        except Conflict:
            return False

    async def patch_status(
        self, plural: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        """Replace the status fields we own on one of our resources (merge patch)."""
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}/{name}/status"
        try:
            await self._request("PATCH", path, {"status": status}, MERGE)
        except ApiException as e:
            if e.status != 404:  # deleted meanwhile: nothing left to report on
                raise

    async def set_pod_condition(
        self, namespace: str, pod: str, resource_version: str, condition: dict[str, Any]
    ) -> bool:
        """Set one pod condition (the readiness gate) if the pod is still the one we measured.

        The resourceVersion makes this conditional: a pod whose container restarted since
        we read it answers 409, and the gate stays as it was until the next measurement.
        """
        body = {
            "metadata": {"resourceVersion": resource_version},
            "status": {"conditions": [condition]},
        }
        try:
            await self._request(
                "PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod}/status", body, STRATEGIC
            )
            return True
        except Conflict:
            return False
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    async def event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Post an Event about one of our objects; failing to post never fails a sync."""
        meta = involved["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta['name']}.{uuid.uuid4().hex[:16]}",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": names.FIELD_MANAGER},
            "reportingComponent": names.FIELD_MANAGER,
            "reportingInstance": names.FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", event)
        except Exception as e:  # an Event is a courtesy: the status carries the facts
            log.warning("could not post Event %s on %s: %s", reason, meta["name"], e)
