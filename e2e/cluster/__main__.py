"""CLI of the local control plane: python -m e2e.cluster up|down|status|kubeconfig|kubectl."""

from __future__ import annotations

import argparse
import json
import sys

from . import chart
from .controlplane import ClusterError, ControlPlane
from .paths import Bins
from .testing import kwok_node


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cluster.sh", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start (idempotent) and wait until ready")
    up.add_argument("--no-kwok", action="store_true", help="don't start kwok")
    up.add_argument(
        "--agent-nodes", type=int, default=1, help="GPU nodes of the node agent (0: none)"
    )
    up.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu capacity per agent node")
    down = sub.add_parser("down", help="stop everything, leaving no processes")
    down.add_argument("--keep-data", action="store_true", help="keep etcd's data for the next up")
    sub.add_parser("status", help="processes, ports, readiness and the pod network as JSON")
    sub.add_parser(
        "operator-up",
        help=f"helm upgrade --install the chart as {chart.RELEASE} in {chart.NAMESPACE} "
        "(values-local.yaml) and wait until the operator pod is Ready",
    )
    sub.add_parser("operator-down", help=f"helm uninstall {chart.RELEASE}, if installed")
    kc = sub.add_parser("kubeconfig", help="print the absolute path of a kubeconfig")
    kc.add_argument("--user", default="admin", choices=["admin", "operator"])
    sub.add_parser("kubectl", help="print the absolute path of the built kubectl")
    logs = sub.add_parser("logs", help="print the tail of a component's log")
    logs.add_argument("component")
    logs.add_argument("-n", "--lines", type=int, default=100)
    kw = sub.add_parser("kwok-nodes", help="create N fake GPU nodes that kwok keeps Ready")
    kw.add_argument("count", type=int)
    kw.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu capacity per node")
    kw.add_argument("--prefix", default="kwok-gpu-", help="nodes are named <prefix><i>")
    args = ap.parse_args(argv)

    cp = ControlPlane()
    try:
        if args.cmd == "up":
            with cp.lock():
                cp.up(kwok=not args.no_kwok, agent_nodes=args.agent_nodes, gpus=args.gpus)
            print(
                f"cluster ready at {cp.server}\n  export KUBECONFIG={cp.kubeconfig()}"
                f"\n  kubectl: {cp.bins.kubectl}",
                file=sys.stderr,
            )
        elif args.cmd == "down":
            with cp.lock():
                stopped = cp.down(wipe=not args.keep_data)
                (cp.state / "started-by-tests").unlink(missing_ok=True)
            print("stopped: " + (", ".join(stopped) or "nothing was running"), file=sys.stderr)
        elif args.cmd == "operator-up":
            _operator_up(cp)
        elif args.cmd == "operator-down":
            if not cp.ready():
                print("the cluster is not running: nothing to uninstall", file=sys.stderr)
            elif chart.uninstall_operator(cp):
                print(f"uninstalled {chart.RELEASE} from {chart.NAMESPACE}", file=sys.stderr)
        elif args.cmd == "status":
            print(json.dumps(cp.status(), indent=2))
        elif args.cmd == "kubeconfig":
            print(cp.kubeconfig(args.user))
        elif args.cmd == "kubectl":
            print(Bins.default().kubectl)
        elif args.cmd == "kwok-nodes":
            nodes = [kwok_node(f"{args.prefix}{i}", args.gpus) for i in range(args.count)]
            body = {"apiVersion": "v1", "kind": "List", "items": nodes}
            cp.kubectl("apply", "-f", "-", input=json.dumps(body))
            print(f"{args.count} kwok nodes with {args.gpus} GPUs each", file=sys.stderr)
        elif args.cmd == "logs":
            from .controlplane import tail

            print(tail(cp.log(args.component), args.lines))
    except (ClusterError, chart.ChartError) as e:
        print(f"cluster.sh {args.cmd}: {e}", file=sys.stderr)
        return 1
    return 0


def _operator_up(cp: ControlPlane) -> None:
    if not cp.ready():
        raise ClusterError("the cluster is not running: `make cluster-up` first")
    ns = chart.NAMESPACE
    try:
        took = chart.install_operator(cp)
    except chart.ChartError as e:
        why = cp.kubectl("get", "pods,events", "-n", ns, "-o", "wide", check=False).stdout
        logs = cp.kubectl("logs", "-n", ns, f"deploy/{chart.RELEASE}", "--tail=30", check=False)
        raise chart.ChartError(
            f"{e}\n{why}\n--- operator log ---\n{logs.stdout}{logs.stderr}"
        ) from None
    pods = json.loads(
        cp.kubectl("get", "pods", "-n", ns, "-l", chart.SELECTOR, "-o", "json").stdout
    )["items"]
    where = ", ".join(f"{p['metadata']['name']} on {p['status'].get('podIP')}" for p in pods)
    kubectl, kubeconfig = cp.bins.kubectl, cp.kubeconfig()
    print(
        f"operator ready in {took:.1f}s: {where}\n"
        "next:\n"
        f"  export KUBECONFIG={kubeconfig}\n"
        f"  alias kubectl={kubectl}\n"
        f"  kubectl -n {ns} logs deploy/{chart.RELEASE} -f    # the operator's log\n"
        "  kubectl apply -f my-base.yaml    # a BaseModelDeployment (examples/mistral-7b.yaml is\n"
        "                                   # one; here use a file:// model the pods can read)\n"
        "  kubectl apply -f examples/adapters/                # LoraAdapters of that base\n"
        "  kubectl get loraplane -A\n"
        "  make down                                          # uninstall, stop everything",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
