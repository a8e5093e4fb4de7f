"""The node agent: its GPU Node, and pods that really run as local processes on their own
addresses."""

from __future__ import annotations

import ipaddress
import json
import os
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from e2e.cluster.testing import Kube, is_ready, wait_for


@pytest.fixture
def local(kube: Kube) -> Kube:
    if kube.local is None:
        pytest.skip("needs the local control plane's node agent (not a KUBECONFIG cluster)")
    return kube


# Pods of these tests must really run: on the agent's nodes, never on a kwok node.
ON_AGENT = {"loraplane.io/node-agent": "true"}
POD_IP = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def deployment(name: str, replicas: int, container: dict, **pod_spec) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [container],
                    "terminationGracePeriodSeconds": 5,
                    "nodeSelector": ON_AGENT,
                    **pod_spec,
                },
            },
        },
    }


def create(kube: Kube, ns: str, obj: dict) -> None:
    if obj["kind"] == "Pod":
        obj = dict(obj, spec=dict(obj["spec"], nodeSelector=ON_AGENT))
    kube.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(obj))


def pods(kube: Kube, ns: str, selector: str) -> list[dict]:
    return kube.get_json("pods", "-n", ns, "-l", selector)["items"]


def http_get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read()


def test_agent_node_is_a_ready_gpu_node(local: Kube) -> None:
    nodes = local.get_json("nodes", "-l", "loraplane.io/node-agent=true")["items"]
    assert nodes, "the node agent registered no Node"
    node = nodes[0]
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
    listed = local.kubectl("get", "nodes").stdout
    assert node["metadata"]["name"] in listed and " Ready " in listed
    lease = local.get_json("lease", node["metadata"]["name"], "-n", "kube-node-lease")
    assert lease["spec"]["holderIdentity"] == node["metadata"]["name"]


def test_deployment_pods_run_on_their_own_addresses(local: Kube, namespace: str) -> None:
    web = {
        "name": "web",
        "image": "python:3.11-slim",
        "command": ["python3", "-m", "http.server", "--bind", "$(POD_IP)", "8080"],
        "env": [POD_IP],
        "ports": [{"name": "http", "containerPort": 8080}],
        "resources": {"limits": {"nvidia.com/gpu": "1"}},
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }
    create(local, namespace, deployment("web", 2, web))
    wait_for(
        lambda: (
            local.get_json("deploy", "web", "-n", namespace).get("status", {}).get("readyReplicas")
            == 2
        ),
        60,
        "2 ready replicas of deployment/web",
    )
    running = pods(local, namespace, "app=web")
    ips = {p["status"]["podIP"] for p in running}
    assert local.local is not None
    net = local.local.pod_network()
    # The cluster's pod network (10.X/16 routed to lo, or a 127.Y/16 fallback); a cluster
    # started before pod networks existed hands out 127.x.
    within = net.network if net else ipaddress.IPv4Network("127.0.0.0/8")
    assert len(ips) == 2 and all(ipaddress.IPv4Address(ip) in within for ip in ips), (ips, net)
    assert "127.0.0.1" not in ips
    for ip in ips:
        status, body = http_get(f"http://{ip}:8080/")
        assert status == 200 and b"Directory listing" in body
    # Services over these pods: tests/cluster/test_services.py.


SHOW_ENV = textwrap.dedent("""
    import http.server, json, os
    from kubernetes import client, config
    config.load_kube_config()  # KUBECONFIG, handed over by the node agent
    review = client.AuthenticationV1Api().create_self_subject_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    facts = dict(os.environ, WHOAMI=review.status.user_info.username)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(facts).encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
    http.server.HTTPServer((os.environ["POD_IP"], 8080), H).serve_forever()
""")


