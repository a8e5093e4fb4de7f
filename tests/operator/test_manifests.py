"""BaseModelDeployment -> Deployment, Service, PDB, Secret: what a runtime pod is given."""

from __future__ import annotations

from loraplane.api import BaseModelDeployment
from loraplane.api.wire import ADMIN_TOKEN_ENV, READINESS_GATE
from loraplane.operator import manifests, names
from loraplane.operator.config import OperatorConfig

CONFIG = OperatorConfig(runtime_image="example/runtime:1", runtime_shutdown_seconds=30)


def bmd(**spec) -> BaseModelDeployment:
    return BaseModelDeployment.model_validate(
        {
            "metadata": {"name": "mistral", "namespace": "team-a", "uid": "u-1", "generation": 3},
            "spec": {
                "model": {"source": "hf://org/mistral", "revision": "v2", "dtype": "Float16"},
                **spec,
            },
        }
    )


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_the_runtime_command_carries_every_sizing_knob() -> None:
    b = bmd(
        maxAdapters=16,
        maxCpuAdapters=64,
        maxLoraRank=32,
        maxBatchTokens=4096,
        maxRunningSequences=256,
    )
    args = manifests.runtime_args(b, CONFIG)
    assert args[0] == "loraplane-runtime"
    assert flag(args, "--model") == "hf://org/mistral@v2"
    assert flag(args, "--dtype") == "float16" and flag(args, "--device") == "cuda"
    assert flag(args, "--host") == "$(POD_IP)" and flag(args, "--port") == "8000"
    assert (flag(args, "--max-adapters"), flag(args, "--max-cpu-adapters")) == ("16", "64")
    assert (flag(args, "--max-lora-rank"), flag(args, "--max-num-batched-tokens")) == ("32", "4096")
    assert flag(args, "--max-running") == "256"
    assert flag(args, "--served-model-name") == "mistral"
    assert "$(POD_NAME)" in flag(args, "--cache-dir")
    assert flag(args, "--gpu-memory-utilization") == "0.9" and "--max-model-len" not in args
    sized = manifests.runtime_args(bmd(maxModelLen=32768, gpuMemoryUtilizationPercent=85), CONFIG)
    assert flag(sized, "--max-model-len") == "32768"
    assert flag(sized, "--gpu-memory-utilization") == "0.85"


def test_every_runtime_flag_the_operator_passes_is_one_the_runtime_takes() -> None:
    from loraplane.runtime.__main__ import _parser

    b = bmd(maxModelLen=4096, gpuMemoryUtilizationPercent=80)
    args = manifests.runtime_args(b, CONFIG)[len(CONFIG.runtime_command) :]
    parsed = _parser({}).parse_args([a.replace("$(POD_IP)", "10.0.0.1") for a in args])
    assert (parsed.max_model_len, parsed.gpu_memory_utilization) == (4096, 0.8)
    assert parsed.max_num_batched_tokens == b.spec.max_batch_tokens
    assert parsed.max_running == b.spec.max_running_sequences


def test_cpu_replicas_run_float32_without_a_gpu_limit() -> None:
    b = bmd(runtime={"resources": {"gpus": 0}})
    args = manifests.runtime_args(b, CONFIG)
    assert flag(args, "--device") == "cpu" and flag(args, "--dtype") == "float32"
    container = manifests.deployment(b, CONFIG, 1)["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(container.get("resources"))


def test_the_deployment_surges_gates_and_drains() -> None:
    b = bmd(
        runtime={
            "image": "mine:2",
            "env": [{"name": "HF_HOME", "value": "/cache"}, {"name": "POD_IP", "value": "evil"}],
            "resources": {"gpus": 2, "requests": {"cpu": "4", "memory": "32Gi"}},
        },
        scheduling={
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
        },
    )
    d = manifests.deployment(b, CONFIG, replicas=3)
    spec = d["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert spec["replicas"] == 3
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["selector"]["matchLabels"] == names.selector_labels("mistral")
    assert pod["readinessGates"] == [{"conditionType": READINESS_GATE}]
    assert pod["terminationGracePeriodSeconds"] > CONFIG.runtime_shutdown_seconds
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"][0]["key"] == "gpu"
    assert container["image"] == "mine:2"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "32Gi"}
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"  # not "evil"
    assert env[ADMIN_TOKEN_ENV]["valueFrom"]["secretKeyRef"]["name"] == "mistral-admin"
    assert env["HF_HOME"]["value"] == "/cache"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    owner = d["metadata"]["ownerReferences"][0]
    assert owner["uid"] == "u-1" and owner["controller"] is True


def test_the_default_image_is_the_operators_and_rendering_is_deterministic() -> None:
    b = bmd()
    one = manifests.children(b, CONFIG, 2)
    assert one == manifests.children(b, CONFIG, 2)
    assert one[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "example/runtime:1"
    kinds = [c["kind"] for c in one]
    runtime = ["Deployment", "Service", "PodDisruptionBudget"]
    router = ["ServiceAccount", "Role", "RoleBinding", "Deployment", "Service"]  # routing.py
    assert kinds == runtime + router
    assert all(c["metadata"]["namespace"] == "team-a" for c in one)


def test_service_endpoint_and_secret() -> None:
    b = bmd(runtime={"port": 9000})
    svc = manifests.service(b)
    assert svc["spec"]["selector"] == names.selector_labels("mistral")
    assert svc["spec"]["ports"][0]["port"] == 9000
    assert manifests.endpoint(b) == "http://mistral-router.team-a.svc:9000"  # the router's
    secret = manifests.admin_secret(b, "tok")
    assert secret["metadata"]["name"] == "mistral-admin" and secret["stringData"] == {
        "token": "tok"
    }
    assert manifests.new_admin_token() != manifests.new_admin_token()


def test_pods_run_non_root_on_a_read_only_root_and_mount_a_pvc_model() -> None:
    b = BaseModelDeployment.model_validate(
        {
            "metadata": {"name": "m", "namespace": "n", "uid": "u"},
            "spec": {"model": {"source": "pvc://weights/llama-3"}},
        }
    )
    pod = manifests.deployment(b, CONFIG, 1)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts[CONFIG.cache_root] == "cache" and mounts["/tmp"] == "tmp"
    assert volumes[mounts["/mnt/pvc/weights"]]["persistentVolumeClaim"]["claimName"] == "weights"
    assert flag(container["command"], "--model") == "pvc://weights/llama-3"
