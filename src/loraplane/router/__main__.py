"""loraplane-router: serve one BaseModelDeployment's endpoint (configured by the environment)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import uvicorn
from kubernetes import client
from kubernetes import config as kubeconfig
from prometheus_client import start_http_server

from . import watch
from .app import create_app
from .config import ENV, RouterConfig
from .dispatch import Router
from .keys import Access
from .metrics import RouterMetrics
from .upstream import Upstream

log = logging.getLogger("loraplane.router")
# Graceful stop: answers in progress get this long (the pod's grace period is longer).
SHUTDOWN_SECONDS = 30


def api_client() -> client.ApiClient:
    try:
        kubeconfig.load_incluster_config()
    except kubeconfig.ConfigException:
        kubeconfig.load_kube_config()  # a local run, or a pod handed a KUBECONFIG
    return client.ApiClient()


async def serve(config: RouterConfig) -> None:
    metrics = RouterMetrics()
    start_http_server(config.metrics_port, config.host, registry=metrics.registry)
    upstream = Upstream(config)
    router = Router(config, upstream, metrics)
    access = Access(config.api_keys_secret)
    feed = watch.Feed(router, access, [c.name for c in watch.collections(config)])
    stop = watch.start(api_client(), config, feed, asyncio.get_running_loop())
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(router, access, config),
            host=config.host,
            port=config.port,
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=SHUTDOWN_SECONDS,
        )
    )
    log.info(
        "routing %s/%s on %s:%s (metrics on :%s, API keys %s)",
        config.namespace,
        config.base,
        config.host,
        config.port,
        config.metrics_port,
        f"from Secret {config.api_keys_secret!r} when it exists"
        if config.api_keys_secret
        else "off",
    )
    try:
        await server.serve()
    finally:
        stop.set()
        await upstream.close()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print(__doc__)
        for var, name in ENV.items():
            print(f"  {var:44} {name}")
        return
    logging.basicConfig(
        level=os.environ.get("LORAPLANE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = RouterConfig.from_env(os.environ)
    except ValueError as e:
        sys.exit(f"loraplane-router: {e}")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
