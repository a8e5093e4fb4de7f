"""Source URIs of model and adapter weights: the schemes, their shapes, friendly errors."""

import re
from typing import Annotated, Any

from pydantic import Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from .base import Rule

SOURCE_MAX = 1024

# One shape per scheme. Repository ids follow the Hugging Face Hub rules (name or org/name);
# bucket names the S3 rules; claims are DNS-1123 subdomains; paths are anything but spaces.
_SHAPES = {
    "hf": r"hf://[A-Za-z0-9][-A-Za-z0-9._]{0,95}(/[A-Za-z0-9][-A-Za-z0-9._]{0,95})?",
    "s3": r"s3://[a-z0-9][-a-z0-9.]{1,61}[a-z0-9](/[^\s]*)?",
    "pvc": r"pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*(/[^\s]*)?",
    "file": r"file:///[^\s]*",
    "https": r"https://[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:[0-9]{1,5})?(/[^\s]*)?",
}
_EXAMPLES = {
    "hf": "hf://org/name (a Hugging Face repository id)",
    "s3": "s3://bucket/prefix",
    "pvc": "pvc://claim/path",
    "file": "file:///absolute/path",
    "https": "https://host/path",
}
MODEL_SCHEMES = ("hf", "s3", "pvc", "file")
ADAPTER_SCHEMES = (*MODEL_SCHEMES, "https")


def source_pattern(schemes: tuple[str, ...]) -> str:
    return "^(" + "|".join(_SHAPES[scheme] for scheme in schemes) + ")$"


def _scheme_rule(schemes: tuple[str, ...]) -> Rule:
    prefixes = [f"{scheme}://" for scheme in schemes]
    listed = ", ".join(prefixes[:-1]) + " or " + prefixes[-1]
    return Rule(
        cel=" || ".join(f"self.startsWith('{prefix}')" for prefix in prefixes),
        message=f"source must start with {listed}",
        holds=lambda value: value.startswith(tuple(prefixes)),
    )


class _Shape:
    """Checks the full shape after the scheme rule, so a wrong scheme gets the plain message."""

    def __init__(self, schemes: tuple[str, ...]) -> None:
        self.pattern = source_pattern(schemes)
        self._compiled = re.compile(self.pattern)

    def check(self, value: str) -> str:
        if not self._compiled.match(value):
            scheme = value.split("://", 1)[0]
            raise ValueError(
                f"source {value!r} is not a valid {scheme}:// URI: expected the shape "
                f"{_EXAMPLES.get(scheme, 'scheme://...')}"
            )
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        out["pattern"] = self.pattern
        return out


def has_scheme(source: str, *schemes: str) -> bool:
    return source.startswith(tuple(f"{scheme}://" for scheme in schemes))


MODEL_SCHEME_RULE = _scheme_rule(MODEL_SCHEMES)
ADAPTER_SCHEME_RULE = _scheme_rule(ADAPTER_SCHEMES)

ModelSource = Annotated[str, Field(max_length=SOURCE_MAX), MODEL_SCHEME_RULE, _Shape(MODEL_SCHEMES)]
AdapterSource = Annotated[
    str, Field(max_length=SOURCE_MAX), ADAPTER_SCHEME_RULE, _Shape(ADAPTER_SCHEMES)
]

Revision = Annotated[str, Field(max_length=256, pattern=r"^[A-Za-z0-9][-A-Za-z0-9._/]*$")]
"""A branch, tag or commit of a Hugging Face repository."""

REVISION_NEEDS_HF = (
    "revision is only supported for hf:// sources; for other schemes put the version in the path"
)


def revision_rule() -> Rule:
    """Rule for an object with ``source`` and an optional ``revision``."""
    return Rule(
        cel="!has(self.revision) || self.source.startsWith('hf://')",
        message=REVISION_NEEDS_HF,
        holds=lambda obj: obj.revision is None or has_scheme(obj.source, "hf"),
        field_path=".revision",
    )
