"""What the operator tests share: the operator as a process, manifests, and polls of state."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
from e2e.cluster.testing import Kube, is_ready

BASE = "tiny"
MAX_RANK = 16
PROMPT_IDS = [5, 17, 42, 99, 7]
MAX_TOKENS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Operator:
    """The operator as a local process under the operator user's least-privilege identity."""

    def __init__(self, kube: Kube, namespace: str, log: Path) -> None:
        assert kube.local is not None
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kube.local.kubeconfig("operator")),
            "LORAPLANE_NAMESPACES": namespace,
            "LORAPLANE_BIND_ADDRESS": "127.0.0.1",
            "LORAPLANE_METRICS_PORT": str(free_port()),
            "LORAPLANE_HEALTH_PORT": str(free_port()),
            "LORAPLANE_RESYNC_SECONDS": "5",
            "LORAPLANE_AUTOSCALE_SECONDS": "1",
            "LORAPLANE_CACHE_ROOT": str(log.parent / "runtime-cache"),
        }
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraplane.operator"], env=self.env, stdout=out, stderr=out
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def metrics(self) -> str:
        port = self.env["LORAPLANE_METRICS_PORT"]
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def base_model(path: Path, replicas: int, **spec: object) -> dict:
    return {
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "BaseModelDeployment",
        "metadata": {"name": BASE},
        "spec": {
            "model": {"source": f"file://{path}"},
            "runtime": {"resources": {"gpus": 0}},
            "maxLoraRank": MAX_RANK,
            "replicas": replicas,
            "scheduling": {"nodeSelector": {"loraplane.io/node-agent": "true"}},
            **spec,
        },
    }


def adapter(name: str, path: Path, **spec: object) -> dict:
    return {
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "LoraAdapter",
        "metadata": {"name": name},
        "spec": {"baseModel": BASE, "source": f"file://{path}", **spec},
    }


def apply(kube: Kube, ns: str, obj: dict) -> None:
    kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))


def condition(obj: dict, type_: str) -> dict:
    return next(
        (c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {}
    )


def runtime_pods(kube: Kube, ns: str) -> list[dict]:
    pods = kube.get_json("pods", "-n", ns, "-l", f"loraplane.io/base-model={BASE}")["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def admin_token(kube: Kube, ns: str) -> str:
    secret = kube.get_json("secret", f"{BASE}-admin", "-n", ns)
    return base64.b64decode(secret["data"]["token"]).decode()


def held(kube: Kube, ns: str, pod: dict) -> dict[str, dict]:
    r = httpx.get(
        f"http://{pod['status']['podIP']}:8000/v1/adapters",
        headers={"Authorization": f"Bearer {admin_token(kube, ns)}"},
        timeout=10,
    )
    r.raise_for_status()
    return {a["name"]: a for a in r.json()["adapters"]}


def adapter_ready(kube: Kube, ns: str, name: str, replicas: int) -> dict | None:
    obj = kube.get_json("lora", name, "-n", ns)
    status = obj.get("status") or {}
    ok = (
        condition(obj, "Ready").get("status") == "True" and status.get("loadedReplicas") == replicas
    )
    return obj if ok and status.get("totalReplicas") == replicas else None


def fleet_ready(kube: Kube, ns: str, replicas: int) -> dict | None:
    bmd = kube.get_json("bmd", BASE, "-n", ns)
    status = bmd.get("status") or {}
    if condition(bmd, "Ready").get("status") != "True" or status.get("readyReplicas") != replicas:
        return None
    pods = runtime_pods(kube, ns)
    return bmd if len(pods) == replicas and all(is_ready(p) for p in pods) else None


def peft_greedy_ids(base: Path, adapter_dir: Path | None) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        out = model.eval().generate(
            torch.tensor([PROMPT_IDS]), max_new_tokens=MAX_TOKENS, do_sample=False
        )
    return out[0, len(PROMPT_IDS) :].tolist()


def complete_text(pod: dict, model: str) -> str:
    r = httpx.post(
        f"http://{pod['status']['podIP']}:8000/v1/completions",
        json={"model": model, "prompt": PROMPT_IDS, "max_tokens": MAX_TOKENS, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def kill_runtime(pod: dict) -> None:
    """kill -9 of the pod's runtime process (the node agent runs it as a local process): the
    pod restarts empty."""
    ip = pod["status"]["podIP"]
    pids = subprocess.run(
        ["pgrep", "-f", f"loraplane-runtime .*--host {ip} "],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    assert pids, f"no runtime process bound to {ip}"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