def test_pod_env_is_resolved_and_has_its_service_account(local: Kube, namespace: str) -> None:
    local.kubectl(
        "create", "secret", "generic", "creds", "-n", namespace, "--from-literal=token=s3cr3t"
    )
    local.kubectl("create", "configmap", "conf", "-n", namespace, "--from-literal=level=debug")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "env"},
        "spec": {
            "containers": [
                {
                    "name": "show",
                    "image": "ignored",
                    "command": ["python", "-c", SHOW_ENV],
                    "env": [
                        POD_IP,
                        {
                            "name": "PLAIN",
                            "value": "hello $(POD_NAME)",
                        },  # not defined yet: stays as is
                        {
                            "name": "POD_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        },
                        {
                            "name": "POD_NAMESPACE",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        },
                        {"name": "GREETING", "value": "hi $(POD_NAME)"},
                        {
                            "name": "TOKEN",
                            "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}},
                        },
                        {
                            "name": "LEVEL",
                            "valueFrom": {"configMapKeyRef": {"name": "conf", "key": "level"}},
                        },
                    ],
                    "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                }
            ]
        },
    }
    create(local, namespace, pod)
    got = wait_for(
        lambda: (
            is_ready(local.get_json("pod", "env", "-n", namespace))
            and local.get_json("pod", "env", "-n", namespace)
        ),
        60,
        "pod/env Ready",
    )
    ip = got["status"]["podIP"]
    env = json.loads(http_get(f"http://{ip}:8080/")[1])
    assert env["POD_IP"] == ip and env["POD_NAME"] == "env" and env["POD_NAMESPACE"] == namespace
    assert env["GREETING"] == "hi env" and env["PLAIN"] == "hello $(POD_NAME)"
    assert env["TOKEN"] == "s3cr3t" and env["LEVEL"] == "debug"
    assert env["WHOAMI"] == f"system:serviceaccount:{namespace}:default"


def test_crashing_container_is_restarted_and_counted(local: Kube, namespace: str) -> None:
    crash = {
        "name": "crash",
        "image": "ignored",
        "command": ["python3", "-c", "import sys; sys.exit(3)"],
    }
    create(
        local,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "crash"},
            "spec": {"containers": [crash]},
        },
    )

    def restarted() -> dict | None:
        st = local.get_json("pod", "crash", "-n", namespace)["status"]["containerStatuses"][0]
        return st if st["restartCount"] >= 2 else None

    st = wait_for(restarted, 60, "two restarts of the crashing container")
    assert st["lastState"]["terminated"]["exitCode"] == 3
    # OnFailure leaves a clean exit alone; the pod Succeeds.
    once = {"name": "once", "image": "ignored", "command": ["true"]}
    create(
        local,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "once"},
            "spec": {"containers": [once], "restartPolicy": "OnFailure"},
        },
    )
    wait_for(
        lambda: (
            local.get_json("pod", "once", "-n", namespace)["status"].get("phase") == "Succeeded"
        ),
        30,
        "pod/once Succeeded",
    )


TRAP = textwrap.dedent("""
    import signal, sys, time
    def bye(*_):
        print("got SIGTERM", flush=True); sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    print("waiting", flush=True)
    while True: time.sleep(1)
""")


def test_delete_sends_sigterm_and_finalizes(local: Kube, namespace: str) -> None:
    c = {"name": "trap", "image": "ignored", "command": ["python3", "-u", "-c", TRAP]}
    create(
        local,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "trap"},
            "spec": {"containers": [c], "terminationGracePeriodSeconds": 20},
        },
    )
    st = wait_for(
        lambda: (
            (
                local.get_json("pod", "trap", "-n", namespace)["status"].get("containerStatuses")
                or [{}]
            )[0]
            .get("state", {})
            .get("running")
            and local.get_json("pod", "trap", "-n", namespace)
        ),
        30,
        "pod/trap running",
    )
    pid = int(st["status"]["containerStatuses"][0]["containerID"].removeprefix("local://"))
    logs = list((local.local.state / "agent" / "pods").glob(f"{namespace}_trap_*/trap.log"))
    wait_for(lambda: "waiting" in logs[0].read_text(), 10, "the trap process to start")
    # kubectl logs goes through the API server to the agent's kubelet API on 127.0.0.1.
    assert local.kubectl("logs", "trap", "-n", namespace).stdout == "waiting\n"
    start = time.monotonic()
    local.kubectl("delete", "pod", "trap", "-n", namespace, "--wait=true", "--timeout=30s")
    assert time.monotonic() - start < 15, "a process that exits on SIGTERM is not waited for"
    assert "got SIGTERM" in logs[0].read_text()
    assert not Path(f"/proc/{pid}").exists() or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_loopback_addresses_route_locally() -> None:
    """The premise of the agent: any 127.x.y.z can be bound without setup on Linux."""
    import socket

    with socket.socket() as s:
        s.bind(("127.5.7.9", 0))
        s.listen()
        port = s.getsockname()[1]
        with socket.create_connection(("127.5.7.9", port), timeout=2):
            pass
    assert os.uname().sysname == "Linux"


def test_probes_gate_readiness_and_liveness_restarts(local: Kube, namespace: str) -> None:
    server = ["python3", "-m", "http.server", "--bind", "$(POD_IP)", "8080"]
    probe = {"periodSeconds": 1, "timeoutSeconds": 1}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probed"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "ok",
                    "image": "ignored",
                    "command": server,
                    "env": [POD_IP],
                    "startupProbe": {"tcpSocket": {"port": 8080}, **probe},
                    "readinessProbe": {"exec": {"command": ["test", "-n", "$(POD_IP)"]}, **probe},
                },
            ],
        },
    }
    create(local, namespace, pod)
    wait_for(
        lambda: is_ready(local.get_json("pod", "probed", "-n", namespace)), 30, "pod/probed Ready"
    )
    # A liveness probe on a path that 404s fails twice, and the container is restarted.
    sick = dict(pod, metadata={"name": "sick"})
    sick["spec"] = dict(
        pod["spec"],
        containers=[
            dict(
                pod["spec"]["containers"][0],
                name="sick",
                livenessProbe={
                    "httpGet": {"path": "/nope", "port": 8080},
                    "failureThreshold": 2,
                    **probe,
                },
            )
        ],
    )
    create(local, namespace, sick)

    def restarted() -> bool:
        statuses = local.get_json("pod", "sick", "-n", namespace)["status"].get("containerStatuses")
        return bool(statuses) and statuses[0]["restartCount"] >= 1

    wait_for(restarted, 30, "a liveness-probe restart of pod/sick")
