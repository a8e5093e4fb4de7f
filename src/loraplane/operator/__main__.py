"""loraplane-operator: turn BaseModelDeployments into fleets and LoraAdapters into loaded adapters."""

from __future__ import annotations

import logging
import os
import random
import sys

import kopf

from .config import ENV, OperatorConfig


def run(config: OperatorConfig) -> None:
    from . import handlers  # noqa: F401  (registers the handlers with kopf)

    peering = config.peering
    priority = config.priority
    if peering and not priority:
        # kopf freezes every replica of equal priority: distinct random priorities make the
        # highest live replica the leader and the others wait until it goes.
        priority = random.SystemRandom().randint(1, 2**31 - 1)
    memo = kopf.Memo(config=OperatorConfig(**{**config.__dict__, "priority": priority}))
    kopf.run(
        standalone=not peering,
        peering_name=peering,
        priority=priority,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=f"http://{_host(config.bind_address)}:{config.health_port}/healthz",
        memo=memo,
    )


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        print("\nConfigured by environment variables:")
        for var, name in ENV.items():
            print(f"  {var:36} {name}")
        return 0
    logging.basicConfig(
        level=os.environ.get("LORAPLANE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per pod call would drown the log; failures are logged by the fleet.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        config = OperatorConfig.from_env(os.environ)
    except ValueError as e:
        print(f"loraplane-operator: {e}", file=sys.stderr)
        return 2
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
