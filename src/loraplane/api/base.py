"""Shared building blocks of the API types: the model base class, CEL rules and bounded types."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

# Patterns are written for Go's RE2 (the API server), Rust's regex (pydantic) and Python's re
# (jsonschema) at once: no lookaround, no backreferences, anchored on both ends.
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A non-negative Kubernetes quantity: "500m", "2", "1.5", "16Gi", "1e3".
QUANTITY = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
SHA256_HEX = r"^[0-9a-f]{64}$"

# The API server reads a schema's maximum as a float64: 2**63 - 1 rounds up to 2**63, which
# overflows to -2**63 and then refuses every value. 2**53 - 1 is the largest integer a float64
# holds exactly, and more than any generation or byte count will reach.
MAX_COUNTER = 2**53 - 1

# Base names become Deployment, Service and PodDisruptionBudget names and label values with a
# short suffix, so they must be DNS-1035 labels with room left under the 63-character limit.
BASE_NAME_MAX = 52


@dataclass(frozen=True)
class Rule:
    """One CEL rule for the API server and its Python twin, so offline validation agrees.

    Use it in a model's ``cel_rules`` (``self`` is that object) or in ``Annotated[...]`` on a
    field (``self`` is the field's value). ``holds`` gets the same ``self``. A transition rule
    (one that reads ``oldSelf``) has no ``holds``: only the server can check it.
    """

    cel: str
    message: str
    holds: Callable[[Any], bool] | None = None
    field_path: str | None = None

    def schema(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out

    def check(self, value: Any) -> Any:
        if self.holds is not None and not self.holds(value):
            raise ValueError(self.message)
        return value

    # As Annotated metadata on a field: validate after the type, and publish the rule.
    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        out.setdefault("x-kubernetes-validations", []).append(self.schema())
        return out


def _publish_rules(schema: dict[str, Any], cls: type) -> None:
    rules: tuple[Rule, ...] = getattr(cls, "cel_rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [rule.schema() for rule in rules]


class K8sModel(BaseModel):
    """Base of every API type: camelCase on the wire, attribute docstrings as descriptions."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="forbid",
        json_schema_extra=_publish_rules,
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rules(self) -> Any:
        for rule in type(self).cel_rules:
            rule.check(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase keys, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


Quantity = Annotated[str, Field(max_length=64, pattern=QUANTITY)]
"""A Kubernetes quantity such as "500m", "4" or "16Gi"."""

DNSLabel = Annotated[str, Field(max_length=63, pattern=DNS1123_LABEL)]
DNSSubdomain = Annotated[str, Field(max_length=253, pattern=DNS1123_SUBDOMAIN)]
BaseModelName = Annotated[str, Field(max_length=BASE_NAME_MAX, pattern=DNS1035_LABEL)]
Sha256 = Annotated[str, Field(max_length=64, pattern=SHA256_HEX)]


class ObjectMeta(BaseModel):
    """The part of metadata the API types read; every other field is kept as it came."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class LocalObjectReference(K8sModel):
    """A reference to an object in the same namespace."""

    name: DNSSubdomain
    """Name of the object."""
