"""python -m e2e.simruntime: serve the runtime's HTTP contract on every kwok runtime pod's IP.

Runs until SIGTERM or SIGINT, or until --lifetime passes; removes the routes it added.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from .config import FailRule, SimConfig
from .fleet import Fleet
from .kube import Kube, endpoint_from_kubeconfig


def parse(argv: list[str] | None = None) -> tuple[Path, SimConfig]:
    d = SimConfig()
    p = argparse.ArgumentParser(prog="python -m e2e.simruntime", description=__doc__)
    p.add_argument("--kubeconfig", type=Path, required=True)
    p.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="serve runtime pods of this namespace (repeatable; default: all namespaces)",
    )
    p.add_argument("--runtime-command", default=d.runtime_command)
    p.add_argument("--port", type=int, default=d.default_port, help="when a pod names none")
    p.add_argument("--load-seconds", type=float, default=d.load_seconds)
    p.add_argument("--completion-seconds", type=float, default=d.completion_seconds)
    p.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="PATTERN=CODE",
        help="loads whose source matches PATTERN fail with CODE (besides /fail-<code>/ paths)",
    )
    p.add_argument(
        "--add-routes",
        action="store_true",
        help="as root, make unbindable pod IPs bindable with a local route (removed at exit)",
    )
    p.add_argument("--lifetime", type=float, default=d.lifetime_seconds, help="seconds")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = SimConfig(
            runtime_command=a.runtime_command,
            namespaces=tuple(a.namespace),
            default_port=a.port,
            load_seconds=a.load_seconds,
            completion_seconds=a.completion_seconds,
            fail_rules=tuple(FailRule.parse(f) for f in a.fail),
            add_routes=a.add_routes,
            lifetime_seconds=a.lifetime,
        )
    except ValueError as e:
        p.error(str(e))
    return a.kubeconfig, config


async def serve(kubeconfig: Path, config: SimConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.call_later(config.lifetime_seconds, stop.set)
    kube = Kube(endpoint_from_kubeconfig(kubeconfig))
    try:
        await Fleet(kube, config).run(stop)
    finally:
        await kube.close()


def main(argv: list[str] | None = None) -> int:
    kubeconfig, config = parse(argv)
    asyncio.run(serve(kubeconfig, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
