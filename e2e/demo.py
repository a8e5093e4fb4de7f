"""The whole system in one command: a cluster, the operator by helm, a model and three adapters
applied with kubectl, answers through the deployment's endpoint, and the fleet scaling.

Run by `make demo` (which first installs the venv and builds the Kubernetes binaries). Every
step says what it does and how long it took; the end says how to look around and clean up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from e2e.cluster import chart
from e2e.cluster.controlplane import ControlPlane
from e2e.cluster.testing import Timeout, service_url, wait_for
from loraplane.api import parse_quantity

NAMESPACE = "loraplane-demo"
BASE = "tiny-llama"
STEPS = 8
T = TypeVar("T")


class Demo:
    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.cp = ControlPlane()
        self.step = 0

    @contextmanager
    def stage(self, what: str, note: str = "") -> Iterator[None]:
        self.step += 1
        print(f"\n[{self.step}/{STEPS}] {what}" + (f"  ({note})" if note else ""), flush=True)
        started = time.monotonic()
        yield
        print(f"      done in {time.monotonic() - started:.1f} s", flush=True)

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.cp.kubectl(*args, input=input).stdout

    def get(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    # ---- the steps --------------------------------------------------------------------------

    def start_cluster(self) -> None:
        with self.stage(
            "Starting the local control plane",
            "etcd, kube-apiserver, controller-manager, scheduler, kwok and a node agent on this machine",
        ):
            with self.cp.lock():
                self.cp.up()
            print(f"      API server {self.cp.server}; pods get their own addresses on this host")

    def install(self) -> None:
        with self.stage(
            "Installing loraplane with helm", f"release {chart.RELEASE} in {chart.NAMESPACE}"
        ):
            chart.install_operator(self.cp)
            print(
                "      the operator runs as a pod under the chart's ServiceAccount and ClusterRole"
            )

    def build_models(self) -> tuple[Path, dict[str, Path]]:
        with self.stage(
            "Building a tiny base model and teaching three adapters",
            "about a minute the first time, cached after",
        ):
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            warnings.filterwarnings("ignore", category=FutureWarning)
            from loraplane.testing.tiny import build_taught_demo

            base, adapters = build_taught_demo(self.cache / "models")
            print(f"      base {base}; adapters {', '.join(adapters)} (real PEFT files)")
        return base, adapters

    def apply(self, base: Path, adapters: dict[str, Path]) -> None:
        objects = [manifest_base(base), *(manifest_adapter(n, p) for n, p in adapters.items())]
        with self.stage("kubectl apply: one BaseModelDeployment and three LoraAdapters"):
            self.kubectl("apply", "-f", "-", input=json.dumps(namespace()))
            out = self.kubectl(
                "apply",
                "-n",
                NAMESPACE,
                "-f",
                "-",
                input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
            )
            print("      " + out.strip().replace("\n", "\n      "))

    def wait_ready(self, adapters: dict[str, Path]) -> None:
        with self.stage(
            "Waiting for Ready",
            "runtime pods load the model; the operator loads every adapter into every pod",
        ):
            self.kubectl(
                "wait",
                "-n",
                NAMESPACE,
                "--for=condition=Ready",
                "--timeout=300s",
                f"bmd/{BASE}",
                *(f"lora/{n}" for n in adapters),
            )
            print(self.kubectl("get", "loraplane", "-n", NAMESPACE).rstrip())

    def ask(self, adapters: dict[str, Path]) -> str:
        with self.stage("Asking each adapter through the deployment's endpoint", "OpenAI client"):
            url = wait_for(self.router_url, 120, "the router's Service to have a ready endpoint")
            from loraplane.testing.tiny import DEMO_PROMPT

            answers = asyncio.run(ask_all(url, [BASE, *adapters], DEMO_PROMPT))
            bmd = self.get("bmd", BASE, "-n", NAMESPACE)
            print(f"      endpoint {bmd['status'].get('endpoint')} (reached from here at {url})")
            print(f"      prompt {DEMO_PROMPT!r}, greedy, one concurrent batch:")
            for model, text in answers:
                print(f"      {model:>12} | {text!r}")
        return url

    def scale(self, url: str) -> None:
        with self.stage(
            "Load, then silence: the fleet scales on the request rate of all adapters together",
            "about a minute",
        ):
            stop = threading.Event()
            load = threading.Thread(target=generate_load, args=(url, stop), daemon=True)
            load.start()
            try:
                self.watch_replicas(lambda n: n >= 2, 120, "scaling out under load")
            finally:
                stop.set()
                load.join(30)
            self.watch_replicas(lambda n: n == 1, 150, "scaling back once the load stops")
            events = self.get(
                "events",
                "-n",
                NAMESPACE,
                "--field-selector",
                f"involvedObject.kind=BaseModelDeployment,involvedObject.name={BASE}",
            )
            for e in sorted(events["items"], key=lambda e: e.get("lastTimestamp") or "")[-4:]:
                print(f"      Event {e['reason']}: {e['message'][:150]}")

    def watch_replicas(self, done: Callable[[int], bool], timeout: float, what: str) -> None:
        """Print each change of the fleet until done(ready replicas) holds."""
        last = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.get("bmd", BASE, "-n", NAMESPACE).get("status") or {}
            rate = float(parse_quantity(st.get("requestRate") or "0"))
            now = (st.get("desiredReplicas"), st.get("readyReplicas"), round(rate, 1))
            if now != last:
                print(f"      replicas desired {now[0]}, ready {now[1]}; {now[2]:.1f} requests/s")
                last = now
            if done(st.get("readyReplicas") or 0) and st.get("desiredReplicas") == st.get(
                "readyReplicas"
            ):
                return
            time.sleep(1)
        raise Timeout(f"timed out after {timeout:.0f}s {what}")

    def router_url(self) -> str | None:
        return service_url(self.get, NAMESPACE, f"{BASE}-router", f"loraplane.io/router-for={BASE}")

    def goodbye(self) -> None:
        kc = self.cp.kubeconfig()
        print(
            f"""
