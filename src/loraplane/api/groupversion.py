"""API group, version and the names each resource is known by (kubectl, RBAC, URLs)."""

from dataclasses import dataclass

GROUP = "loraplane.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "loraplane"


@dataclass(frozen=True)
class ResourceNames:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    categories: tuple[str, ...] = (CATEGORY,)

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


BASE_MODEL_DEPLOYMENT = ResourceNames(
    kind="BaseModelDeployment",
    plural="basemodeldeployments",
    singular="basemodeldeployment",
    short_names=("bmd",),
)
LORA_ADAPTER = ResourceNames(
    kind="LoraAdapter",
    plural="loraadapters",
    singular="loraadapter",
    short_names=("lora",),
)
