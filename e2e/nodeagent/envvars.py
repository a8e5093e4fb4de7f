"""A container's environment as the kubelet would build it: env, envFrom, $(VAR) expansion."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

from kubernetes import client


class EnvError(Exception):
    """The pod's environment cannot be built yet (a missing Secret key, say)."""


# $(VAR) is replaced when VAR is defined earlier; $$(VAR) escapes to the literal $(VAR).
_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REF.sub(sub, text)


class EnvResolver:
    """Looks up Secrets and ConfigMaps once per container start."""

    def __init__(
        self, core: client.CoreV1Api, pod: client.V1Pod, pod_ip: str, host_ip: str
    ) -> None:
        self.core = core
        self.pod = pod
        self.fields = {
            "metadata.name": pod.metadata.name,
            "metadata.namespace": pod.metadata.namespace,
            "metadata.uid": pod.metadata.uid,
            "spec.nodeName": pod.spec.node_name or "",
            "spec.serviceAccountName": pod.spec.service_account_name or "default",
            "status.podIP": pod_ip,
            "status.podIPs": pod_ip,
            "status.hostIP": host_ip,
            "status.hostIPs": host_ip,
        }
        self._cache: dict[tuple[str, str], dict[str, str] | None] = {}

    def _data(self, kind: str, name: str) -> dict[str, str] | None:
        key = (kind, name)
        if key not in self._cache:
            ns = self.pod.metadata.namespace
            try:
                if kind == "Secret":
                    obj = self.core.read_namespaced_secret(name, ns)
                    data = {k: base64.b64decode(v).decode() for k, v in (obj.data or {}).items()}
                else:
                    obj = self.core.read_namespaced_config_map(name, ns)
                    data = dict(obj.data or {})
            except client.ApiException as e:
                if e.status != 404:
                    raise
                data = None
            self._cache[key] = data
        return self._cache[key]

    def _key(self, kind: str, ref: Any) -> str | None:
        data = self._data(kind, ref.name)
        if data is None or ref.key not in data:
            if ref.optional:
                return None
            what = f"{kind} {self.pod.metadata.namespace}/{ref.name}"
            raise EnvError(
                f"{what} not found" if data is None else f"{what} has no key {ref.key!r}"
            )
        return data[ref.key]

    def _field(self, path: str) -> str:
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (getattr(self.pod.metadata, m.group(1)) or {}).get(m.group(2), "")
        if path not in self.fields:
            raise EnvError(f"fieldRef {path!r} is not supported by the node agent")
        return self.fields[path]

    def container_env(self, container: client.V1Container) -> dict[str, str]:
        env: dict[str, str] = {}
        for src in container.env_from or []:
            prefix = src.prefix or ""
            kind, ref = (
                ("ConfigMap", src.config_map_ref)
                if src.config_map_ref
                else ("Secret", src.secret_ref)
            )
            data = self._data(kind, ref.name)
            if data is None:
                if ref.optional:
                    continue
                raise EnvError(f"{kind} {self.pod.metadata.namespace}/{ref.name} not found")
            env.update({prefix + k: v for k, v in data.items()})
        for var in container.env or []:
            value = self._value(var, env, container)
            if value is not None:
                env[var.name] = value
        return env

    def _value(
        self, var: client.V1EnvVar, env: dict[str, str], container: client.V1Container
    ) -> str | None:
        if var.value_from is None:
            return expand(var.value or "", env)
        src = var.value_from
        if src.field_ref is not None:
            return self._field(src.field_ref.field_path)
        if src.secret_key_ref is not None:
            return self._key("Secret", src.secret_key_ref)
        if src.config_map_key_ref is not None:
            return self._key("ConfigMap", src.config_map_key_ref)
        if src.resource_field_ref is not None:
            return _resource(container, src.resource_field_ref.resource)
        raise EnvError(f"env {var.name}: unsupported valueFrom")


def _resource(container: client.V1Container, resource: str) -> str:
    kind, _, name = resource.partition(".")
    res = container.resources
    values: dict[str, str] = (getattr(res, kind, None) or {}) if res else {}
    return str(values.get(name, "0"))
