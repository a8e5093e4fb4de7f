"""Operator start and stop: kopf settings, shared clients, the metrics server."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from kubernetes import client
from kubernetes import config as kubeconfig
from prometheus_client import start_http_server

from loraplane.api import GROUP

from .. import names
from ..config import OperatorConfig
from ..kube import Kube
from ..metrics import OperatorMetrics
from ..runtimeclient import RuntimeClient
from .context import Context

# The kubernetes client is synchronous: status patches and Events for many adapters run in
# threads, and the default pool (cores + 4) would queue them on a small node.
API_THREADS = 32


def api_client() -> client.ApiClient:
    try:
        kubeconfig.load_incluster_config()
    except kubeconfig.ConfigException:
        kubeconfig.load_kube_config()  # a local run, or a pod handed a KUBECONFIG
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = API_THREADS  # one connection per worker thread
    return client.ApiClient(configuration)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config: OperatorConfig = memo.config
    settings.persistence.finalizer = names.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.reporting_component = names.FIELD_MANAGER
    settings.posting.level = logging.WARNING  # our own Events say what happened; kopf's only errors
    settings.watching.server_timeout = 300
    settings.peering.priority = config.priority
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(API_THREADS))
    metrics = OperatorMetrics()
    start_http_server(config.metrics_port, config.bind_address, registry=metrics.registry)
    memo.ctx = Context(
        config=config,
        kube=Kube(api_client()),
        runtime=RuntimeClient(config.runtime_timeout_seconds, config.load_timeout_seconds),
        metrics=metrics,
        pod_calls=asyncio.Semaphore(config.sync_concurrency),
    )


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    ctx: Context | None = getattr(memo, "ctx", None)
    if ctx is not None:
        await ctx.runtime.close()