The system keeps running. Look around:
  export KUBECONFIG={kc}
  alias kubectl={self.cp.bins.kubectl}
  kubectl get loraplane -n {NAMESPACE}                  # the model and its adapters
  kubectl describe lora sql-expert -n {NAMESPACE}       # per-pod residency, conditions, Events
  kubectl get pods -n {NAMESPACE} -o wide               # runtime and router pods, their addresses
  kubectl logs -n {chart.NAMESPACE} deploy/{chart.RELEASE}   # the operator
Clean up:  make down   (stops everything; no process is left)
"""
        )


def namespace() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}


def manifest_base(path: Path) -> dict[str, Any]:
    return {
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "BaseModelDeployment",
        "metadata": {"name": BASE},
        "spec": {
            "model": {"source": f"file://{path}"},
            "runtime": {"resources": {"gpus": 0}},  # the tiny model runs on the CPU
            "maxLoraRank": 16,
            "scheduling": {"nodeSelector": {"loraplane.io/node-agent": "true"}},
            "autoscaling": {
                "enabled": True,
                "minReplicas": 1,
                "maxReplicas": 2,
                "targetRequestsPerSecond": "2",
                "stableWindowSeconds": 10,
                "panicWindowSeconds": 4,
                "scaleDownStabilizationSeconds": 10,
            },
        },
    }


def manifest_adapter(name: str, path: Path) -> dict[str, Any]:
    return {
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "LoraAdapter",
        "metadata": {"name": name},
        "spec": {"baseModel": BASE, "source": f"file://{path}"},
    }


async def ask_all(url: str, models: list[str], prompt: str) -> list[tuple[str, str]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2, timeout=60)

    async def one(model: str) -> tuple[str, str]:
        r = await client.completions.create(
            model=model, prompt=prompt, max_tokens=16, temperature=0
        )
        return model, r.choices[0].text

    try:
        return list(await asyncio.gather(*(one(m) for m in models)))
    finally:
        await client.close()


def generate_load(url: str, stop: threading.Event) -> None:
    """Short requests over every model from a few concurrent clients, until told to stop."""
    import httpx

    models = [BASE, "sql-expert", "support-bot", "poet"]

    def client_loop(offset: int) -> None:
        with httpx.Client(timeout=30) as http:
            i = offset
            while not stop.is_set():
                # A pod or router going away under load: the next request goes elsewhere.
                with contextlib.suppress(httpx.HTTPError):
                    http.post(
                        f"{url}/v1/completions",
                        json={"model": models[i % len(models)], "prompt": "hello", "max_tokens": 2},
                    )
                i += 1

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make demo", description=__doc__)
    cache = Path(os.environ.get("LORAPLANE_CACHE", Path.home() / ".cache" / "loraplane"))
    ap.add_argument("--cache-dir", type=Path, default=cache / "demo")
    ap.add_argument("--no-load", action="store_true", help="skip the scaling step")
    args = ap.parse_args(argv)
    demo = Demo(args.cache_dir)
    started = time.monotonic()
    print("loraplane demo: one base model, three adapters, one fleet scaled as one")
    print(
        "(the Kubernetes binaries and the venv were prepared by `make`; a cold build takes 6-17 min once)"
    )
    demo.start_cluster()
    demo.install()
    base, adapters = demo.build_models()
    demo.apply(base, adapters)
    demo.wait_ready(adapters)
    url = demo.ask(adapters)
    if not args.no_load:
        demo.scale(url)
    else:
        demo.step += 1
    print(f"\n[{STEPS}/{STEPS}] Done in {time.monotonic() - started:.0f} s.")
    demo.goodbye()
    return 0


if __name__ == "__main__":
    sys.exit(main())
