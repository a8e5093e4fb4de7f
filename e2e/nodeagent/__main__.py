"""Run the node agent: python -m e2e.nodeagent --kubeconfig K --nodes 1 --gpus 8."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from e2e.cluster.paths import versions

from .agent import Agent, AgentConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nodeagent", description=__doc__)
    ap.add_argument(
        "--kubeconfig", type=Path, required=True, help="credentials able to write Nodes and Pods"
    )
    ap.add_argument("--nodes", type=int, default=1, help="how many Nodes to register")
    ap.add_argument("--name-prefix", default="loraplane-gpu", help="Nodes are named <prefix>-<i>")
    ap.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu capacity of each Node")
    ap.add_argument("--state-dir", type=Path, required=True, help="pod logs, kubeconfigs and pids")
    ap.add_argument(
        "--serving-cert", type=Path, help="TLS certificate of the kubelet API (`kubectl logs`)"
    )
    ap.add_argument("--serving-key", type=Path, help="its key")
    ap.add_argument(
        "--pod-cidr",
        help="a /16 whose addresses pods get (e2e/cluster/podnet.py); default: a 127.Y.0.0/16",
    )
    args = ap.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cfg = AgentConfig(
        kubeconfig=args.kubeconfig,
        state_dir=args.state_dir.resolve(),
        node_names=tuple(f"{args.name_prefix}-{i}" for i in range(args.nodes)),
        gpus=args.gpus,
        kubelet_version=versions()["K8S_VERSION"],
        serving_cert=args.serving_cert,
        serving_key=args.serving_key,
        pod_cidr=args.pod_cidr,
    )
    agent = Agent(cfg)
    # SIGTERM (cluster down) stops every pod's processes before the agent exits.
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stop.set())
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
