"""A minimal kopf operator that test_operator_pod.py runs inside a pod: it marks each
LoraAdapter it sees, proving a kopf process authenticates as its ServiceAccount."""

import kopf


@kopf.on.create("loraplane.io", "v1alpha1", "loraadapters")
def mark(patch: kopf.Patch, **_: object) -> None:
    patch.metadata.annotations["loraplane.io/seen-by"] = "kopf-in-a-pod"
